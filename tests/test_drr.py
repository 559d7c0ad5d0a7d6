"""DRR projector: analytic path lengths, gradients, geometry consistency and orientation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.drr import (
    DRRGeometry,
    DRRProjector,
    drr_to_image,
    get_geometry,
    image_to_line_integral,
    render_drr,
)


def _world_grid(shape, spacing):
    axes = [(torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return torch.meshgrid(*axes, indexing="ij")


def _sphere(shape, spacing, radius, centre=(0.0, 0.0, 0.0), supersample=3):
    """Partial-volume sphere: each voxel holds the fraction of its sub-samples inside."""
    occ = torch.zeros(shape, dtype=torch.float64)
    offs = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    x, y, z = _world_grid(shape, spacing)
    for ox in offs:
        for oy in offs:
            for oz in offs:
                d2 = (
                    (x + ox * spacing[0] - centre[0]) ** 2
                    + (y + oy * spacing[1] - centre[1]) ** 2
                    + (z + oz * spacing[2] - centre[2]) ** 2
                )
                occ += (d2 <= radius**2).double()
    return occ / supersample**3


def _analytic_sphere_drr(geom: DRRGeometry, view: str, radius: float, mu: float) -> torch.Tensor:
    """Exact chord lengths of each pixel's ray through a centred sphere."""
    h, w = geom.detector_pixels
    dv, du = geom.detector_spacing
    v = (torch.arange(h, dtype=torch.float64) - (h - 1) / 2) * dv
    u = (torch.arange(w, dtype=torch.float64) - (w - 1) / 2) * du
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    # In the view's frame: source at depth 0, isocenter at depth SAD, pixel at depth SID, offsets (u, v).
    ray_len = torch.sqrt(geom.sid**2 + uu**2 + vv**2)
    # distance from the isocenter to the ray = |SAD e_beam x d| with d the unit ray direction
    dist = geom.sad * torch.sqrt(uu**2 + vv**2) / ray_len
    chord = 2 * torch.sqrt(torch.clamp(radius**2 - dist**2, min=0.0))
    return chord * mu, dist


@pytest.mark.parametrize("view", ["pa", "lateral"])
def test_sphere_path_lengths_match_analytic(view):
    shape, spacing, radius, mu = (72, 80, 64), (1.25, 1.0, 1.5), 40.0, 0.02
    vol = _sphere(shape, spacing, radius) * mu
    geom = DRRGeometry("t", sad=500.0, sid=900.0, detector_pixels=(41, 41), detector_size_mm=(200.0, 200.0))
    got = render_drr(vol[None, None], spacing, geom, view)[0, 0]
    want, dist = _analytic_sphere_drr(geom, view, radius, mu)
    centre = got[20, 20].item()
    assert centre == pytest.approx(2 * radius * mu, rel=5e-3)
    inside = want > 0.3 * want.max()  # away from the rim, where voxelisation dominates
    rel_err = ((got - want).abs()[inside] / want[inside]).max().item()
    assert rel_err < 0.03, rel_err
    # nothing outside the shadow, beyond the partial-volume rim (~ one voxel)
    assert got[dist > radius + 2 * max(spacing)].abs().max().item() == 0.0


