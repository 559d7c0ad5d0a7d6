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
docs/ARCHITECTURE.md; the writing helpers here are shared with :mod:`data_prep.phantom`.

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

import csv
import functools
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from common.atomic import atomic_path, atomic_write_text, is_partial_file, remove_partial_files
from common.errors import InputError, require_file
from common.intensity import XRAY2CT, hu_to_mu
from common.io import load_nifti_image, load_volume, save_volume
from common.volume import Volume

CT_FILE, PA_FILE, LATERAL_FILE, LABEL_FILE = "ct.nii.gz", "pa.nii.gz", "lateral.nii.gz", "label.json"
CASE_META_FILE = "case.json"
PREVIEW_FILE = "preview.png"
DATALIST_FILE = "dataset.json"
REPORT_FILE = "build_report.json"
SETTINGS_FILE = "build_settings.json"
PARTS_DIR = "parts"
PAD_HU = -1024.0
HU_CLIP = (-1024.0, 3071.0)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".h5", ".hdf5", ".npy")
SPLITS = ("training", "validation", "test")
RENDERERS = ("xray2ct", "plastimatch")
ATTENUATIONS = ("xray2ct", "plastimatch")  # HU -> mu: common.intensity.hu_to_mu, or plastimatch's
FORMAT_VERSION = 2  # bump when the content written for the same settings changes
CASE_ERRORS = (InputError, ValueError, RuntimeError, OSError, MemoryError)


# ---------------------------------------------------------------------------------------- CT preparation
def _triple(value: float | Sequence[float], cast=float) -> tuple:
    return tuple(cast(v) for v in np.broadcast_to(np.asarray(value), (3,)))


def _axis_weights(n_in: int, s_in: float, o_in: float, n_out: int, s_out: float, c_out: float):
    """1D resampling weights ``(index (N, K), weight (N, K), outside (N,), first centre mm)`` from an input axis
    (``n_in`` voxels of ``s_in`` mm, first centre at ``o_in``) to ``n_out`` voxels of ``s_out`` mm centred at
    ``c_out``. Downsampling: overlap of each output voxel's box with the input voxels, normalised over the
    covered part; otherwise linear interpolation (border value up to half a voxel beyond the scan).
    ``outside`` marks output voxels with no input data (filled with air). When ``s_out`` is a whole multiple
    of ``s_in`` the grid is shifted by under half an input voxel so that it lands on input centres."""
    pos0 = (c_out - o_in) / s_in - (n_out - 1) / 2.0 * s_out / s_in  # first output centre, input index units
    if abs(s_out / s_in - round(s_out / s_in)) < 1e-6:
        pos0 = math.floor(
            pos0 + 0.5
        )  # whole-voxel steps: land on input centres (a copy, no interpolation blur)
    pos = pos0 + np.arange(n_out) * (s_out / s_in)
    if s_out > s_in * (1 + 1e-6):
        half = 0.5 * s_out / s_in
        lo, hi = pos - half, pos + half
        first = np.clip(np.floor(lo + 0.5).astype(np.int64), 0, n_in - 1)
        k = int(np.ceil(2 * half)) + 2
        index = np.clip(first[:, None] + np.arange(k)[None], 0, n_in - 1)
        cand = first[:, None] + np.arange(k)[None]  # unclipped, to drop duplicates at the edge
        overlap = np.clip(np.minimum(hi[:, None], cand + 0.5) - np.maximum(lo[:, None], cand - 0.5), 0, None)
        overlap[(cand < 0) | (cand > n_in - 1)] = 0.0
        covered = overlap.sum(axis=1)
        outside = covered <= 1e-6
        weight = overlap / np.where(outside, 1.0, covered)[:, None]
    else:
        outside = (pos < -0.5) | (pos > n_in - 0.5)
        p = np.clip(pos, 0.0, n_in - 1.0)
        i0 = np.clip(np.floor(p).astype(np.int64), 0, max(n_in - 2, 0))
        frac = p - i0
        index = np.stack((i0, np.minimum(i0 + 1, n_in - 1)), axis=1)
        weight = np.stack((1.0 - frac, frac), axis=1)
    weight[outside] = 0.0
    return index, weight, outside, o_in + pos0 * s_in


