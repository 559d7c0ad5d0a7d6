"""Build a paired dataset: CT volumes -> resampled CT + PA/lateral DRRs + MONAI datalist, at LIDC-IDRI scale.

Each input CT (NIfTI, HDF5, NPY or a DICOM series folder) is loaded, reoriented to canonical RAS, clipped to
[-1024, 3071] HU (scanners mark outside-FOV voxels with -2048 or -3024, which would bleed into the resampled
edge), resampled onto the target grid (``size^3`` voxels of ``spacing`` mm, centred on the scan, air
(-1024 HU) where the scan has no data) and projected to PA and lateral DRRs with :mod:`common.drr` (or
plastimatch, ``--renderer plastimatch``). Resampling is separable: along an axis that is downsampled each
output voxel is the overlap-weighted mean of the input voxels its box covers (area averaging, against
aliasing); along the others linear interpolation. Why our own and not MONAI ``Resize(area)`` + ``Spacing``:
those took 1.5 s per 512x512x133 CT on one core (``benchmarks/build_pairs.py``), this 0.2 s, with the affine
exact by construction; oblique scans (rotated direction cosines) still go through MONAI ``Spacing``. The layout is the one in
docs/ARCHITECTURE.md. This module is the driver and its CLI; the parts live in library modules:
:mod:`data_prep.resample` (load and resample a CT), :mod:`data_prep.render` (DRRs), :mod:`data_prep.inputs`
(finding inputs, patients, split files, pseudonyms) and :mod:`data_prep.layout` (case folders, datalist,
splits, parts), which :mod:`data_prep.phantom` and :mod:`data_prep.cohort` share.

At scale:

- ``--workers N`` processes cases in N processes (one torch thread each unless there are spare cores).
- ``--part_index i --total_parts n`` handles every n-th case from the i-th (sorted by id), as the batch
  synthesis does, for SLURM arrays or several machines writing one folder; each part writes
  ``parts/part_<i>_of_<n>.json``. When all parts are there the last one to finish writes ``dataset.json``;
  ``python -m data_prep.build_pairs merge <out_root>`` does it explicitly.
- Resumable: a case is done when its ``case.json`` (written last, atomically, after its volumes) carries the
  fingerprint of this run's settings; a killed run continues where it stopped and nothing half-written is
  read (hidden ``.*.part*`` leftovers of killed atomic writes are ignored as inputs and removed from a case's
  folder before it is rebuilt).
- Settings are recorded in ``build_settings.json``: rerunning into the same folder with another size,
  spacing, DRR geometry, detector size or renderer is refused with a message (``--overwrite`` rebuilds
  every case instead), so a datalist never claims a size its cases do not have.

Splits are per patient: the patient is the CSV's (``--patients map.csv``, columns ``case,patient``), else a
``--group_by`` regex on the case id (first group, or the whole match), else the DICOM PatientID, else the
case itself. Patients are assigned deterministically (hash of seed and patient id), so one patient's scans
never straddle training, validation and test. ``--split_file perx2ct|x2ctgan|<file>`` takes the splits from
a published case list instead (see data_prep/splits/README.md).

CLI::

    python -m data_prep.build_pairs <inputs: folder or [list]> <out_root> --size 128 --spacing 2.5 \\
        --geometry x2ctgan --drr_pixels 128 --val_fraction 0.1 --test_fraction 0.1 --seed 0 [--previews] \\
        [--workers 16] [--part_index 0 --total_parts 4] [--group_by 'LIDC-IDRI-\\d{4}' | --patients map.csv] \\
        [--split_file perx2ct [--unlisted_split training]] [--renderer plastimatch | --attenuation plastimatch]
    python -m data_prep.build_pairs merge <out_root>

Privacy: DICOM series get pseudonymous case ids ``ct-<hmac>`` and patients ``pt-<hmac>`` (HMAC-SHA256 keyed
by ``$XRAY2CT_PSEUDONYM_KEY`` or ``<out_root>.pseudonym-key``, mode 0600); the mapping back is written only to
``<out_root>.pseudonyms.json`` (0600) beside the dataset folder. ``--raw_ids`` keeps folder names and PatientIDs.
No other DICOM tag (PatientName, PatientBirthDate, ...) is copied into any output.

DRRs: ``--renderer xray2ct`` (default, :mod:`common.drr`) or ``plastimatch`` (optional package, the renderer
of X2CT-GAN/PerX2CT, same geometry and orientation). ``--attenuation plastimatch`` keeps our fast projector
but converts HU to attenuation as plastimatch does (HU <= -800 counts as air): DRRs like the papers'.
The papers' data conventions (PerX2CT's released model was trained on them): ``--z_spacing slice_thickness``
(DICOM slices spaced by SliceThickness) and ``--drr_hu_offset paper`` (DRRs of HU + 24, their plastimatch
``adjust --pw-linear "0, -1000"`` on HU + 1024 data); see ``bundles/perx2ct/docs/README.md``.
"""


