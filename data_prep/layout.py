"""The dataset layout, written by every dataset builder (build_pairs, phantom, cohort): case folders, the
datalist, the split assignment and the sharding of a build into parts. A library: no CLI here.

Layout (docs/ARCHITECTURE.md)::

    <root>/dataset.json                  MONAI datalist: training/validation/test + geometry, spacing, size...
    <root>/<case>/ct.nii.gz              int16 HU, canonical RAS
    <root>/<case>/pa.nii.gz, lateral.nii.gz   DRRs (H, W) float32 in [0, 1], detector pixel size in the affine
    <root>/<case>/label.json, <key>.nii.gz    optional label and extra volumes
    <root>/parts/part_<i>_of_<n>.json    one per part of a sharded build (:func:`shard`)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_text
from common.drr import DRRGeometry, get_geometry
from common.intensity import XRAY2CT
from common.io import save_volume
from common.volume import Volume
from data_prep.render import render_pa_lateral, save_drr

CT_FILE, PA_FILE, LATERAL_FILE, LABEL_FILE = "ct.nii.gz", "pa.nii.gz", "lateral.nii.gz", "label.json"
DATALIST_FILE = "dataset.json"
PARTS_DIR = "parts"
SPLITS = ("training", "validation", "test")
SPLIT_HASHES = ("sha256", "md5")


def case_dir(root: str | os.PathLike, case: str) -> Path:
    return Path(root) / case


def case_is_done(root: str | os.PathLike, case: str, extra_files: Iterable[str] = ()) -> bool:
    """All of a case's files exist (they are written atomically, so they are complete)."""
    folder = case_dir(root, case)
    return all((folder / name).is_file() for name in (CT_FILE, PA_FILE, LATERAL_FILE, *extra_files))


def write_case(
    root: str | os.PathLike,
    case: str,
    ct: Volume,
    geometry: DRRGeometry | dict,
    label: dict | None = None,
    extra_volumes: dict[str, Volume] | None = None,
    renderer: str = "xray2ct",
    timings: dict | None = None,
    attenuation: str = "xray2ct",
    hu_offset: float = 0.0,
) -> dict[str, np.ndarray]:
    """Write ``ct.nii.gz`` (int16 HU), its PA/lateral DRRs, ``label.json`` and ``<key>.nii.gz`` extras.
    ``geometry``: the dataset's camera at the DRRs' pixel count (:func:`common.drr.detector_geometry`, resolved
    once by the builder; its ``as_dict`` in worker processes). ``hu_offset``: added to the HU for the DRRs only (:func:`render_pa_lateral`).

    Returns the DRR images. The CT is stored as int16 (whole HU, the scanner's own precision); the DRRs
    are rendered from exactly the stored values. ``timings`` (optional) receives seconds per step.
    """
    folder = case_dir(root, case)
    folder.mkdir(parents=True, exist_ok=True)
    ct = ct.with_array(np.rint(ct.array).astype(np.int16))
    t0 = time.perf_counter()
    geometry = get_geometry(geometry)
    drrs = render_pa_lateral(ct, geometry, renderer, attenuation, hu_offset)
    t1 = time.perf_counter()
    pixel = geometry.detector_spacing
    for key, vol in (extra_volumes or {}).items():
        save_volume(vol.with_array(np.rint(vol.array).astype(np.int16)), folder / f"{key}.nii.gz")
    if label is not None:
        atomic_write_text(folder / LABEL_FILE, json.dumps(label, indent=2))
    save_drr(drrs["pa"], folder / PA_FILE, pixel)
    save_drr(drrs["lateral"], folder / LATERAL_FILE, pixel)
    save_volume(ct, folder / CT_FILE)
    if timings is not None:
        timings.update(drr=t1 - t0, write=time.perf_counter() - t1)
    return drrs


def case_entry(
    root: str | os.PathLike,
    case: str,
    spacing: Sequence[float],
    label: int | None = None,
    extra: dict[str, str] | None = None,
) -> dict:
    """A datalist item; paths are relative to the datalist folder (``load_decathlon_datalist`` resolves them)."""
    entry = {
        "id": case,
        "ct": f"{case}/{CT_FILE}",
        "pa": f"{case}/{PA_FILE}",
        "lateral": f"{case}/{LATERAL_FILE}",
    }
    entry["spacing"] = [float(s) for s in spacing]
    if label is not None:
        entry["label"] = int(label)
    for key, name in (extra or {}).items():
        entry[key] = f"{case}/{name}"
    return entry


