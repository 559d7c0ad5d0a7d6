"""The clinical DRR preset (issue 22, item 1): PA at SID 1800 mm, lateral at SID 1500 mm, each view its own
divergence, checked against hand-built one-view geometries and the pinhole formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.drr import CLINICAL, X2CTGAN, DRRGeometry, get_geometry, render_drr

HAND = {  # view -> the geometry a user would build by hand for that view alone
    "pa": DRRGeometry("hand_pa", sad=1640.0, sid=1800.0, detector_pixels=(64, 64), detector_size_mm=(430.0, 430.0)),
    "lateral": DRRGeometry("hand_lat", sad=1320.0, sid=1500.0, detector_pixels=(64, 64),
                           detector_size_mm=(430.0, 430.0)),
}  # fmt: skip


def test_clinical_magnifications_are_a_films():
    assert CLINICAL.sid == 1800.0 and CLINICAL.magnification == pytest.approx(1800 / 1640)  # ~1.10
    lateral = CLINICAL.for_view("lateral")
    assert lateral.sid == 1500.0 and lateral.magnification == pytest.approx(1500 / 1320)  # ~1.14
    assert CLINICAL.for_view("pa") is CLINICAL and X2CTGAN.for_view("lateral") is X2CTGAN
    assert get_geometry("clinical") is CLINICAL


def _point_volume(spacing: float = 8.0, n: int = 33) -> tuple[torch.Tensor, np.ndarray]:
    """A 3x3x3 block of attenuation off the isocentre; returns (mu (1, 1, n, n, n), its centre in mm)."""
    mu = torch.zeros(1, 1, n, n, n)
    index = np.array([22, 13, 24])  # x right, y anterior, z superior
    mu[0, 0, index[0] - 1 : index[0] + 2, index[1] - 1 : index[1] + 2, index[2] - 1 : index[2] + 2] = 0.02
    return mu, (index - (n - 1) / 2) * spacing


@pytest.mark.parametrize("view", ["pa", "lateral"])
def test_clinical_views_render_as_hand_built_geometries(view):
    mu, centre = _point_volume()
    clinical = render_drr(mu, (8.0,) * 3, CLINICAL.resized(64), view)
    hand = render_drr(mu, (8.0,) * 3, HAND[view], view)
    torch.testing.assert_close(clinical, hand, rtol=0, atol=0)  # same rays, same arithmetic

    # the block's centroid on the detector is where the pinhole formula puts its centre
    image = clinical[0, 0].double().numpy()
    rows, cols = np.indices(image.shape)
    centroid = np.array([(image * rows).sum(), (image * cols).sum()]) / image.sum()
    g = HAND[view]
    x, y, z = centre
    depth, horizontal = (y + g.sad, x) if view == "pa" else (-x + g.sad, y)
    scale = g.sid / depth
    spacing = 430.0 / 64
    expected = np.array([-z * scale / spacing + 31.5, -horizontal * scale / spacing + 31.5])
    # a block of 3 voxels (24 mm) magnified over ~7 mm pixels: its centroid is its projected centre up to the
    # perspective skew across its depth (24 mm of 1300-1700 mm: < 2 % of the ~90 px offset, under 0.3 px here)
    np.testing.assert_allclose(centroid, expected, atol=0.3)
    projected = CLINICAL.resized(64).project_points(torch.tensor(centre, dtype=torch.float64), view).numpy()
    np.testing.assert_allclose(projected, expected, rtol=1e-12)


def test_clinical_geometry_round_trips_through_a_datalist():
    d = json.loads(json.dumps(CLINICAL.resized(32).as_dict()))
    assert d["lateral"] == [1320.0, 1500.0]
    assert DRRGeometry.from_dict(d) == CLINICAL.resized(32)
    assert "lateral" not in X2CTGAN.as_dict()  # one-geometry datasets keep their recorded dict


def test_build_pairs_renders_a_clinical_dataset(tmp_path):
    import nibabel as nib

    from data_prep.phantom import make_phantom_dataset

    datalist = make_phantom_dataset(tmp_path, n_cases=1, size=16, spacing=20.0, geometry="clinical",
                                    drr_pixels=32, val_fraction=0.0, test_fraction=0.0, seed=0)  # fmt: skip
    meta = json.loads(open(datalist).read())
    assert get_geometry(meta["geometry"]) == CLINICAL.resized(32)
    item = (meta["training"] + meta["validation"] + meta["test"])[0]
    for view in ("pa", "lateral"):
        drr = np.asarray(nib.load(tmp_path / item[view]).dataobj)
        assert np.isfinite(drr).all() and 0.0 <= drr.min() < drr.max() < 1.0