from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from common.atomic import atomic_write_text, remove_partial_files
from common.dicom import Z_SPACINGS
from common.drr import detector_geometry, paper_hu_offset
from common.errors import InputError
from common.io import load_volume, save_volume  # noqa: F401  (save_volume: re-exported, tests patch it here)
from common.preview import save_montage_png
from common.volume import Volume
from data_prep.inputs import (  # noqa: F401  (re-exported: the names build_pairs had before the split)
    VOLUME_SUFFIXES,
    _pseudonymise,
    dicom_identity,
    find_inputs,
    input_case_id,
    plan_cases,
    pseudonym_files,
    pseudonymise_plan,
    read_patient_csv,
)
from data_prep.layout import (  # noqa: F401  (re-exported)
    CT_FILE,
    DATALIST_FILE,
    LABEL_FILE,
    LATERAL_FILE,
    PA_FILE,
    PARTS_DIR,
    SPLITS,
    assign_splits,
    case_dir,
    case_entry,
    case_is_done,
    part_path,
    shard,
    write_case,
    write_datalist,
)
from data_prep.render import ATTENUATIONS, RENDERERS, render_pa_lateral, save_drr  # noqa: F401
from data_prep.resample import (  # noqa: F401  (re-exported)
    HU_CLIP,
    PAD_HU,
    _prepare_ct_oblique,
    _triple,
    load_ct,
    prepare_ct,
)

CASE_META_FILE = "case.json"
PREVIEW_FILE = "preview.png"
REPORT_FILE = "build_report.json"
SETTINGS_FILE = "build_settings.json"
FORMAT_VERSION = 2  # bump when the content written for the same settings changes
CASE_ERRORS = (InputError, ValueError, RuntimeError, OSError, MemoryError)


# ------------------------------------------------------------------------------------- settings / resume
def build_settings(
    size: Sequence[int],
    spacing: Sequence[float],
    geometry: str | dict,
    drr_pixels: int,
    renderer: str = "xray2ct",
    attenuation: str = "xray2ct",
    z_spacing: str = "positions",
    drr_hu_offset: float = 0.0,
) -> dict:
    """Everything that determines a case's files (a case built with other settings is not reused).
    ``z_spacing`` and ``drr_hu_offset`` are recorded only when not the default (older builds stay valid)."""
    if renderer not in RENDERERS:
        raise ValueError(f"unknown renderer {renderer!r}; expected one of {RENDERERS}")
    if renderer == "plastimatch":
        attenuation = "plastimatch"  # plastimatch converts HU itself
    if attenuation not in ATTENUATIONS:
        raise ValueError(f"unknown attenuation {attenuation!r}; expected one of {ATTENUATIONS}")
    return {
        "format_version": FORMAT_VERSION,
        "size": [int(s) for s in size],
        "spacing": [float(s) for s in spacing],
        "geometry": detector_geometry(geometry, int(drr_pixels)).as_dict(),  # resolved once: the jobs take it
        "drr_pixels": int(drr_pixels),
        "renderer": renderer,
        "attenuation": attenuation,
        "hu_clip": list(HU_CLIP),
        **({"z_spacing": z_spacing} if z_spacing != "positions" else {}),
        **({"drr_hu_offset": float(drr_hu_offset)} if drr_hu_offset else {}),
    }


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _describe_settings(s: dict) -> str:
    g = s.get("geometry", {})
    return (
        f"size {s.get('size')}, spacing {s.get('spacing')} mm, geometry {g.get('name')} "
        f"(SAD {g.get('sad')}, SID {g.get('sid')}), {s.get('drr_pixels')} px DRRs, "
        f"renderer {s.get('renderer', 'xray2ct')}, attenuation {s.get('attenuation', 'xray2ct')}"
    )