def _resample_axis(x: torch.Tensor, axis: int, index, weight, outside, block: int = 32) -> torch.Tensor:
    """Apply :func:`_axis_weights` along ``axis`` of a contiguous float32 tensor.

    The weights form a banded matrix W (N, n); it is applied block by block (``block`` output rows and the
    input rows they touch) as batched matrix products ``W_b @ x[:, lo:hi, :]``: BLAS reads whole rows in
    any memory layout, where gathering single elements along the innermost axis is ~10x slower.
    """
    n_out, n_in = len(outside), x.shape[axis]
    dense = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(dense, (np.repeat(np.arange(n_out), index.shape[1]), index.ravel()), weight.ravel())
    pre = int(np.prod(x.shape[:axis], dtype=np.int64))
    post = int(np.prod(x.shape[axis + 1 :], dtype=np.int64))
    x3 = x.reshape(pre, n_in, post)
    out = x.new_empty((pre, n_out, post))
    for r0 in range(0, n_out, block):
        rows = dense[r0 : r0 + block]
        cols = np.flatnonzero(rows.any(axis=0))
        if len(cols) == 0:
            out[:, r0 : r0 + len(rows)] = 0.0
            continue
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        w = torch.from_numpy(rows[:, lo:hi].astype(np.float32))
        if post == 1:  # innermost axis: (pre, L) @ (L, B)
            out[:, r0 : r0 + len(rows), 0] = x3[:, lo:hi, 0] @ w.T
        else:  # (B, L) @ (pre, L, post), batched over pre
            out[:, r0 : r0 + len(rows)] = torch.matmul(w, x3[:, lo:hi])
    if np.any(outside):
        out += torch.from_numpy((outside * PAD_HU).astype(np.float32)).view(1, -1, 1)
    return out.reshape(*x.shape[:axis], n_out, *x.shape[axis + 1 :])


