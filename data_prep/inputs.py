"""Build inputs: find the CTs (volume files, DICOM series folders), their case ids and patients, the split
file's assignment, and the pseudonyms that replace DICOM identifiers (:func:`plan_cases`, :func:`pseudonymise_plan`).

Patients (for splits by patient) come from a CSV (``case,patient``), else a ``group_by`` regex on the case
id, else the DICOM PatientID, else the case itself.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pydicom

from common.atomic import is_partial_file
from common.datalist import case_id_of_path
from common.errors import InputError, require_file
from common.pseudonym import load_or_create_key, pseudonym, write_private_json
from data_prep import splits as split_lists
from data_prep.layout import SPLITS

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".h5", ".hdf5", ".npy")


# -------------------------------------------------------------------------------------------- inputs
def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_dicom_folder(folder: Path) -> bool:
    return _first_dicom_file(folder) is not None


def _first_dicom_file(folder: Path) -> Path | None:
    for f in _visible_files(folder)[:5]:
        if f.suffix.lower() == ".dcm":
            return f
        with open(f, "rb") as fh:
            if fh.read(132)[128:132] == b"DICM":
                return f
    return None


def input_case_id(path: str | os.PathLike) -> str:
    """:func:`common.datalist.case_id_of_path` (``<case>/ct.nii.gz``-style inputs use the folder name), made
    safe as a folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", case_id_of_path(path)) or "case"