def test_uniform_cube_central_ray_is_side_length():
    vol = torch.ones(1, 1, 30, 40, 20, dtype=torch.float64)
    spacing = (2.0, 1.5, 3.0)
    geom = DRRGeometry("t", sad=600.0, sid=1000.0, detector_pixels=(3, 3), detector_size_mm=(6.0, 6.0))
    # the sampled extent between first and last voxel centres is (n - 1) * spacing
    pa = render_drr(vol, spacing, geom, "pa")[0, 0, 1, 1].item()
    lat = render_drr(vol, spacing, geom, "lateral")[0, 0, 1, 1].item()
    assert pa == pytest.approx(40 * 1.5, rel=1e-9)
    assert lat == pytest.approx(30 * 2.0, rel=1e-9)


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    vol = torch.rand(1, 1, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    geom = DRRGeometry("t", sad=50.0, sid=90.0, detector_pixels=(4, 5), detector_size_mm=(12.0, 14.0))
    for view in ("pa", "lateral"):
        assert torch.autograd.gradcheck(lambda m, v=view: render_drr(m, (1.0, 1.2, 0.9), geom, v), (vol,))
    # and through the image transform used as a training loss
    proj = DRRProjector(geom, input_is_hu=False)
    loss = sum(img.sum() for img in proj(vol, (1.0, 1.2, 0.9)).values())
    loss.backward()
    assert torch.isfinite(vol.grad).all() and vol.grad.abs().sum() > 0


@pytest.mark.parametrize("view", ["pa", "lateral"])
def test_projected_point_lands_on_rendered_blob(view):
    shape, spacing = (64, 64, 64), (2.0, 2.0, 2.0)
    point = torch.tensor([18.0, -22.0, 30.0], dtype=torch.float64)
    vol = _sphere(shape, spacing, 3.0, centre=tuple(point.tolist()))
    geom = get_geometry("x2ctgan").resized(96)
    img = render_drr(vol[None, None], spacing, geom, view)[0, 0]
    rows, cols = torch.meshgrid(
        torch.arange(96.0, dtype=torch.float64), torch.arange(96.0, dtype=torch.float64), indexing="ij"
    )
    w = img / img.sum()
    centroid = torch.stack(((w * rows).sum(), (w * cols).sum()))
    expected = geom.project_points(point, view)
    assert torch.allclose(centroid, expected, atol=0.15), (centroid, expected)


def test_display_orientation():
    """Right-anterior-superior blob: PA shows it top-left (patient's right on viewer's left);
    the left-lateral view shows it top-left (anterior on the left)."""
    shape, spacing = (48, 48, 48), (4.0, 4.0, 4.0)
    vol = _sphere(shape, spacing, 10.0, centre=(40.0, 40.0, 40.0))[None, None]
    geom = get_geometry("x2ctgan").resized(64)
    for view in ("pa", "lateral"):
        img = render_drr(vol, spacing, geom, view)[0, 0]
        r, c = np.unravel_index(int(img.argmax()), img.shape)
        assert r < 32 and c < 32, (view, r, c)
    # moving the blob to the patient's left moves it to the PA image's right, not in the lateral
    vol_left = _sphere(shape, spacing, 10.0, centre=(-40.0, 40.0, 40.0))[None, None]
    r, c = np.unravel_index(int(render_drr(vol_left, spacing, geom, "pa")[0, 0].argmax()), (64, 64))
    assert c > 32


def test_batch_and_chunking_are_consistent():
    torch.manual_seed(1)
    vols = torch.rand(2, 1, 20, 24, 16)
    geom = get_geometry("perx2ct").resized(32)
    both = render_drr(vols, (3.0, 3.0, 4.0), geom, "pa")
    one = render_drr(vols[1:], (3.0, 3.0, 4.0), geom, "pa", planes_per_chunk=1)
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_image_transform_round_trip_and_presets():
    line = torch.linspace(0, 12, 50)
    assert torch.allclose(image_to_line_integral(drr_to_image(line)), line, atol=1e-3)
    g = get_geometry("x2ctgan")
    assert (g.sad, g.sid, g.detector_size_mm) == (541.0, 949.0, (500.0, 500.0))
    assert get_geometry("perx2ct").sad == 700.0
    assert get_geometry(g.as_dict()) == g
    assert math.isclose(g.resized(256).detector_spacing[0], 500 / 256)
    with pytest.raises(ValueError):
        get_geometry("nope")
    with pytest.raises(ValueError):
        render_drr(torch.zeros(4, 4, 4), (1, 1, 1), g, "pa")
    with pytest.raises(ValueError):
        render_drr(torch.zeros(1, 1, 4, 4, 4), (1, 1, 1), g, "ap_oblique")
