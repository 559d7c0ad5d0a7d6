"""Published case lists (PerX2CT, X2CT-GAN) and user split files for ``build_pairs --split_file``.

A split file assigns case ids to ``training`` / ``validation`` / ``test``. Shipped lists live beside this
module as ``<name>.json`` (ids only; sources and commits in README.md). A user file is JSON with those three
keys (``train``/``val`` accepted) or a CSV with columns ``id,split``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path

from common.errors import InputError

SPLITS = ("training", "validation", "test")
ALIASES = {"train": "training", "training": "training", "val": "validation", "valid": "validation",
           "validation": "validation", "test": "test"}  # fmt: skip
SHIPPED_DIR = Path(__file__).resolve().parent


def shipped_names() -> list[str]:
    """Names usable as ``--split_file NAME`` (e.g. ``perx2ct``, ``x2ctgan``)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A shipped list's file for a bare name, else the given path (which must exist)."""
    text = os.fspath(name_or_path)
    if text in shipped_names():
        return SHIPPED_DIR / f"{text}.json"
    path = Path(text)
    if not path.is_file():
        raise InputError(text, f"split file not found (shipped lists: {', '.join(shipped_names())})")
    return path


def load_split_file(name_or_path: str | os.PathLike) -> dict[str, str]:
    """case id -> split name, from a shipped list name or a JSON/CSV file; an id listed twice is an error."""
    path = resolve(name_or_path)
    lists: dict[str, list[str]] = {s: [] for s in SPLITS}
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                fields = {f.strip().lower(): f for f in reader.fieldnames or []}
                if "split" not in fields or not ({"id", "case"} & set(fields)):
                    raise InputError(
                        path, f"CSV needs columns 'id' (or 'case') and 'split', got {reader.fieldnames}"
                    )
                id_col = fields.get("id") or fields["case"]
                for row in reader:
                    _add(lists, path, row[fields["split"]], [row[id_col]])
        else:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise InputError(
                    path, "a JSON split file must be an object with training/validation/test lists"
                )
            for key, ids in data.items():
                if key.lower() in ALIASES:
                    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                        raise InputError(path, f"'{key}' must be a list of case ids")
                    _add(lists, path, key, ids)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise InputError(path, f"cannot read split file ({type(e).__name__}: {e})") from e
    assignment: dict[str, str] = {}
    for split, ids in lists.items():
        for case in ids:
            if case in assignment:
                raise InputError(path, f"case {case!r} is listed in both {assignment[case]} and {split}")
            assignment[case] = split
    if not assignment:
        raise InputError(path, "split file lists no cases")
    return assignment


def _add(lists: dict[str, list[str]], path: Path, split: str, ids: Iterable[str]) -> None:
    name = ALIASES.get(str(split).strip().lower())
    if name is None:
        raise InputError(path, f"unknown split {split!r}; expected one of {SPLITS}")
    lists[name] += [i.strip() for i in ids if i.strip()]


def match_listed_id(case: str, dicom_key: str | None, listed: dict[str, str], by_prefix: dict) -> str | None:
    """The listed id this input is: its case id itself, else the listed id that starts with its DICOM key
    ``<PatientID>.<StudyDate>.<SeriesNumber>.`` (X2CT-GAN's LIDC-IDRI naming); None when unlisted."""
    if case in listed:
        return case
    if dicom_key:
        return by_prefix.get(dicom_key)
    return None


def prefix_index(listed: Iterable[str]) -> dict[str, str]:
    """``<PatientID>.<StudyDate>.<SeriesNumber>`` -> listed id, for ids of X2CT-GAN's form (ambiguous keys dropped)."""
    index: dict[str, str | None] = {}
    for case in listed:
        parts = case.split(".")
        for cut in range(3, len(parts)):  # a SeriesNumber may itself hold dots ("8658.4")
            key = ".".join(parts[:cut])
            index[key] = None if key in index and index[key] != case else case
    return {k: v for k, v in index.items() if v is not None}