def find_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """(case id, path) for every CT: files with a volume suffix and DICOM series folders.

    A folder that is itself a DICOM series is one case; any other folder is scanned (one level of
    files and DICOM sub-folders). Hidden files and folders (names starting with ``.``, such as the
    ``.*.part*`` leftovers of killed atomic writes) are ignored. Ids come from the file/folder names,
    made unique with ``_2``, ``_3``.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        p = Path(require_file(item))
        if is_partial_file(p):
            continue
        if p.is_dir() and not _is_dicom_folder(p):
            children = sorted(c for c in p.iterdir() if not c.name.startswith("."))
            paths += [c for c in children if c.is_file() and c.name.lower().endswith(VOLUME_SUFFIXES)]
            paths += [c for c in children if c.is_dir() and _is_dicom_folder(c)]
        else:
            paths.append(p)
    found, seen = [], {}
    for p in paths:
        case = input_case_id(p)
        seen[case] = seen.get(case, 0) + 1
        found.append((case if seen[case] == 1 else f"{case}_{seen[case]}", str(p)))
    return found


def dicom_identity(path: str | os.PathLike) -> dict:
    """PatientID and ``<PatientID>.<StudyDate>.<SeriesNumber>`` of a DICOM series folder (one header read);
    empty for anything else."""
    folder = Path(path)
    if not folder.is_dir():
        return {}
    first = _first_dicom_file(folder)
    if first is None:
        return {}
    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True, force=True)
    except Exception:  # the loader reports a broken series properly later
        return {}
    patient = str(ds.get("PatientID", "") or "").strip()
    date = str(ds.get("StudyDate", "") or "").strip()
    series = str(ds.get("SeriesNumber", "") or "").strip()
    out: dict = {"dicom": True, "series_uid": str(ds.get("SeriesInstanceUID", "") or "").strip()}
    if patient:
        out["patient"] = patient
    if patient and date and series:
        out["dicom_key"] = f"{patient}.{date}.{series}"
    return out


def read_patient_csv(path: str | os.PathLike) -> dict[str, str]:
    """case -> patient from a CSV with columns ``case`` (or ``id``) and ``patient``."""
    path = require_file(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = {f.strip().lower(): f for f in reader.fieldnames or []}
            case_col = fields.get("case") or fields.get("id")
            if case_col is None or "patient" not in fields:
                raise InputError(
                    path, f"CSV needs columns 'case' (or 'id') and 'patient', got {reader.fieldnames}"
                )
            mapping = {}
            for row in reader:
                case, patient = (row[case_col] or "").strip(), (row[fields["patient"]] or "").strip()
                if not case or not patient:
                    raise InputError(path, f"empty case or patient in row {row}")
                if mapping.get(case, patient) != patient:
                    raise InputError(path, f"case {case!r} is mapped to two patients")
                mapping[case] = patient
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(path, f"cannot read patient CSV ({type(e).__name__}: {e})") from e
    return mapping


def plan_cases(
    inputs: str | Sequence[str],
    group_by: str | None = None,
    patients: str | None = None,
    split_file: str | None = None,
    unlisted_split: str | None = None,
) -> dict:
    """Every input case with its patient and (with a split file) its listed split; deterministic.

    Returns ``{"cases": [{"id", "path", "patient", "patient_source", "split"?, "listed_id"?}],
    "excluded": [...], "split_file": {...} | None}``.
    """
    found = find_inputs(inputs)
    csv_map = read_patient_csv(patients) if patients else None
    pattern = re.compile(group_by) if group_by else None
    cases, unmatched = [], []
    for case, path in found:
        info = dicom_identity(path)
        item = {"id": case, "path": path}
        if csv_map is not None:
            if case not in csv_map:
                unmatched.append(case)
                continue
            item.update(patient=csv_map[case], patient_source="csv")
        elif pattern is not None:
            m = pattern.search(case)
            if m is None:
                unmatched.append(case)
                continue
            item.update(patient=m.group(1) if m.groups() else m.group(0), patient_source="group_by")
        elif "patient" in info:
            item.update(patient=info["patient"], patient_source="dicom")
        else:
            item.update(patient=case, patient_source="case")
        if "dicom_key" in info:
            item["dicom_key"] = info["dicom_key"]
        if info.get("dicom"):
            item.update(dicom=True, series_uid=info["series_uid"])
        cases.append(item)
    if unmatched:
        source = f"--patients {patients}" if csv_map is not None else f"--group_by {group_by!r}"
        raise InputError(
            patients if csv_map is not None else None,
            f"{len(unmatched)} case(s) have no patient from {source}: {', '.join(unmatched[:10])}"
            + (" ..." if len(unmatched) > 10 else ""),
        )
    plan: dict = {"cases": cases, "excluded": [], "split_file": None}
    if split_file is None:
        return plan
    if unlisted_split in ("validation", "test"):
        raise ValueError(
            "--unlisted_split may not be 'validation' or 'test': the split file's own lists stay exact"
        )
    listed = split_lists.load_split_file(split_file)
    by_prefix = split_lists.prefix_index(listed)
    kept, matched = [], {}
    for item in cases:
        listed_id = split_lists.match_listed_id(item["id"], item.get("dicom_key"), listed, by_prefix)
        if listed_id is not None and listed_id in matched:
            raise InputError(
                item["path"], f"matches listed case {listed_id}, as does input {matched[listed_id]}"
            )
        if listed_id is None:
            if unlisted_split:
                kept.append({**item, "split": unlisted_split})
            else:
                plan["excluded"].append(
                    {"id": item["id"], "path": item["path"], "reason": "not in split file"}
                    | ({"dicom": True, "series_uid": item["series_uid"]} if item.get("dicom") else {})
                )
            continue
        matched[listed_id] = item["path"]
        kept.append({**item, "split": listed[listed_id], "listed_id": listed_id})
    missing = {s: sorted(c for c, sp in listed.items() if sp == s and c not in matched) for s in SPLITS}
    plan["cases"] = kept
    plan["split_file"] = {
        "source": str(split_lists.resolve(split_file)),
        "name": str(split_file),
        "listed": {s: sum(v == s for v in listed.values()) for s in SPLITS},
        "found": {s: sum(item.get("split") == s and "listed_id" in item for item in kept) for s in SPLITS},
        "missing": missing,
        "unlisted_split": unlisted_split,
        "unlisted": [item["id"] for item in kept if "listed_id" not in item]
        + [e["id"] for e in plan["excluded"]],
    }
    return plan

# ------------------------------------------------------------------------------------- pseudonyms
def pseudonym_files(out_root: str | os.PathLike) -> tuple[Path, Path]:
    """(key file, mapping file) beside the dataset folder, never inside it (the folder is what gets shared)."""
    root = Path(os.path.abspath(out_root))
    return root.parent / f"{root.name}.pseudonym-key", root.parent / f"{root.name}.pseudonyms.json"


def _pseudonymise(plan: dict, root: Path) -> dict:
    """``{pseudonym: real path}`` plus ``""``: the pseudonymised plan; the mapping file updated. {} if no DICOM."""
    if not any(c.get("dicom") for c in plan["cases"] + plan["excluded"]):
        return {}
    key_file, map_file = pseudonym_files(root)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    plan, private = pseudonymise_plan(plan, load_or_create_key(key_file))
    known = json.loads(map_file.read_text()) if map_file.is_file() else {}
    for part in ("cases", "patients"):
        private[part] = {**known.get(part, {}), **private[part]}
    private["note"] = "pseudonym -> original identifiers: private, never share (data_prep.build_pairs)"
    write_private_json(map_file, private)
    return {new: info["path"] for new, info in private["cases"].items()} | {"": plan}


def pseudonymise_plan(plan: dict, key: bytes) -> tuple[dict, dict]:
    """The plan with every DICOM-derived identifier replaced by a keyed pseudonym, and the mapping back.

    DICOM cases get id ``ct-<hmac of the SeriesInstanceUID (else the folder name)>`` and patient
    ``pt-<hmac of the patient key>`` (whichever source chose it: one patient keeps one pseudonym, so the
    per-patient split still groups the scans); their ``path`` becomes ``dicom:<id>`` and ``dicom_key`` /
    ``listed_id`` (PatientID.StudyDate.SeriesNumber) leave the plan. Returns ``(plan, private)`` where
    ``private`` maps each pseudonym to the original id, path, patient and keys (written only to the 0600 file).
    Other inputs (files whose names the user chose) keep their ids.
    """
    out = json.loads(json.dumps(plan))
    private: dict = {"cases": {}, "patients": {}}
    renamed: dict[str, str] = {}
    taken = {c["id"] for c in out["cases"] if not c.get("dicom")}
    for item in out["cases"]:
        if not item.get("dicom"):
            continue
        base = pseudonym(key, "series", item.get("series_uid") or item["id"], "ct-")
        new, k = base, 1
        while new in taken:  # the same series twice (copied folders): keep both, like find_inputs
            k += 1
            new = f"{base}_{k}"
        taken.add(new)
        patient = pseudonym(key, "patient", item["patient"], "pt-")
        private["patients"][patient] = item["patient"]
        private["cases"][new] = {k2: item[k2] for k2 in ("id", "path", "patient", "dicom_key", "listed_id",
                                                          "series_uid") if k2 in item}  # fmt: skip
        renamed[item["id"]] = new
        item.update(
            id=new,
            patient=patient,
            path=f"dicom:{new}",
            patient_source=f"{item['patient_source']}, pseudonym",
        )
        if "listed_id" in item:
            item["listed_id"] = new  # listed in the split file; which listed id is private
        for k2 in ("dicom_key", "series_uid", "dicom"):
            item.pop(k2, None)
    for entry in out["excluded"]:
        if entry.pop("dicom", False):
            new = pseudonym(key, "series", entry.pop("series_uid", None) or entry["id"], "ct-")
            private["cases"][new] = {"id": entry["id"], "path": entry["path"], "excluded": entry["reason"]}
            renamed[entry["id"]] = new
            entry.update(id=new, path=f"dicom:{new}")
    if out.get("split_file"):
        out["split_file"]["unlisted"] = [renamed.get(c, c) for c in out["split_file"]["unlisted"]]
    return out, private
