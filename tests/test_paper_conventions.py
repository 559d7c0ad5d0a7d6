"""PerX2CT's / X2CT-GAN's data conventions as build options (issue 24 item 3): z spacing from SliceThickness,
DRRs of HU + 24 (``plastimatch adjust --pw-linear "0, -1000"`` on HU + 1024 data)."""

from __future__ import annotations

import numpy as np
import pytest

from common.drr import PAPER_DRR_HU_OFFSET, X2CTGAN, detector_geometry, paper_hu_offset
from common.io import load_volume
from common.volume import Volume
from data_prep.build_pairs import build_pairs, build_settings
from data_prep.phantom import make_phantom
from data_prep.render import render_pa_lateral


def test_paper_offset_is_their_plastimatch_shift():
    # their CT holds HU + 1024 (0_dicom2mhd.py l. 74); pw-linear "0, -1000" maps v -> v - 1000 (one point,
    # slope 1 on both sides): HU + 1024 - 1000 = HU + 24
    assert PAPER_DRR_HU_OFFSET == 1024 - 1000
    assert paper_hu_offset("x2ctgan") == paper_hu_offset("perx2ct") == 24.0
    assert paper_hu_offset(X2CTGAN.as_dict()) == 24.0
    assert paper_hu_offset({**X2CTGAN.as_dict(), "name": "mine"}) == 0.0


@pytest.mark.parametrize("attenuation", ["xray2ct", "plastimatch"])
def test_hu_offset_renders_the_shifted_volume(attenuation):
    ct, _ = make_phantom(shape=(24, 24, 24), spacing=16.0)
    ct = Volume(np.asarray(ct.array, np.float32), ct.affine)
    camera = detector_geometry("x2ctgan", 16)
    shifted = render_pa_lateral(ct, camera, attenuation=attenuation, hu_offset=24.0)
    by_hand = render_pa_lateral(ct.with_array(ct.array + np.float32(24.0)), camera, attenuation=attenuation)
    plain = render_pa_lateral(ct, camera, attenuation=attenuation)
    for view in ("pa", "lateral"):
        np.testing.assert_array_equal(shifted[view], by_hand[view])  # the same float32 sums
        assert np.abs(shifted[view] - plain[view]).max() > 1e-3, view


def test_settings_record_the_conventions_only_when_used():
    plain = build_settings((16,) * 3, (12.0,) * 3, "x2ctgan", 16)
    assert "z_spacing" not in plain and "drr_hu_offset" not in plain  # older builds keep their fingerprint
    paper = build_settings((16,) * 3, (12.0,) * 3, "x2ctgan", 16, z_spacing="slice_thickness", drr_hu_offset=24.0)
    assert paper["z_spacing"] == "slice_thickness" and paper["drr_hu_offset"] == 24.0


def test_build_pairs_with_perx2ct_conventions(shared_data, tmp_path):
    """The real Siemens series (3 mm slices every 2 mm): stretched 1.5x in z, DRRs of HU + 24."""
    dicom = shared_data / "dicom" / "abdomen_ct_20slices"
    if not dicom.is_dir():
        pytest.skip(f"{dicom} missing")
    extents = {}
    for name, kwargs in {
        "ours": {},
        "paper": {"z_spacing": "slice_thickness", "drr_hu_offset": "paper"},
    }.items():
        summary = build_pairs(str(dicom), str(tmp_path / name), size=16, spacing=6.0, drr_pixels=16, **kwargs)
        assert len(summary["written"]) == 1, summary["failed"]
        ct = load_volume(next((tmp_path / name).glob("*/ct.nii.gz")))
        extents[name] = int((ct.array > -1000).any(axis=(0, 1)).sum())  # z-slices holding the scan
    # 20 slices x 2 mm = 40 mm of scan (6.7 voxels of 6 mm) vs 20 x 3 mm = 60 mm (10 voxels)
    assert extents["ours"] in (7, 8) and extents["paper"] in (10, 11), extents
    with pytest.raises(ValueError, match="z_spacing"):
        build_pairs(str(dicom), str(tmp_path / "bad"), size=16, spacing=6.0, z_spacing="thickness")
