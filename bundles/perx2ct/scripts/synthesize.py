"""Batch synthesis of CT volumes from an Indiana/OpenI-style chest X-ray collection.

    python -m bundles.perx2ct.scripts.synthesize --reports_csv indiana_reports.csv \\
        --projections_csv indiana_projections.csv --image_dir images/ --output_dir synth/ \\
        [--bundle_root bundles/perx2ct] [--format h5|nii.gz|npy] [--start_from 0 --end_at 1000] \\
        [--part_index 0 --total_parts 4] [--device cuda]

``projections_csv`` has ``uid``, ``projection`` (``Frontal`` / ``Lateral``) and ``filename`` (relative to
``image_dir``); ``reports_csv`` lists the uids to process (column ``uid``). Each uid gets ``<output_dir>/<name>_ct.<format>``
(the one writer's naming, :func:`common.predictor.write_prediction`; written atomically; finished volumes are
skipped, so a killed job resumes, also one that wrote ``<name>_ct_synthetic.<format>`` before release 0.4.0) and
a row in ``projections_synth.csv`` (``uid``, ``volume``, ``frontal``,
``lateral``; ``volume`` is the file name inside ``output_dir``). ``<name>`` is the uid itself when it is
a plain file name (letters, digits, ``.``, ``_``, ``-``); any other uid (``../../x``, ``sub/dir``, spaces)
is mapped to a safe name plus a hash of the uid (:func:`common.datalist.safe_case_name`), so every output stays inside
``output_dir``. Any failure for one uid (no frontal or lateral view, an unreadable or oversized image
such as a PNG declaring 60000 x 60000 pixels, an inference error) is listed with its reason in
``skipped.csv`` / ``skipped.json`` and the batch goes on; only Ctrl-C stops it. Sharding: uids
``[start_from, end_at)`` of the reports, then every ``total_parts``-th from ``part_index`` (SLURM array
task / torchrun rank); per-part CSVs are suffixed ``.part<k>of<n>`` when sharded.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence

from tqdm import tqdm

from common.atomic import atomic_write_text, remove_partial_files
from common.datalist import safe_case_name as safe_uid_name
from common.errors import InputError, require_file
from common.predictor import FORMATS, prediction_paths, write_prediction
from common.tables import csv_text

SUFFIXES = FORMATS  # the one writer's formats
LEGACY_NAME = "ct_synthetic"  # the name before the one writer (release 0.4.0): still found when resuming
logger = logging.getLogger(__name__)


def read_uids(reports_csv: str) -> list[str]:
    """uids in report order, without duplicates."""
    with open(require_file(reports_csv), newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "uid" not in reader.fieldnames:
            raise InputError(reports_csv, "reports CSV needs a 'uid' column")
        return list(dict.fromkeys(row["uid"].strip() for row in reader if row.get("uid", "").strip()))


def read_projections(projections_csv: str) -> dict[str, dict[str, str]]:
    """uid -> {"frontal": filename, "lateral": filename} (first file of each projection)."""
    with open(require_file(projections_csv), newline="") as f:
        reader = csv.DictReader(f)
        missing = {"uid", "projection", "filename"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(projections_csv, f"projections CSV lacks columns {sorted(missing)}")
        views: dict[str, dict[str, str]] = {}
        for row in reader:
            kind = row["projection"].strip().lower()
            if kind in ("frontal", "lateral"):
                views.setdefault(row["uid"].strip(), {}).setdefault(kind, row["filename"].strip())
    return views


def select_part(
    uids: Sequence[str], start_from: int, end_at: int | None, part_index: int, total_parts: int
) -> list:
    if total_parts < 1 or not 0 <= part_index < total_parts:
        raise ValueError(f"need 0 <= part_index < total_parts, got {part_index}/{total_parts}")
    return list(uids[start_from:end_at])[part_index::total_parts]


def _csv_text(rows: list[dict], fields: Sequence[str]) -> str:
    return csv_text(rows, fields)  # uids and reasons made spreadsheet-safe


def synthesize(
    reports_csv: str,
    projections_csv: str,
    image_dir: str,
    output_dir: str,
    bundle_root: str | None = None,
    checkpoint: str | None = None,
    config_files: Sequence[str] | str | None = None,
    format: str = "h5",
    start_from: int = 0,
    end_at: int | None = None,
    part_index: int = 0,
    total_parts: int = 1,
    device: str | None = None,
    predictor=None,
) -> dict:
    """Synthesize one CT per uid; returns a summary dict (also the CLI's printed result)."""
    from bundles.perx2ct.scripts.inference import BUNDLE_ROOT, PerX2CTInference

    fmt = str(format).lstrip(".")
    if fmt not in FORMATS:
        raise InputError(None, f"unknown --format {format!r}; choose from {sorted(FORMATS)}")
    uids = select_part(read_uids(reports_csv), int(start_from), end_at, int(part_index), int(total_parts))
    views = read_projections(projections_csv)
    if predictor is None:
        if isinstance(config_files, str):
            config_files = [config_files]
        device = device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
        predictor = PerX2CTInference.from_bundle(bundle_root or BUNDLE_ROOT, checkpoint, config_files, device)
    os.makedirs(output_dir, exist_ok=True)
    remove_partial_files(output_dir, recursive=False)  # leftovers of a killed run (none of a live shard's)
    rows, skipped, done = [], [], 0
    for uid in tqdm(uids, desc=f"synthesize part {part_index + 1}/{total_parts}", unit="uid"):
        target = prediction_paths(output_dir, uid, ["ct"], fmt)["ct"]
        legacy = os.path.join(output_dir, f"{safe_uid_name(uid)}_{LEGACY_NAME}{FORMATS[fmt]}")
        if not os.path.exists(target) and os.path.exists(legacy):
            target = legacy
        files = views.get(uid, {})
        absent = [k for k in ("frontal", "lateral") if k not in files]
        if absent:
            skipped.append(
                {"uid": uid, "reason": f"no {' and no '.join(absent)} view in the projections CSV"}
            )
            continue
        paths = {k: os.path.join(image_dir, v) for k, v in files.items()}
        row = {
            "uid": uid,
            "volume": os.path.basename(target),
            "frontal": files["frontal"],
            "lateral": files["lateral"],
        }
        if os.path.exists(target):  # finished by an earlier run: atomic writes never leave partial files
            rows.append(row)
            done += 1
            continue
        try:
            prediction = predictor.infer({"pa": paths["frontal"], "lateral": paths["lateral"]})
            write_prediction(prediction, output_dir, uid, fmt, previews=False)
        except InputError as e:
            skipped.append({"uid": uid, "reason": str(e)})
            continue
        except Exception as e:  # one uid's failure (a decoder's error, out of memory) must not end the batch
            logger.warning("uid %s failed: %s: %s", uid, type(e).__name__, e)
            skipped.append({"uid": uid, "reason": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
    tag = "" if int(total_parts) == 1 else f".part{part_index}of{total_parts}"
    atomic_write_text(
        os.path.join(output_dir, f"projections_synth{tag}.csv"),
        _csv_text(rows, ["uid", "volume", "frontal", "lateral"]),
    )
    atomic_write_text(os.path.join(output_dir, f"skipped{tag}.csv"), _csv_text(skipped, ["uid", "reason"]))
    atomic_write_text(os.path.join(output_dir, f"skipped{tag}.json"), json.dumps(skipped, indent=2) + "\n")
    summary = {"uids": len(uids), "written": len(rows) - done, "already_done": done, "skipped": len(skipped)}
    return summary


def main() -> None:
    import fire

    fire.Fire(synthesize)


if __name__ == "__main__":
    main()