def split_order(keys: Iterable[str], seed: int = 0, split_hash: str = "sha256") -> list[str]:
    """``keys`` in the deterministic order the splits are cut from (no random state, listing order ignored).

    ``"sha256"``: by SHA-256 of ``"<seed>:<key>"``; ``"md5"``: by MD5 of the key alone (the seed is not used).
    """
    if split_hash == "sha256":
        return sorted(keys, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    if split_hash == "md5":
        return sorted(keys, key=lambda c: hashlib.md5(c.encode()).hexdigest())
    raise ValueError(f"split_hash must be one of {SPLIT_HASHES}, got {split_hash!r}")


def _cut(patients: list[str], val_fraction: float, test_fraction: float, split_hash: str) -> dict[str, str]:
    """Patient -> split for one ordered stratum. ``"sha256"``: the first ``round(n * test)`` (halves up) go to
    test, the next ``round(n * val)`` to validation. ``"md5"`` keeps prepare_pairs' rule before the two met:
    validation first, Python's ``round`` (halves to even), at least one validation patient when n >= 2 and
    one test patient when n >= 3, training never empty."""
    n = len(patients)
    if split_hash == "md5":
        n_val = max(1, round(val_fraction * n)) if n >= 2 and val_fraction > 0 else 0
        wanted = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
        n_test = min(wanted, max(0, n - n_val - 1))
        cuts = ((SPLITS[1], n_val), (SPLITS[2], n_test))
    else:
        n_test = int(math.floor(n * test_fraction + 0.5))
        n_val = int(math.floor(n * val_fraction + 0.5))
        cuts = ((SPLITS[2], n_test), (SPLITS[1], n_val))
    out, start = {}, 0
    for split, count in cuts:
        out.update({p: split for p in patients[start : start + count]})
        start += count
    out.update({p: SPLITS[0] for p in patients[start:]})
    return out


def assign_splits(
    case_ids: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    strata: dict[str, int] | None = None,
    groups: dict[str, str] | None = None,
    split_hash: str = "sha256",
) -> dict[str, str]:
    """case id -> "training" | "validation" | "test"; deterministic, by patient, stratified by ``strata``.

    The one split assignment of every dataset writer (build_pairs, phantom, cohort, prepare_pairs).
    ``groups`` maps case -> patient (default: each case is its own patient); all of a patient's cases get
    the patient's split. Within each stratum (of a patient's first case) patients are ordered by
    :func:`split_order` and cut by :func:`_cut`. A patient keeps its split when others are added unless it
    sits at a boundary, and no random state is involved. ``split_hash="md5"`` reproduces the splits that
    prepare_pairs wrote before the rule was shared (docs/ARCHITECTURE.md, "Splits").
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val, test and val + test < 1, got {val_fraction}, {test_fraction}")
    if split_hash not in SPLIT_HASHES:
        raise ValueError(f"split_hash must be one of {SPLIT_HASHES}, got {split_hash!r}")
    members: dict[str, list[str]] = {}
    for case in sorted(case_ids):
        members.setdefault(case if groups is None else groups.get(case, case), []).append(case)
    by_stratum: dict = {}
    for patient, cases in members.items():
        by_stratum.setdefault(None if strata is None else strata.get(cases[0]), []).append(patient)
    splits = {}
    for patients in by_stratum.values():
        ordered = split_order(patients, seed, split_hash)
        for patient, split in _cut(ordered, val_fraction, test_fraction, split_hash).items():
            for case in members[patient]:
                splits[case] = split
    return splits


def write_datalist(
    root: str | os.PathLike,
    entries: Sequence[dict],
    spacing: Sequence[float],
    size: Sequence[int],
    geometry: DRRGeometry | dict,
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    strata: dict[str, int] | None = None,
    description: str = "",
    splits: dict[str, str] | None = None,
    extra: dict | None = None,
) -> str:
    """Write ``<root>/dataset.json`` (MONAI datalist + geometry, spacing, HU window); returns its path.

    ``geometry``: the camera at the DRRs' pixel count, as :func:`write_case` rendered them (stored as is, with
    ``drr_pixels`` its side; :func:`common.datalist.dataset_geometry` reads it back).

    Splits are :func:`assign_splits` of the entries (grouped by their ``patient`` key when present), or
    ``splits`` (case id -> split name; names beyond the three standard ones become extra datalist keys).
    """
    if splits is None:
        groups = {e["id"]: e["patient"] for e in entries if "patient" in e}
        splits = assign_splits([e["id"] for e in entries], val_fraction, test_fraction, seed, strata, groups)
    geometry = get_geometry(geometry)
    datalist: dict = {name: [] for name in SPLITS}
    for entry in sorted(entries, key=lambda e: e["id"]):
        datalist.setdefault(splits[entry["id"]], []).append(entry)
    datalist.update(
        description=description,
        geometry=geometry.as_dict(),
        spacing=[float(s) for s in spacing],
        size=[int(s) for s in size],
        drr_pixels=int(geometry.detector_pixels[0]),
        hu_window=XRAY2CT.as_dict(),
        ct_orientation="RAS",
        split={"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
    )
    datalist.update(extra or {})
    path = Path(root) / DATALIST_FILE
    atomic_write_text(path, json.dumps(datalist, indent=2))
    return str(path)


def shard(items: Iterable, part_index: int, total_parts: int, key=None) -> list:
    """The items part ``part_index`` of ``total_parts`` handles: every n-th of the sorted items from the i-th."""
    if total_parts < 1 or not 0 <= part_index < total_parts:
        raise ValueError(f"need 0 <= part_index < total_parts, got {part_index}/{total_parts}")
    return sorted(items, key=key)[part_index::total_parts]


def part_path(root: str | os.PathLike, index: int, total: int) -> Path:
    """``<root>/parts/part_<i>_of_<n>.json``: what part ``i`` of ``n`` built (the merge reads them all)."""
    return Path(root) / PARTS_DIR / f"part_{index:04d}_of_{total:04d}.json"
