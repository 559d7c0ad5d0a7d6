"""What a CT-reading classifier was trained on, and whether a generated CT may be given to it (issue 22, item 6).

A PE classifier resizes whatever CT it is given to its ``ct_size``: a 32^3 whole chest at 12 mm and a 32^3
CTPA crop at 4 mm look alike to it, so its probability on the wrong one is meaningless. At training its
checkpoint record stores the CTs' **contrast phase** (``ctpa`` / ``non_contrast``, from the config or the
datalist's top-level ``contrast_phase``) and their **grid** (:func:`training_ct_grid`: field of view and
spacing in mm, canonical RAS axes). :func:`pe_input_plan` compares a generated CT with them:

* refused: contrast phase unknown or different, a field of view smaller than the classifier's, or a
  generated spacing coarser than the classifier's grid (upsampling a 12 mm CT to a 4 mm grid adds no detail);
* ``as_is`` (same grid), ``resample`` (same field of view, finer spacing: the classifier's resize is a
  downsampling) or ``crop_and_resample`` (larger field of view: a centred crop to the classifier's, then its
  resize), only when the generated CT's resolution is at least the classifier's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from common.datalist import datalist_field
from common.errors import InputError
from common.io import load_volume
from common.volume import Volume

CONTRAST_PHASES = ("ctpa", "non_contrast")
UNKNOWN = "unknown"
# Relative tolerance on mm figures: spacings come from float32 headers (relative error ~1e-7) and
# resampled datasets round them when writing (2.5 mm stored as 2.4999); 1e-3 of a millimetre-scale
# figure is far below any voxel size that changes what a classifier sees.
GRID_RTOL = 1e-3


def contrast_phase(datalist_file: str | os.PathLike | None = None, configured: str | None = None) -> str:
    """The contrast phase of a dataset's CTs: ``configured`` if given, else the datalist's top-level
    ``contrast_phase``, else ``"unknown"``; :class:`InputError` for any other value."""
    value = configured
    source = "contrast_phase"
    if value in (None, "") and datalist_file and os.path.isfile(datalist_file):
        value = datalist_field(datalist_file, "contrast_phase")
        source = os.fspath(datalist_file)
    if value in (None, ""):
        return UNKNOWN
    if value not in CONTRAST_PHASES + (UNKNOWN,):
        raise InputError(source, f"contrast_phase must be one of {CONTRAST_PHASES + (UNKNOWN,)}, got {value!r}")
    return str(value)


def volume_grid(path: str | os.PathLike) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape, spacing mm) of a volume file along canonical RAS axes; NIfTI from its header alone."""
    path = os.fspath(path)
    if path.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)
        if len(img.shape) < 3:
            raise InputError(path, f"not a 3D volume (shape {img.shape})")
        affine = np.asarray(img.affine, dtype=float)
        axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        shape_c, spacing_c = [0, 0, 0], [0.0, 0.0, 0.0]
        for i in range(3):
            shape_c[axes[i]], spacing_c[axes[i]] = int(img.shape[i]), float(spacing[i])
        return tuple(shape_c), tuple(spacing_c)  # type: ignore[return-value]

    vol = load_volume(path).to_canonical()
    return vol.shape, tuple(float(s) for s in vol.spacing)  # type: ignore[return-value]


def training_ct_grid(items: Sequence[Mapping], ct_size: Sequence[int], key: str = "ct") -> dict | None:
    """The grid of a classifier's training CTs, for its checkpoint record (None: no CT in ``items``).

    ``{"field_of_view_mm": {"min", "max"}, "source_spacing_mm": {"min", "max"}, "grid_spacing_mm": {"min",
    "max"}, "ct_size", "n_cases", "axes": "RAS"}``: per canonical axis (x, y, z) in mm; the field of view is
    shape x spacing, the grid spacing what the network saw (field of view / ``ct_size``).
    """
    size = np.asarray([int(s) for s in ct_size], dtype=float)
    fovs, spacings = [], []
    for item in items:
        if item.get(key):
            shape, spacing = volume_grid(item[key])
            fovs.append(np.asarray(shape, float) * np.asarray(spacing, float))
            spacings.append(np.asarray(spacing, float))
    if not fovs:
        return None
    fov, spacing = np.stack(fovs), np.stack(spacings)

    def span(a: np.ndarray) -> dict:
        return {"min": [float(v) for v in a.min(0)], "max": [float(v) for v in a.max(0)]}

    return {
        "field_of_view_mm": span(fov),
        "source_spacing_mm": span(spacing),
        "grid_spacing_mm": span(fov / size),
        "ct_size": [int(s) for s in size],
        "n_cases": len(fovs),
        "axes": "RAS",
    }


