"""Build a paired dataset: CT volumes -> resampled CT + PA/lateral DRRs + MONAI datalist.

Each input CT (NIfTI, HDF5, NPY or a DICOM series folder) is loaded with :func:`common.io.load_volume`,
reoriented to canonical RAS, clipped to [-1024, 3071] HU (scanners mark outside-FOV voxels with -2048 or
-3024, which would bleed into the resampled edge), area-averaged along downsampled axes (MONAI ``Resize``
mode "area", against aliasing), resampled to the exact target spacing with MONAI ``Spacing`` (bilinear;
MONAI rather than scipy because it carries the affine along, so spacing and origin stay exact), centre-cropped/padded to ``size^3`` with MONAI ``ResizeWithPadOrCrop`` (padding -1024 HU = air),
and projected to PA and lateral DRRs with :mod:`common.drr`. The layout is the one in
docs/ARCHITECTURE.md; the writing helpers here are shared with :mod:`data_prep.phantom`.

Resumable: a case whose files all exist is skipped (every file is written atomically, so existing means
complete). A case that fails (unreadable, wrong shape, NaN...) is reported and skipped.

CLI::

    python -m data_prep.build_pairs <inputs: folder or [list]> <out_root> --size 128 --spacing 2.5 \\
        --geometry x2ctgan --drr_pixels 128 --val_fraction 0.1 --test_fraction 0.1 --seed 0 [--previews]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from common.atomic import atomic_path, atomic_write_text
from common.errors import InputError, require_file
from common.intensity import XRAY2CT, hu_to_mu
from common.io import load_volume, save_volume
from common.volume import Volume

CT_FILE, PA_FILE, LATERAL_FILE, LABEL_FILE = "ct.nii.gz", "pa.nii.gz", "lateral.nii.gz", "label.json"
DATALIST_FILE = "dataset.json"
REPORT_FILE = "build_report.json"
PAD_HU = -1024.0
HU_CLIP = (-1024.0, 3071.0)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".h5", ".hdf5", ".npy")
SPLITS = ("training", "validation", "test")


# ---------------------------------------------------------------------------------------- CT preparation
def _triple(value: float | Sequence[float], cast=float) -> tuple:
    return tuple(cast(v) for v in np.broadcast_to(np.asarray(value), (3,)))


def prepare_ct(vol: Volume, spacing: float | Sequence[float], size: int | Sequence[int]) -> Volume:
    """Canonical RAS, HU clipped, resampled to ``spacing`` mm and centre-cropped/padded to ``size``."""
    from monai.data import MetaTensor
    from monai.transforms import Resize, ResizeWithPadOrCrop, Spacing

    spacing, size = _triple(spacing), _triple(size, int)
    vol = vol.to_canonical()
    array = np.clip(vol.array.astype(np.float32), *HU_CLIP)
    img = MetaTensor(torch.from_numpy(array[None]), affine=torch.from_numpy(vol.affine))
    # Downsampled axes are first area-averaged (MONAI Resize "area" = adaptive average pooling: anti-aliased
    # and ~50x faster on a 512^2 CT than Gaussian smoothing); Spacing then lands on the exact spacing.
    coarse = [max(1, round(n * s / t)) if t > s else n for n, s, t in zip(vol.shape, vol.spacing, spacing)]
    if tuple(coarse) != vol.shape:
        img = Resize(spatial_size=coarse, mode="area")(img)
    img = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border")(img)
    img = ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=PAD_HU)(img)
    return Volume(img.array[0].astype(np.float32), np.asarray(img.affine, dtype=np.float64))


# ----------------------------------------------------------------------------------------------- DRRs
def render_pa_lateral(
    ct: Volume, geometry: str | dict = "x2ctgan", drr_pixels: int = 128
) -> dict[str, np.ndarray]:
    """PA and lateral DRR images (H, W) float32 in [0, 1] of a canonical-RAS HU volume."""
    from common.drr import drr_to_image, get_geometry, render_drr

    geom = get_geometry(geometry).resized(drr_pixels)
    mu = hu_to_mu(torch.from_numpy(np.ascontiguousarray(ct.array, dtype=np.float32)))[None, None]
    with torch.no_grad():
        return {
            view: drr_to_image(render_drr(mu, ct.spacing, geom, view=view))[0, 0].numpy().astype(np.float32)
            for view in ("pa", "lateral")
        }


def save_drr(image: np.ndarray, path: str | os.PathLike, pixel_spacing: Sequence[float]) -> str:
    """Write a DRR (H, W) as a 2D NIfTI (array kept as (H, W); affine holds the detector pixel size)."""
    if image.ndim != 2 or not np.all(np.isfinite(image)):
        raise InputError(path, f"DRR must be a finite 2D image, got shape {image.shape}")
    affine = np.diag([float(pixel_spacing[0]), float(pixel_spacing[1]), 1.0, 1.0])
    img = nib.Nifti1Image(np.asarray(image, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return os.fspath(path)


# ------------------------------------------------------------------------------------- dataset layout
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
    geometry: str | dict,
    drr_pixels: int,
    label: dict | None = None,
    extra_volumes: dict[str, Volume] | None = None,
) -> dict[str, np.ndarray]:
    """Write ``ct.nii.gz`` (int16 HU), its PA/lateral DRRs, ``label.json`` and ``<key>.nii.gz`` extras.

    Returns the DRR images. The CT is stored as int16 (whole HU, the scanner's own precision); the DRRs
    are rendered from exactly the stored values.
    """
    from common.drr import get_geometry

    folder = case_dir(root, case)
    folder.mkdir(parents=True, exist_ok=True)
    ct = ct.with_array(np.rint(ct.array).astype(np.int16))
    drrs = render_pa_lateral(ct, geometry, drr_pixels)
    pixel = get_geometry(geometry).resized(drr_pixels).detector_spacing
    for key, vol in (extra_volumes or {}).items():
        save_volume(vol.with_array(np.rint(vol.array).astype(np.int16)), folder / f"{key}.nii.gz")
    if label is not None:
        atomic_write_text(folder / LABEL_FILE, json.dumps(label, indent=2))
    save_drr(drrs["pa"], folder / PA_FILE, pixel)
    save_drr(drrs["lateral"], folder / LATERAL_FILE, pixel)
    save_volume(ct, folder / CT_FILE)
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


def assign_splits(
    case_ids: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    strata: dict[str, int] | None = None,
) -> dict[str, str]:
    """case id -> "training" | "validation" | "test"; deterministic and stratified by ``strata``.

    Within each stratum the cases are ordered by a hash of (seed, id); the first ``round(n * test)`` go
    to test, the next ``round(n * val)`` to validation. A case keeps its split when others are added
    unless it sits at a boundary, and no random state is involved.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val, test and val + test < 1, got {val_fraction}, {test_fraction}")
    groups: dict = {}
    for case in case_ids:
        groups.setdefault(None if strata is None else strata.get(case), []).append(case)
    splits = {}
    for members in groups.values():
        members = sorted(members, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
        n_test = int(math.floor(len(members) * test_fraction + 0.5))
        n_val = int(math.floor(len(members) * val_fraction + 0.5))
        for i, case in enumerate(members):
            splits[case] = SPLITS[2] if i < n_test else SPLITS[1] if i < n_test + n_val else SPLITS[0]
    return splits


def write_datalist(
    root: str | os.PathLike,
    entries: Sequence[dict],
    spacing: Sequence[float],
    size: Sequence[int],
    geometry: str | dict,
    drr_pixels: int,
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    strata: dict[str, int] | None = None,
    description: str = "",
) -> str:
    """Write ``<root>/dataset.json`` (MONAI datalist + geometry, spacing, HU window); returns its path."""
    from common.drr import get_geometry

    splits = assign_splits([e["id"] for e in entries], val_fraction, test_fraction, seed, strata)
    datalist: dict = {name: [] for name in SPLITS}
    for entry in sorted(entries, key=lambda e: e["id"]):
        datalist[splits[entry["id"]]].append(entry)
    datalist.update(
        description=description,
        geometry=get_geometry(geometry).resized(drr_pixels).as_dict(),
        spacing=[float(s) for s in spacing],
        size=[int(s) for s in size],
        drr_pixels=int(drr_pixels),
        hu_window=XRAY2CT.as_dict(),
        ct_orientation="RAS",
        split={"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
    )
    path = Path(root) / DATALIST_FILE
    atomic_write_text(path, json.dumps(datalist, indent=2))
    return str(path)


# -------------------------------------------------------------------------------------------- inputs
def _is_dicom_folder(folder: Path) -> bool:
    for f in sorted(p for p in folder.iterdir() if p.is_file())[:5]:
        if f.suffix.lower() == ".dcm":
            return True
        with open(f, "rb") as fh:
            if fh.read(132)[128:132] == b"DICM":
                return True
    return False


GENERIC_STEMS = {"ct", "image", "img", "volume", "vol", "scan", "data"}


def _case_id(path: Path) -> str:
    """File or folder name without the volume suffix; ``<case>/ct.nii.gz``-style inputs use the folder name."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.lower() in GENERIC_STEMS and path.parent.name:
        name = path.parent.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "case"


def find_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """(case id, path) for every CT: files with a volume suffix and DICOM series folders.

    A folder that is itself a DICOM series is one case; any other folder is scanned (one level of
    files and DICOM sub-folders). Ids come from the file/folder names, made unique with ``_2``, ``_3``.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        p = Path(require_file(item))
        if p.is_dir() and not _is_dicom_folder(p):
            children = sorted(p.iterdir())
            paths += [c for c in children if c.is_file() and c.name.lower().endswith(VOLUME_SUFFIXES)]
            paths += [c for c in children if c.is_dir() and _is_dicom_folder(c)]
        else:
            paths.append(p)
    found, seen = [], {}
    for p in paths:
        case = _case_id(p)
        seen[case] = seen.get(case, 0) + 1
        found.append((case if seen[case] == 1 else f"{case}_{seen[case]}", str(p)))
    return found


# ---------------------------------------------------------------------------------------------- main
def _save_preview(root: Path, case: str, ct: Volume, drrs: dict) -> str:
    """``<case>/preview.png``: axial/coronal/sagittal of the CT (lung window) and both DRRs."""
    from common.preview import save_montage_png

    return save_montage_png(
        root / case / "preview.png", {case: ct}, xrays={"PA": drrs["pa"], "lateral": drrs["lateral"]}
    )


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
) -> dict:
    """Convert CTs to the paired dataset layout; returns (and writes to build_report.json) a summary."""
    root = Path(out_root)
    spacing3, size3 = _triple(spacing), _triple(size, int)
    cases = find_inputs(inputs)
    entries, done, skipped, failed, preview_files = [], [], [], [], []
    for case, path in tqdm(cases, desc="build_pairs", unit="case"):
        if not overwrite and case_is_done(root, case):
            skipped.append(case)
            entries.append(case_entry(root, case, spacing3))
            continue
        try:
            ct = prepare_ct(load_volume(path), spacing3, size3)
            ct.validate(path)
            drrs = write_case(root, case, ct, geometry, drr_pixels)
            if previews:
                preview_files.append(_save_preview(root, case, ct, drrs))
        except (InputError, ValueError, RuntimeError, OSError) as e:
            failed.append({"id": case, "path": path, "error": str(e)})
            tqdm.write(f"skipped {case}: {e}")
            continue
        done.append(case)
        entries.append(case_entry(root, case, spacing3))
    summary = {
        "out_root": str(root),
        "inputs": len(cases),
        "written": done,
        "skipped_existing": skipped,
        "failed": failed,
        "previews": preview_files if previews else None,
        "datalist": None,
    }
    if entries:
        summary["datalist"] = write_datalist(
            root, entries, spacing3, size3, geometry, drr_pixels, val_fraction, test_fraction, seed,
            description="xray2ct paired CT/DRR dataset (data_prep.build_pairs)",
        )  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / REPORT_FILE, json.dumps(summary, indent=2))
    print(
        f"{len(done)} written, {len(skipped)} already done, {len(failed)} failed"
        + "".join(f"\n  FAILED {f['id']}: {f['error']}" for f in failed)
    )
    return summary


if __name__ == "__main__":
    import fire

    fire.Fire(build_pairs)