def check_settings(root: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix settings in one folder (or, with ``overwrite``, record the new ones: all is rebuilt)."""
    path = root / SETTINGS_FILE
    old, same, keys = None, True, ("size", "spacing", "geometry", "drr_pixels")
    if path.is_file():
        old = json.loads(path.read_text())
        same = fingerprint(old) == fingerprint(settings)
    elif (root / DATALIST_FILE).is_file():  # built before settings were recorded: compare what it states
        datalist = json.loads((root / DATALIST_FILE).read_text())
        old = {k: datalist.get(k) for k in keys}
        same = all(old[k] == settings[k] for k in keys)
    if not same and not overwrite:
        raise InputError(
            path,
            f"{root} was built with {_describe_settings(old)}"
            + (
                " by another xray2ct version"
                if old.get("format_version", FORMAT_VERSION) != FORMAT_VERSION
                else ""
            )
            + f"; this run asks for {_describe_settings(settings)}. Write to another folder, or pass "
            "--overwrite to rebuild every case with the new settings.",
        )
    if not path.is_file() or not same:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2))


def read_case_meta(root: Path, case: str) -> dict | None:
    try:
        return json.loads((case_dir(root, case) / CASE_META_FILE).read_text())
    except (OSError, ValueError):
        return None


def case_done(root: Path, case: str, settings_fp: str) -> bool:
    """Built with these settings: ``case.json`` (written last) has the fingerprint and the files exist."""
    meta = read_case_meta(root, case)
    return bool(meta) and meta.get("settings") == settings_fp and case_is_done(root, case)


# ------------------------------------------------------------------------------------- one case (worker)
def _init_worker(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))


def process_case(job: dict) -> dict:
    """Build one case (runs in a worker process); never raises for bad input, returns a result dict."""
    root, case, path = Path(job["root"]), job["id"], job["path"]
    source = job.get("source", path)  # what outputs may say: a DICOM folder's path can name the patient
    result = {"id": case, "path": source}
    t_start = time.perf_counter()
    timings: dict = {}
    try:
        remove_partial_files(case_dir(root, case), recursive=False, min_age_s=0)  # this worker owns the case
        (case_dir(root, case) / CASE_META_FILE).unlink(missing_ok=True)  # not done until rewritten
        t0 = time.perf_counter()
        vol = load_ct(path, job.get("z_spacing", "positions"))
        t1 = time.perf_counter()
        ct = prepare_ct(vol, job["spacing"], job["size"])
        ct.validate(path)
        del vol
        t2 = time.perf_counter()
        timings.update(load=t1 - t0, prepare=t2 - t1)
        drrs = write_case(
            root, case, ct, job["geometry"], renderer=job["renderer"], timings=timings,
            attenuation=job["attenuation"], hu_offset=job.get("drr_hu_offset", 0.0),
        )  # fmt: skip
        if job["previews"]:
            t3 = time.perf_counter()
            result["preview"] = _save_preview(root, case, ct, drrs)
            timings["preview"] = time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t_start
        meta = {
            "id": case,
            "source": str(source),
            "patient": job["patient"],
            "settings": job["settings_fp"],
            "seconds": {k: round(v, 4) for k, v in timings.items()},
            "process_peak_rss_mb": _peak_rss_mb(),
        }
        atomic_write_text(case_dir(root, case) / CASE_META_FILE, json.dumps(meta, indent=2))
        result.update(status="written", seconds=meta["seconds"])
    except CASE_ERRORS as e:
        result.update(status="failed", error=str(e).replace(str(path), str(source)))
    except Exception as e:  # anything else about one case must not stop the batch either
        result.update(
            status="failed", error=f"{source}: {type(e).__name__}: {e}".replace(str(path), str(source))
        )
    return result


def _peak_rss_mb() -> float | None:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB
    except (ImportError, OSError):
        return None


def _save_preview(root: Path, case: str, ct: Volume, drrs: dict) -> str:
    """``<case>/preview.png``: axial/coronal/sagittal of the CT (lung window) and both DRRs."""
    return save_montage_png(
        root / case / PREVIEW_FILE, {case: ct}, xrays={"PA": drrs["pa"], "lateral": drrs["lateral"]}
    )


def _preview_from_files(root: Path, case: str) -> str:
    ct = load_volume(case_dir(root, case) / CT_FILE)
    drrs = {
        v: np.asarray(nib.load(case_dir(root, case) / f).dataobj)
        for v, f in (("pa", PA_FILE), ("lateral", LATERAL_FILE))
    }
    return _save_preview(root, case, ct, drrs)


def _run_jobs(jobs: list[dict], workers: int, desc: str):
    """Yield :func:`process_case` results, in a pool of ``workers`` processes (spawned: safe with torch)."""
    if workers <= 1 or len(jobs) <= 1:
        for job in tqdm(jobs, desc=desc, unit="case"):
            yield process_case(job)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:  # fmt: skip
        futures = {pool.submit(process_case, job): job for job in jobs}
        for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="case"):
            job = futures[fut]
            try:
                yield fut.result()
            except Exception as e:  # a worker killed (out of memory...): the case is retried on resume
                yield {"id": job["id"], "path": job["path"], "status": "failed",
                       "error": f"worker process failed ({type(e).__name__}: {e})"}  # fmt: skip


# ---------------------------------------------------------------------------------------------- main
def build_pairs(
    inputs: str | Sequence[str],
    out_root: str,
    size: int = 128,
    spacing: float = 2.5,
    geometry: str = "x2ctgan",
    drr_pixels: int = 128,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    previews: bool = False,
    overwrite: bool = False,
    workers: int = 1,
    part_index: int = 0,
    total_parts: int = 1,
    group_by: str | None = None,
    patients: str | None = None,
    split_file: str | None = None,
    unlisted_split: str | None = None,
    renderer: str = "xray2ct",
    attenuation: str = "xray2ct",
    raw_ids: bool = False,
    z_spacing: str = "positions",
    drr_hu_offset: float | str = 0.0,
) -> dict:
    """Convert CTs to the paired dataset layout; returns (and writes to build_report.json) a summary.

    DICOM series get pseudonymous case and patient ids (:func:`pseudonymise_plan`; key and mapping in
    ``<out_root>.pseudonym-key`` / ``<out_root>.pseudonyms.json`` beside the folder, mode 0600) unless
    ``raw_ids``: then their folder names and PatientIDs go into the datalist and reports as they are.

    PerX2CT's data conventions, to feed its released model data like its training data: ``z_spacing
    "slice_thickness"`` (DICOM inputs spaced by SliceThickness, :mod:`data_prep.dicom_to_nifti`) and
    ``drr_hu_offset "paper"`` (the geometry preset's paper offset, +24 HU for x2ctgan/perx2ct: their DRRs
    are of HU + 24, :data:`common.drr.PAPER_DRR_HU_OFFSET`), or a number of HU. The CT stays in HU.

    With ``total_parts > 1`` this run builds its part only and writes ``parts/part_<i>_of_<n>.json``; the
    datalist is written once every part has finished (by the last one, or by :func:`merge_parts`), and the
    returned summary is then the merged one (else ``datalist`` is None).
    """
    total_parts, part_index, workers = int(total_parts), int(part_index), int(workers)
    shard([], part_index, total_parts)  # checks the part numbers before anything is read
    root = Path(out_root)
    spacing3, size3 = _triple(spacing), _triple(size, int)
    if z_spacing not in Z_SPACINGS:
        raise ValueError(f"z_spacing must be one of {Z_SPACINGS}, got {z_spacing!r}")
    hu_offset = paper_hu_offset(geometry) if drr_hu_offset == "paper" else float(drr_hu_offset)
    settings = build_settings(size3, spacing3, geometry, drr_pixels, renderer, attenuation, z_spacing, hu_offset)
    settings_fp = fingerprint(settings)
    plan = plan_cases(inputs, group_by, patients, split_file, unlisted_split)
    sources = _pseudonymise(plan, root) if not raw_ids else {}
    if sources:
        plan = sources.pop("")
    check_settings(root, settings, overwrite)
    mine = shard(plan["cases"], part_index, total_parts, key=lambda c: c["id"])

    results, jobs = [], []
    for item in mine:
        if not overwrite and case_done(root, item["id"], settings_fp):
            res = {"id": item["id"], "path": item["path"], "status": "skipped_existing"}
            if previews and not (case_dir(root, item["id"]) / PREVIEW_FILE).is_file():
                res["preview"] = _preview_from_files(root, item["id"])
            results.append(res)
            continue
        jobs.append(dict(root=str(root), id=item["id"], path=sources.get(item["id"], item["path"]),
                         source=item["path"], patient=item["patient"],
                         size=size3, spacing=spacing3, geometry=settings["geometry"],
                         renderer=renderer, attenuation=settings["attenuation"], previews=bool(previews),
                         settings_fp=settings_fp, z_spacing=z_spacing, drr_hu_offset=hu_offset))  # fmt: skip
    desc = "build_pairs" if total_parts == 1 else f"build_pairs part {part_index + 1}/{total_parts}"
    for res in _run_jobs(jobs, workers, desc):
        if res["status"] == "failed":
            tqdm.write(f"skipped {res['id']}: {res['error']}")
        results.append(res)

    part = {
        "format_version": FORMAT_VERSION,
        "settings": settings_fp,
        "plan": fingerprint(plan),
        "part_index": part_index,
        "total_parts": total_parts,
        "workers": workers,
        "split_options": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
        "results": sorted(results, key=lambda r: r["id"]),
    }
    if part_index == 0:
        part["plan_content"] = plan  # the whole plan once; the other parts carry its fingerprint
    parts_dir = root / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(parts_dir, recursive=False)  # stale ones only: other parts may be writing now
    for stale in parts_dir.glob("part_*_of_*.json"):
        if not stale.name.endswith(f"_of_{total_parts:04d}.json"):
            stale.unlink(missing_ok=True)  # from an earlier run split another way
    atomic_write_text(part_path(root, part_index, total_parts), json.dumps(part, indent=2))
    done = sum(r["status"] == "written" for r in results)
    failed = [r for r in results if r["status"] == "failed"]
    print(
        f"{done} written, {sum(r['status'] == 'skipped_existing' for r in results)} already done, "
        f"{len(failed)} failed" + (f" (part {part_index + 1}/{total_parts})" if total_parts > 1 else "")
        + "".join(f"\n  FAILED {f['id']}: {f['error']}" for f in failed)
    )  # fmt: skip
    missing_parts = [i for i in range(total_parts) if not part_path(root, i, total_parts).is_file()]
    if missing_parts:
        print(f"parts still to run: {missing_parts}; then `python -m data_prep.build_pairs merge {root}`")
        return {"out_root": str(root), "part_index": part_index, "total_parts": total_parts,
                "written": [r["id"] for r in results if r["status"] == "written"],
                "skipped_existing": [r["id"] for r in results if r["status"] == "skipped_existing"],
                "failed": failed, "datalist": None}  # fmt: skip
    if total_parts == 1:
        return merge_parts(str(root), total_parts=1)
    try:  # the last part to finish merges; a stale or unfinished part only postpones it
        return merge_parts(str(root), total_parts=total_parts)
    except InputError as e:
        print(f"not merged yet: {e}")
        return {"out_root": str(root), "part_index": part_index, "total_parts": total_parts, "datalist": None}


def merge_parts(out_root: str, total_parts: int | None = None) -> dict:
    """Write ``dataset.json`` and ``build_report.json`` from the finished parts of a build.

    Refuses (naming what to rerun) when a part is missing, ran other inputs or options, or a planned case is
    neither built nor reported failed. Only cases whose ``case.json`` matches the recorded settings enter
    the datalist.
    """
    root = Path(out_root)
    if not (root / SETTINGS_FILE).is_file():
        raise InputError(root / SETTINGS_FILE, "not found: run build_pairs into this folder first")
    settings = json.loads((root / SETTINGS_FILE).read_text())
    settings_fp = fingerprint(settings)
    files = sorted((root / PARTS_DIR).glob("part_*_of_*.json"))
    totals = sorted({int(f.stem.rsplit("_of_", 1)[1]) for f in files})
    if total_parts is None:
        if len(totals) != 1:
            raise InputError(
                root / PARTS_DIR, f"need --total_parts: part files for {totals or 'no'} part counts"
            )
        total_parts = totals[0]
    total_parts = int(total_parts)
    missing = [i for i in range(total_parts) if not part_path(root, i, total_parts).is_file()]
    if missing:
        raise InputError(
            root / PARTS_DIR, f"parts {missing} of {total_parts} have not finished: run them first"
        )
    parts = [json.loads(part_path(root, i, total_parts).read_text()) for i in range(total_parts)]
    plan = parts[0].get("plan_content")
    if plan is None:
        raise InputError(part_path(root, 0, total_parts), "part 0 carries no plan: rerun part 0")
    plan_fp = fingerprint(plan)
    stale = [p["part_index"] for p in parts if p["settings"] != settings_fp or p["plan"] != plan_fp
             or p["split_options"] != parts[0]["split_options"]]  # fmt: skip
    if stale:
        raise InputError(
            root / PARTS_DIR,
            f"parts {stale} were run with other inputs or options than part 0 (or before the settings "
            "changed): rerun them with the same arguments",
        )
    results = {r["id"]: r for p in parts for r in p["results"]}
    entries, failed, not_built = [], [], []
    for item in plan["cases"]:
        case = item["id"]
        if case_done(root, case, settings_fp):
            entry = case_entry(root, case, settings["spacing"])
            entry["patient"] = item["patient"]
            entries.append(entry)
        elif results.get(case, {}).get("status") == "failed":
            failed.append({k: results[case][k] for k in ("id", "path", "error")})
        else:
            not_built.append(case)
    if not_built:
        raise InputError(
            root, f"{len(not_built)} planned case(s) are not built: {not_built[:10]}; rerun their parts"
        )

    options = parts[0]["split_options"]
    val_fraction, test_fraction, seed = options["val_fraction"], options["test_fraction"], options["seed"]
    splits, notes = None, {}
    built = {e["id"] for e in entries}
    patients = {item["id"]: item["patient"] for item in plan["cases"] if item["id"] in built}
    if plan["split_file"] is not None:
        splits = {item["id"]: item["split"] for item in plan["cases"] if item["id"] in built}
        listed_train = [i["id"] for i in plan["cases"] if i["id"] in built and i["split"] == "training"
                        and "listed_id" in i]  # fmt: skip
        if not any(s == "validation" for s in splits.values()) and val_fraction > 0 and listed_train:
            # the list has no validation cases (X2CT-GAN): carve them from its training cases, by patient
            carved = assign_splits(listed_train, val_fraction, 0.0, seed, groups=patients)
            splits.update({c: s for c, s in carved.items() if s == "validation"})
            notes["validation_carved_from_training"] = sorted(
                c for c, s in carved.items() if s == "validation"
            )
    else:
        splits = assign_splits(sorted(built), val_fraction, test_fraction, seed, groups=patients)
    by_patient: dict[str, set] = {}
    for case, split in splits.items():
        by_patient.setdefault(patients[case], set()).add(split)
    straddling = sorted(p for p, s in by_patient.items() if len(s & set(SPLITS)) > 1)
    if straddling:
        print(f"WARNING: patients with scans in several splits (as the split file says): {straddling}")

    extra = {"patients": len(by_patient), "build_settings": settings_fp}
    if plan["split_file"] is not None:
        extra["split_file"] = {k: plan["split_file"][k] for k in ("name", "listed", "found")}
    datalist = None
    if entries:
        datalist = write_datalist(
            root, entries, settings["spacing"], settings["size"], settings["geometry"],
            val_fraction, test_fraction, seed, splits=splits, extra=extra,
            description="xray2ct paired CT/DRR dataset (data_prep.build_pairs)",
        )  # fmt: skip
    metas = [read_case_meta(root, e["id"]) or {} for e in entries]
    rss = [m["process_peak_rss_mb"] for m in metas if m.get("process_peak_rss_mb")]
    summary = {
        "out_root": str(root),
        "inputs": len(plan["cases"]) + len(plan["excluded"]),
        "settings": settings,
        "total_parts": total_parts,
        "written": sorted(r["id"] for r in results.values() if r["status"] == "written"),
        "skipped_existing": sorted(r["id"] for r in results.values() if r["status"] == "skipped_existing"),
        "failed": failed,
        "excluded": plan["excluded"],
        "split_file": plan["split_file"],
        "split_counts": {
            s: sum(v == s for v in splits.values()) for s in sorted(set(splits.values()) | set(SPLITS))
        },
        "patients": len(by_patient),
        "patients_in_several_splits": straddling,
        "previews": sorted(r["preview"] for r in results.values() if r.get("preview")) or None,
        "seconds_per_case": _mean_timings([m.get("seconds", {}) for m in metas]),
        "worker_peak_rss_mb": max(rss) if rss else None,
        "datalist": datalist,
        **notes,
    }
    atomic_write_text(root / REPORT_FILE, json.dumps(summary, indent=2))
    if plan["split_file"] is not None:
        sf = plan["split_file"]
        print(
            f"split file {sf['name']}: found {sf['found']} of {sf['listed']} listed; missing "
            f"{ {s: len(v) for s, v in sf['missing'].items()} }; {len(sf['unlisted'])} input(s) not listed "
            + (f"-> '{sf['unlisted_split']}'" if sf["unlisted_split"] else "(left out)")
        )
    print(f"datalist: {datalist} {summary['split_counts']} ({len(failed)} failed)")
    return summary


def _mean_timings(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    return {k: round(float(np.mean([r[k] for r in rows if k in r])), 4) for k in keys}


@functools.wraps(build_pairs)  # fire reads build_pairs' signature, so --help works
def _cli(*args, **kwargs) -> None:
    """CLI entry: the summary goes to build_report.json (printing it would flood the terminal)."""
    build_pairs(*args, **kwargs)


@functools.wraps(merge_parts)
def _cli_merge(*args, **kwargs) -> None:
    merge_parts(*args, **kwargs)


if __name__ == "__main__":
    import sys

    import fire

    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        fire.Fire(_cli_merge, command=sys.argv[2:])
    else:
        fire.Fire(_cli)