def prepare_ct(vol: Volume, spacing: float | Sequence[float], size: int | Sequence[int]) -> Volume:
    """Canonical RAS, HU clipped, resampled to ``spacing`` mm on a ``size`` grid centred on the scan.

    Returns float32 HU, shape ``size``; voxels beyond the scan are air (-1024 HU). The input array is read
    in its own memory layout (NIfTI arrays are Fortran-ordered): reorientation to RAS is folded into the
    resampling indices instead of a transposing copy of the full-resolution volume (0.9 s at 512^2).
    """
    spacing, size = _triple(spacing), _triple(size, int)
    ornt = nib.orientations.io_orientation(vol.affine)  # source axis -> (RAS axis, flip)
    canon_affine = vol.affine @ nib.orientations.inv_ornt_aff(ornt, vol.shape)
    linear = canon_affine[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-4 * np.abs(np.diag(linear)).max():
        return _prepare_ct_oblique(vol.to_canonical(), spacing, size)
    raw = np.asarray(vol.array)
    if raw.flags.f_contiguous and not raw.flags.c_contiguous:
        data, data_axis = raw.T, {0: 2, 1: 1, 2: 0}  # C-ordered view; source axis -> data axis
    else:
        data, data_axis = np.ascontiguousarray(raw), {0: 0, 1: 1, 2: 2}
    x = torch.from_numpy(data).to(torch.float32)
    lo, hi = torch.aminmax(x)
    if lo < HU_CLIP[0] or hi > HU_CLIP[1]:
        x = x.clamp(*HU_CLIP)  # a copy: the input stays as it is
    affine = np.eye(4)
    for src in sorted(
        range(3), key=lambda a: vol.spacing[a] / spacing[int(ornt[a, 0])]
    ):  # most-reducing first
        axis, flip = int(ornt[src, 0]), ornt[src, 1] < 0
        n_in, s_in, o_in = vol.shape[src], float(linear[axis, axis]), float(canon_affine[axis, 3])
        centre = o_in + (n_in - 1) / 2.0 * s_in
        index, weight, outside, first = _axis_weights(n_in, s_in, o_in, size[axis], spacing[axis], centre)
        if flip:
            index = n_in - 1 - index
        x = _resample_axis(x, data_axis[src], index, weight, outside)
        affine[axis, axis] = spacing[axis]
        affine[axis, 3] = first
    # data axes -> RAS axes
    ras_of_data = [int(ornt[src, 0]) for src in sorted(range(3), key=lambda a: data_axis[a])]
    out = x.permute(*[ras_of_data.index(a) for a in range(3)]).contiguous()
    return Volume(out.numpy().astype(np.float32, copy=False), affine)


def _prepare_ct_oblique(vol: Volume, spacing: tuple, size: tuple) -> Volume:
    """Oblique scans: MONAI ``Resize`` (area) to about the target spacing, ``Spacing``, centred crop/pad."""
    from monai.data import MetaTensor
    from monai.transforms import Resize, ResizeWithPadOrCrop, Spacing

    array = np.clip(vol.array.astype(np.float32), *HU_CLIP)
    img = MetaTensor(torch.from_numpy(array[None]), affine=torch.from_numpy(vol.affine))
    coarse = [max(1, round(n * s / t)) if t > s else n for n, s, t in zip(vol.shape, vol.spacing, spacing)]
    if tuple(coarse) != vol.shape:
        img = Resize(spatial_size=coarse, mode="area")(img)
    img = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border")(img)
    img = ResizeWithPadOrCrop(spatial_size=size, mode="constant", value=PAD_HU)(img)
    return Volume(img.array[0].astype(np.float32), np.asarray(img.affine, dtype=np.float64))


def load_ct(path: str | os.PathLike, z_spacing: str = "positions") -> Volume:
    """:func:`common.io.load_volume` with HU clipped to ``HU_CLIP`` in place (so :func:`prepare_ct` needs no
    clipped copy), and a faster NIfTI path: nibabel scales int16 CTs to float64 before our float32 cast
    (0.5 s per 512x512x133 CT); here the slope/intercept are applied in float32. ``z_spacing``
    "slice_thickness" spaces DICOM slices by SliceThickness as PerX2CT does (:func:`common.dicom.load_series`)."""
    path = os.fspath(path)
    if z_spacing != "positions":
        if not os.path.isdir(path):
            raise InputError(path, f"z_spacing {z_spacing} needs a DICOM series folder; a volume file keeps its spacing")
        from common.dicom import load_dicom_series

        vol = load_dicom_series(path, z_spacing=z_spacing)
        np.clip(vol.array, *HU_CLIP, out=vol.array)
        return vol
    vol = None
    if path.lower().endswith((".nii", ".nii.gz")):
        try:
            img = load_nifti_image(path)
            proxy = img.dataobj
            slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
            if (
                len(img.shape) == 3
                and int(img.header["sform_code"]) > 0
                and np.isfinite(slope)
                and np.isfinite(inter)
                and np.all(np.asarray(img.header.get_zooms()[:3]) > 0)
            ):
                array = np.asarray(proxy.get_unscaled()).astype(np.float32)
                if slope != 1.0:
                    array *= np.float32(slope)
                if inter != 0.0:
                    array += np.float32(inter)
                vol = Volume(array, img.affine).validate(path)
        except InputError:
            raise
        except Exception:  # anything unusual: the general loader reports it properly
            vol = None
    if vol is None:
        vol = load_volume(path)
    np.clip(vol.array, *HU_CLIP, out=vol.array)
    return vol


# ----------------------------------------------------------------------------------------------- DRRs
def render_pa_lateral(
    ct: Volume,
    geometry: str | dict = "x2ctgan",
    drr_pixels: int = 128,
    renderer: str = "xray2ct",
    attenuation: str = "xray2ct",
    hu_offset: float = 0.0,
) -> dict[str, np.ndarray]:
    """PA and lateral DRR images (H, W) float32 in [0, 1] of a canonical-RAS HU volume.

    ``hu_offset`` is added to the HU before rendering: 24 renders the papers' DRRs of HU + 24
    (:data:`common.drr.PAPER_DRR_HU_OFFSET`).

    ``renderer="plastimatch"`` ray-traces with plastimatch (its own HU -> attenuation conversion, exact
    Siddon path lengths) in our geometry and orientation; see :mod:`common.drr_plastimatch`.
    ``attenuation="plastimatch"`` gives our projector plastimatch's conversion (0 at HU <= -800, water
    0.022/mm): its DRRs then agree with plastimatch's at Pearson r > 0.999, ~10x faster.
    """
    from common.drr import drr_to_image, get_geometry, render_drr

    geom = get_geometry(geometry).resized(drr_pixels)
    if renderer == "plastimatch":
        from common.drr_plastimatch import render_plastimatch

        array = ct.array if not hu_offset else ct.array.astype(np.float32) + np.float32(hu_offset)
        lines = render_plastimatch(array, ct.spacing, geom, views=("pa", "lateral"))
        return {v: drr_to_image(torch.from_numpy(lines[v])).numpy().astype(np.float32) for v in lines}
    if renderer != "xray2ct":
        raise ValueError(f"unknown renderer {renderer!r}; expected one of {RENDERERS}")
    if attenuation == "plastimatch":
        from common.drr_plastimatch import plastimatch_hu_to_mu as convert
    elif attenuation == "xray2ct":
        convert = hu_to_mu
    else:
        raise ValueError(f"unknown attenuation {attenuation!r}; expected one of {ATTENUATIONS}")
    hu = torch.from_numpy(np.ascontiguousarray(ct.array, dtype=np.float32))
    mu = convert(hu + float(hu_offset) if hu_offset else hu)[None, None]
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
    renderer: str = "xray2ct",
    timings: dict | None = None,
    attenuation: str = "xray2ct",
    hu_offset: float = 0.0,
) -> dict[str, np.ndarray]:
    """Write ``ct.nii.gz`` (int16 HU), its PA/lateral DRRs, ``label.json`` and ``<key>.nii.gz`` extras.
    ``hu_offset``: added to the HU for the DRRs only (:func:`render_pa_lateral`).

    Returns the DRR images. The CT is stored as int16 (whole HU, the scanner's own precision); the DRRs
    are rendered from exactly the stored values. ``timings`` (optional) receives seconds per step.
    """
    from common.drr import get_geometry

    folder = case_dir(root, case)
    folder.mkdir(parents=True, exist_ok=True)
    ct = ct.with_array(np.rint(ct.array).astype(np.int16))
    t0 = time.perf_counter()
    drrs = render_pa_lateral(ct, geometry, drr_pixels, renderer, attenuation, hu_offset)
    t1 = time.perf_counter()
    pixel = get_geometry(geometry).resized(drr_pixels).detector_spacing
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


