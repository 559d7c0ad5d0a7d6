"""CT preparation for the paired datasets: load a CT in HU, resample it onto the dataset grid.

Resampling is separable: along an axis that is downsampled each output voxel is the overlap-weighted mean
of the input voxels its box covers (area averaging, against aliasing); along the others linear
interpolation. Why our own and not MONAI ``Resize(area)`` + ``Spacing``: those took 1.5 s per 512x512x133 CT
on one core (``benchmarks/build_pairs.py``), this 0.2 s, with the affine exact by construction; oblique scans
(rotated direction cosines) still go through MONAI ``Spacing``. Used by :mod:`data_prep.build_pairs` and
:mod:`data_prep.cohort`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch

from common.dicom import load_dicom_series
from common.errors import InputError
from common.io import load_nifti_image, load_volume
from common.volume import Volume

PAD_HU = -1024.0
HU_CLIP = (-1024.0, 3071.0)


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

