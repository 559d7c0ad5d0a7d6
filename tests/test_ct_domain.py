"""common.ct_domain: a PE classifier only sees generated CTs on its own grid and contrast phase (issue 22, item 6)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from common.ct_domain import (
    GRID_RTOL,
    UNKNOWN,
    contrast_phase,
    crop_centre,
    pe_input_plan,
    training_ct_grid,
    volume_grid,
)
from common.errors import InputError
from common.volume import Volume


def _inputs(fov: float, size: int, phase: str = "ctpa", fov_max: float | None = None) -> dict:
    """A classifier record's inputs: training CTs of ``fov`` (to ``fov_max``) mm, resized to ``size``^3."""
    top = fov if fov_max is None else fov_max
    return {
        "contrast_phase": phase,
        "ct_size": [size] * 3,
        "ct_grid": {
            "field_of_view_mm": {"min": [fov] * 3, "max": [top] * 3},
            "grid_spacing_mm": {"min": [fov / size] * 3, "max": [top / size] * 3},
            "ct_size": [size] * 3,
        },
    }


# (classifier inputs, generated shape, spacing mm, phase) -> (action, crop voxels, words in the reasons)
CASES = {
    "issue 22: 4 mm CTPA crops vs a 12 mm whole chest": (
        _inputs(128.0, 32), (32,) * 3, (12.0,) * 3, "ctpa", "refused", None, ["coarser", "12.00 mm"]),
    "same grid": (_inputs(128.0, 32), (32,) * 3, (4.0,) * 3, "ctpa", "as_is", None, []),
    "same field of view, finer: resample down": (
        _inputs(320.0, 32), (64,) * 3, (5.0,) * 3, "ctpa", "resample", None, []),
    "larger and finer: centred crop": (
        _inputs(128.0, 32), (96,) * 3, (2.0,) * 3, "ctpa", "crop_and_resample", [64] * 3, []),
    "larger but as coarse as the grid after the crop": (
        _inputs(128.0, 32), (64,) * 3, (4.0,) * 3, "ctpa", "crop_and_resample", [32] * 3, []),
    "smaller field of view": (
        _inputs(320.0, 32), (32,) * 3, (4.0,) * 3, "ctpa", "refused", None, ["covers 128 mm", "320 mm"]),
    "contrast phase differs": (
        _inputs(320.0, 32), (32,) * 3, (10.0,) * 3, "non_contrast", "refused", None, ["ctpa CTs"]),
    "generator's phase unknown": (
        _inputs(320.0, 32), (32,) * 3, (10.0,) * 3, None, "refused", None, ["generator's record"]),
    "classifier's phase unknown": (
        _inputs(320.0, 32, UNKNOWN), (32,) * 3, (10.0,) * 3, "ctpa", "refused", None, ["classifier's record"]),
    "classifier records no grid": (
        {"contrast_phase": "ctpa", "ct_size": [32] * 3}, (32,) * 3, (10.0,) * 3, "ctpa", "refused", None,
        ["no field of view"]),
    "training range of fields of view": (
        _inputs(300.0, 32, fov_max=340.0), (32,) * 3, (10.0,) * 3, "ctpa", "as_is", None, []),
    "float32 header rounding stays the same grid": (
        _inputs(128.0, 32), (32,) * 3, (4.0 * (1 + GRID_RTOL / 10),) * 3, "ctpa", "as_is", None, []),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_pe_input_plan(name):
    inputs, shape, spacing, phase, action, crop, words = CASES[name]
    plan = pe_input_plan(inputs, shape, spacing, phase)
    assert plan["action"] == action, plan["reasons"]
    assert plan["crop_voxels"] == crop
    text = "; ".join(plan["reasons"])
    assert all(w in text for w in words), text
    assert plan["generated"]["field_of_view_mm"] == pytest.approx([n * s for n, s in zip(shape, spacing)])


def test_crop_centre_keeps_world_positions():
    array = np.arange(6 * 8 * 10, dtype=np.float32).reshape(6, 8, 10)
    vol = Volume.from_spacing(array, (2.0, 3.0, 4.0))
    crop = crop_centre(vol, (2, 4, 10))
    assert crop.shape == (2, 4, 10) and crop.spacing == pytest.approx((2.0, 3.0, 4.0))
    np.testing.assert_array_equal(crop.array, array[2:4, 2:6, :])
    # voxel (0, 0, 0) of the crop is voxel (2, 2, 0) of the volume: same world position
    np.testing.assert_allclose(crop.affine[:3, 3], vol.affine[:3, :3] @ [2, 2, 0] + vol.affine[:3, 3])


def test_training_grid_reads_headers_on_canonical_axes(tmp_path):
    """A LPS-stored file (x and y flipped) and an axis-swapped one give RAS-ordered fields of view."""
    a = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 20, 30), np.int16), np.diag([-2.0, -3.0, 4.0, 1.0])), a)
    swapped = np.array([[0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]])  # array axis 0 is y
    b = tmp_path / "b.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 10, 30), np.int16), swapped), b)
    assert volume_grid(b) == ((10, 20, 30), (2.0, 3.0, 4.0))
    grid = training_ct_grid([{"ct": str(a)}, {"ct": str(b)}, {"pa": "x.png"}], (32, 32, 32))
    assert grid["n_cases"] == 2 and grid["axes"] == "RAS"
    assert grid["field_of_view_mm"]["min"] == grid["field_of_view_mm"]["max"] == [20.0, 60.0, 120.0]
    assert grid["grid_spacing_mm"]["max"] == pytest.approx([20 / 32, 60 / 32, 120 / 32])
    assert training_ct_grid([{"pa": "x.png"}], (32, 32, 32)) is None


def test_contrast_phase_from_config_or_datalist(tmp_path):
    datalist = tmp_path / "dataset.json"
    datalist.write_text('{"training": [], "contrast_phase": "non_contrast"}')
    assert contrast_phase(datalist) == "non_contrast"
    assert contrast_phase(datalist, "ctpa") == "ctpa"
    assert contrast_phase(tmp_path / "missing.json") == UNKNOWN
    with pytest.raises(InputError, match="contrast_phase must be one of"):
        contrast_phase(None, "arterial")