def _hash_order(keys: Iterable[str], seed: int) -> list[str]:
    return sorted(keys, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())


def assign_splits(
    case_ids: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    strata: dict[str, int] | None = None,
    groups: dict[str, str] | None = None,
) -> dict[str, str]:
    """case id -> "training" | "validation" | "test"; deterministic, by patient, stratified by ``strata``.

    ``groups`` maps case -> patient (default: each case is its own patient); all of a patient's cases get
    the patient's split. Within each stratum (of a patient's first case) patients are ordered by a hash
    of (seed, patient id); the first ``round(n * test)`` go to test, the next ``round(n * val)`` to
    validation. A patient keeps its split when others are added unless it sits at a boundary, and no
    random state is involved.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val, test and val + test < 1, got {val_fraction}, {test_fraction}")
    members: dict[str, list[str]] = {}
    for case in sorted(case_ids):
        members.setdefault(case if groups is None else groups.get(case, case), []).append(case)
    by_stratum: dict = {}
    for patient, cases in members.items():
        by_stratum.setdefault(None if strata is None else strata.get(cases[0]), []).append(patient)
    splits = {}
    for patients in by_stratum.values():
        patients = _hash_order(patients, seed)
        n_test = int(math.floor(len(patients) * test_fraction + 0.5))
        n_val = int(math.floor(len(patients) * val_fraction + 0.5))
        for i, patient in enumerate(patients):
            split = SPLITS[2] if i < n_test else SPLITS[1] if i < n_test + n_val else SPLITS[0]
            for case in members[patient]:
                splits[case] = split
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
    splits: dict[str, str] | None = None,
    extra: dict | None = None,
) -> str:
    """Write ``<root>/dataset.json`` (MONAI datalist + geometry, spacing, HU window); returns its path.

    Splits are :func:`assign_splits` of the entries (grouped by their ``patient`` key when present), or
    ``splits`` (case id -> split name; names beyond the three standard ones become extra datalist keys).
    """
    from common.drr import get_geometry

    if splits is None:
        groups = {e["id"]: e["patient"] for e in entries if "patient" in e}
        splits = assign_splits([e["id"] for e in entries], val_fraction, test_fraction, seed, strata, groups)
    datalist: dict = {name: [] for name in SPLITS}
    for entry in sorted(entries, key=lambda e: e["id"]):
        datalist.setdefault(splits[entry["id"]], []).append(entry)
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
    datalist.update(extra or {})
    path = Path(root) / DATALIST_FILE
    atomic_write_text(path, json.dumps(datalist, indent=2))
    return str(path)


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
        case = _case_id(p)
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
    import pydicom

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
    from data_prep import splits as split_lists

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
    from common.pseudonym import load_or_create_key, write_private_json

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
    from common.pseudonym import pseudonym

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
    from common.drr import get_geometry

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
        "geometry": get_geometry(geometry).resized(drr_pixels).as_dict(),
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
            root, case, ct, job["geometry"], job["drr_pixels"], renderer=job["renderer"], timings=timings,
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
    from common.preview import save_montage_png

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
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

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
def _part_path(root: Path, index: int, total: int) -> Path:
    return root / PARTS_DIR / f"part_{index:04d}_of_{total:04d}.json"


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
    if total_parts < 1 or not 0 <= part_index < total_parts:
        raise ValueError(f"need 0 <= part_index < total_parts, got {part_index}/{total_parts}")
    root = Path(out_root)
    spacing3, size3 = _triple(spacing), _triple(size, int)
    from common.dicom import Z_SPACINGS
    from common.drr import paper_hu_offset

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
    mine = sorted(plan["cases"], key=lambda c: c["id"])[part_index::total_parts]

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
                         size=size3, spacing=spacing3, geometry=geometry, drr_pixels=int(drr_pixels),
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
    atomic_write_text(_part_path(root, part_index, total_parts), json.dumps(part, indent=2))
    done = sum(r["status"] == "written" for r in results)
    failed = [r for r in results if r["status"] == "failed"]
    print(
        f"{done} written, {sum(r['status'] == 'skipped_existing' for r in results)} already done, "
        f"{len(failed)} failed" + (f" (part {part_index + 1}/{total_parts})" if total_parts > 1 else "")
        + "".join(f"\n  FAILED {f['id']}: {f['error']}" for f in failed)
    )  # fmt: skip
    missing_parts = [i for i in range(total_parts) if not _part_path(root, i, total_parts).is_file()]
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
    missing = [i for i in range(total_parts) if not _part_path(root, i, total_parts).is_file()]
    if missing:
        raise InputError(
            root / PARTS_DIR, f"parts {missing} of {total_parts} have not finished: run them first"
        )
    parts = [json.loads(_part_path(root, i, total_parts).read_text()) for i in range(total_parts)]
    plan = parts[0].get("plan_content")
    if plan is None:
        raise InputError(_part_path(root, 0, total_parts), "part 0 carries no plan: rerun part 0")
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
            root, entries, settings["spacing"], settings["size"], settings["geometry"], settings["drr_pixels"],
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