def pe_input_plan(
    classifier_inputs: Mapping | None,
    shape: Sequence[int],
    spacing: Sequence[float],
    phase: str | None,
) -> dict:
    """How a generated CT (canonical ``shape``, ``spacing`` mm, contrast ``phase``) may reach a CT classifier.

    ``{"action": "as_is" | "resample" | "crop_and_resample" | "refused", "reasons": [...], "crop_voxels":
    (x, y, z) | None, "generated": {...}, "classifier": {...}}``; ``classifier_inputs`` is the ``inputs`` block
    of the classifier's checkpoint record.
    """
    inputs = dict(classifier_inputs or {})
    shape_a = np.asarray([int(s) for s in shape], dtype=float)
    spacing_a = np.asarray([float(s) for s in spacing], dtype=float)
    fov_g = shape_a * spacing_a
    phase_g = phase or UNKNOWN
    phase_c = inputs.get("contrast_phase") or UNKNOWN
    grid = inputs.get("ct_grid")
    plan: dict = {
        "action": "refused",
        "reasons": [],
        "crop_voxels": None,
        "generated": {"shape": [int(s) for s in shape_a], "spacing_mm": [float(s) for s in spacing_a],
                      "field_of_view_mm": [float(f) for f in fov_g], "contrast_phase": phase_g},  # fmt: skip
        "classifier": {"ct_size": inputs.get("ct_size"), "contrast_phase": phase_c, "grid": grid},
    }
    reasons = plan["reasons"]
    if phase_c == UNKNOWN:
        reasons.append("the classifier's record gives no contrast phase of its training CTs (retrain it)")
    if phase_g == UNKNOWN:
        reasons.append("the generator's record gives no contrast phase of its training CTs")
    if UNKNOWN not in (phase_c, phase_g) and phase_c != phase_g:
        reasons.append(f"the classifier was trained on {phase_c} CTs, the generated CT is {phase_g}")
    if not grid:
        reasons.append("the classifier's record gives no field of view or spacing of its training CTs (retrain it)")
        return plan
    size = np.asarray(grid.get("ct_size") or inputs.get("ct_size"), dtype=float)
    fov_min = np.asarray(grid["field_of_view_mm"]["min"], dtype=float)
    fov_max = np.asarray(grid["field_of_view_mm"]["max"], dtype=float)
    axes = "xyz"
    small = fov_g < fov_min * (1 - GRID_RTOL)
    for k in np.flatnonzero(small):
        reasons.append(f"the generated CT covers {fov_g[k]:.0f} mm along {axes[k]}, the classifier's training CTs "
                       f"at least {fov_min[k]:.0f} mm")  # fmt: skip
    crop = fov_g > fov_max * (1 + GRID_RTOL)
    # the crop keeps whole voxels: within half a voxel of the classifier's largest field of view
    target_voxels = np.where(crop, np.maximum(1, np.round(fov_max / spacing_a)), shape_a)
    grid_spacing = target_voxels * spacing_a / size
    coarse = spacing_a > grid_spacing * (1 + GRID_RTOL)
    recorded = np.asarray((grid.get("grid_spacing_mm") or {}).get("max", grid_spacing), dtype=float)
    for k in np.flatnonzero(coarse & ~small):
        reasons.append(f"the generated CT's spacing {spacing_a[k]:.2f} mm along {axes[k]} is coarser than the "
                       f"classifier's {recorded[k]:.2f} mm grid: resampling it up adds no detail")  # fmt: skip
    if reasons:
        return plan
    if crop.any():
        plan.update(action="crop_and_resample", crop_voxels=[int(v) for v in target_voxels])
    elif np.array_equal(shape_a, size):
        plan["action"] = "as_is"
    else:
        plan["action"] = "resample"
    return plan


def describe_plan(plan: Mapping) -> str:
    """One line for a log or an error message."""
    if plan["action"] == "refused":
        return "PE classifier refused: " + "; ".join(plan["reasons"])
    if plan["action"] == "crop_and_resample":
        return f"generated CT cropped (centred) to {plan['crop_voxels']} voxels, then resampled to the classifier's grid"
    return {"as_is": "generated CT on the classifier's grid as it is",
            "resample": "generated CT resampled down to the classifier's grid"}[plan["action"]]  # fmt: skip


def crop_centre(volume: Volume, voxels: Sequence[int]) -> Volume:
    """The centred ``voxels`` (x, y, z) sub-volume of a canonical ``volume`` (affine shifted to match)."""
    vol = volume.to_canonical()
    shape = np.asarray(vol.shape)
    want = np.minimum(np.asarray([int(v) for v in voxels]), shape)
    start = (shape - want) // 2
    array = vol.array[tuple(slice(int(s), int(s + w)) for s, w in zip(start, want))]
    affine = np.array(vol.affine, dtype=float, copy=True)
    affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return Volume(np.ascontiguousarray(array), affine)
