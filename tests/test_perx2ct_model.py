"""PerX2CT network and geometry: projection lands on the DRR, batched == slice-by-slice, a tiny model overfits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import network_atol

from bundles.perx2ct.scripts.data import select_slices
from bundles.perx2ct.scripts.geometry import pixel_to_grid, projection_grids, vox_to_mm
from bundles.perx2ct.scripts.networks import PerX2CTNet
from common.drr import drr_to_image, get_geometry, render_drr
from common.intensity import XRAY2CT, hu_to_mu
from common.metrics import psnr

TINY = dict(
    volume_size=32,
    spacing=(12.0, 12.0, 12.0),
    image_size=32,
    feature_res=8,
    encoder_block="basic",
    encoder_layers=(1, 1),
    encoder_inplanes=(16, 32),
    latent_dim=32,
    pe_multires=6,
    decoder_channels=(16, 32, 32),
    decoder_res_blocks=1,
    norm_num_groups=8,
    attention=False,
    chunk_size=32,
)


def tiny_net(**kw) -> PerX2CTNet:
    torch.manual_seed(0)
    return PerX2CTNet(**{**TINY, **kw})


def blob_drrs(centre_vox, n=32, spacing=8.0, pixels=64, geometry="perx2ct"):
    """DRRs of an air volume holding one bright Gaussian blob at a (continuous) voxel position."""
    idx = torch.arange(n, dtype=torch.float32)
    gx, gy, gz = torch.meshgrid(idx, idx, idx, indexing="ij")
    d2 = (gx - centre_vox[0]) ** 2 + (gy - centre_vox[1]) ** 2 + (gz - centre_vox[2]) ** 2
    hu = -1000.0 + 3000.0 * torch.exp(-d2 / (2 * 1.0**2))
    geom = get_geometry(geometry).resized(pixels)
    mu = hu_to_mu(hu)[None, None]
    return {v: drr_to_image(render_drr(mu, (spacing,) * 3, geom, v))[0, 0] for v in ("pa", "lateral")}, geom


@pytest.mark.parametrize("centre", [(20.0, 10.0, 24.0), (6.0, 25.0, 9.0)])
def test_projected_point_is_the_drr_peak(centre):
    drrs, geom = blob_drrs(centre)
    point_mm = vox_to_mm(torch.tensor(centre, dtype=torch.float64), 32, (8.0,) * 3)
    for view, image in drrs.items():
        rc = geom.project_points(point_mm, view)
        peak = np.unravel_index(int(torch.argmax(image)), image.shape)
        assert abs(rc[0].item() - peak[0]) <= 1.0 and abs(rc[1].item() - peak[1]) <= 1.0, (view, rc, peak)
        # grid_sample at the projected point reads the peak intensity (align_corners=False convention)
        grid = pixel_to_grid(rc, image.shape).float().view(1, 1, 1, 2)
        sampled = F.grid_sample(image[None, None], grid, mode="bilinear", align_corners=False).item()
        assert sampled > 0.9 * image.max().item()
    # the off-centre blob must not project to the detector centre in both views (orientation matters)
    assert not torch.allclose(geom.project_points(point_mm, "pa"), geom.project_points(point_mm, "lateral"))


def test_network_grids_sample_the_blob_in_both_views():
    # feature points of a 32^3 volume with F=8 sit at voxel 4j + 1.5: put the blob on one of them
    centre = (4 * 5 + 1.5, 4 * 2 + 1.5, 20.0)
    drrs, geom = blob_drrs(centre, pixels=64)
    grids = projection_grids(32, 8, (8.0,) * 3, geom, 64, axis=2)
    for view, image in drrs.items():
        g = grids[view][20, 5, 2].view(1, 1, 1, 2)
        value = F.grid_sample(image[None, None], g, mode="bilinear", align_corners=False).item()
        assert value > 0.9 * image.max().item(), view
        far = grids[view][20, 0, 7].view(1, 1, 1, 2)  # a point far from the blob sees air
        assert F.grid_sample(image[None, None], far, align_corners=False).item() < 0.2 * image.max().item()


@pytest.mark.numerics
def test_batched_reconstruction_equals_slice_by_slice():
    net = tiny_net().eval().double()  # an equivalence of summation orders: float64 (tests/numerics.py)
    x = torch.rand(2, 2, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        batched = net.reconstruct(x, chunk_size=32)
        single = net.reconstruct(x, chunk_size=1)
        odd = net.reconstruct(x, chunk_size=5)
    assert batched.shape == (2, 1, 32, 32, 32)
    atol = network_atol(net, batched)
    torch.testing.assert_close(batched, single, rtol=0, atol=atol)
    torch.testing.assert_close(batched, odd, rtol=0, atol=atol)


@pytest.mark.numerics
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_training_slices_match_the_volume(axis):
    net = tiny_net().eval().double()  # float64: tests/numerics.py
    x = torch.rand(2, 2, 32, 32, dtype=torch.float64)
    idx = torch.tensor([[3, 30], [17, 0]])
    with torch.no_grad():
        vol = net.reconstruct(x, axis=axis)[:, 0]
        slices = net(x, idx, axis=axis)
    torch.testing.assert_close(slices, select_slices(vol, idx, axis), rtol=0, atol=network_atol(net, vol))
    assert torch.equal(select_slices(vol, idx, axis)[1, 0], vol[1].select(axis, 17))


def test_bad_input_and_geometry_mismatch_raise():
    net = tiny_net()
    with pytest.raises(ValueError, match="PA\\+lateral"):
        net(torch.rand(1, 1, 32, 32))
    other = tiny_net(spacing=(10.0, 10.0, 10.0))
    with pytest.raises(ValueError, match="spacing"):
        other.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="feature_res"):
        tiny_net(feature_res=6)


@pytest.fixture(scope="module")
def phantom_pair():
    from data_prep.phantom import make_phantom

    ct, _ = make_phantom((32,) * 3, (12.0,) * 3, 0)
    hu = torch.as_tensor(np.asarray(ct.array), dtype=torch.float32)
    geom = get_geometry("perx2ct").resized(32)
    mu = hu_to_mu(hu)[None, None]
    x = torch.cat([drr_to_image(render_drr(mu, (12.0,) * 3, geom, v)) for v in ("pa", "lateral")], dim=1)
    return x, XRAY2CT.to_unit(hu)[None]


def test_tiny_model_overfits_one_pair(phantom_pair):
    """120 Adam steps of 8 random slices (any axis) on one phantom: PSNR (ours) must exceed 17 dB and gain 5 dB.

    The learning rate is cosine-annealed to 0 over the 120 steps. At a constant 2e-3 (betas 0.5, 0.9) the
    whole-volume PSNR of the tiny model swings by 2-5 dB from one 10-step checkpoint to the next (seeds 0-2:
    e.g. 19.5 -> 18.4 -> 14.8 dB over the last 20 steps), so the old test asserted on wherever the last
    step happened to land and failed on main (14.8 dB) after unrelated changes to the arithmetic; annealed,
    the final PSNR is 20-22 dB for every seed tried.
    """
    x, y = phantom_pair
    net = tiny_net()
    steps = 120
    opt = torch.optim.Adam(net.parameters(), 2e-3, betas=(0.5, 0.9))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)

    def volume_psnr() -> float:
        net.eval()
        with torch.no_grad():
            v = net.reconstruct(x).clamp(0, 1)
        net.train()
        return psnr(v[0, 0], y[0])

    start = volume_psnr()
    losses = []
    for _ in range(steps):
        axis = int(torch.randint(3, (1,), generator=gen))
        idx = torch.randint(32, (1, 8), generator=gen)
        loss = F.l1_loss(net(x, idx, axis), select_slices(y, idx, axis))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    end = volume_psnr()
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:10])
    assert end > 17.0 and end > start + 5.0, (start, end)


@pytest.mark.numerics
@pytest.mark.parametrize("camera", ["drr", "perx2ct"])
def test_fused_first_convolution_equals_the_direct_decoder(camera):
    """project_features (decoder conv before sampling) == sample, concatenate, convolve (both cameras).

    float64 (tests/numerics.py): in float32 the two orders differ by ~7.5e-6 of a ~2.5 output, which a
    fitted atol of 1e-5 passed on one CPU only; in float64 they differ by ~1e-14 against a bound of ~1e-8."""
    net = tiny_net(camera=camera, attention=False).eval().double()
    with torch.no_grad():  # non-zero biases and a non-trivial first convolution
        net.decoder.blocks[0].conv.bias.normal_()
    x = torch.rand(2, 2, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        direct = net.reconstruct(x, chunk_size=5, fused=False)
        fused = net.reconstruct(x, chunk_size=7, fused=True)
        auto = net.reconstruct(x, chunk_size=0)
    atol = network_atol(net, direct)
    torch.testing.assert_close(fused, direct, rtol=0, atol=atol)
    torch.testing.assert_close(auto, direct, rtol=0, atol=atol)
    net.to(memory_format=torch.channels_last)  # what the API does
    with torch.inference_mode():
        torch.testing.assert_close(net.reconstruct(x), direct, rtol=0, atol=atol)


def test_auto_chunk_size_follows_the_cache():
    from bundles.perx2ct.scripts.networks import auto_chunk_size, cache_bytes

    net = tiny_net()
    per_slice = 32 * 32 * 32 * 4  # N^2 x widest of the two finest decoder levels x float32
    assert auto_chunk_size(net) == max(1, min(32, cache_bytes() // 4 // per_slice))
    assert cache_bytes() > 0


def test_released_view_intensities():
    """load_view_perx2ct: our DRR -> line integral -> PerX2CT's 8-bit min-max PNG values / 255."""
    from bundles.perx2ct.scripts.data import load_view_perx2ct, perx2ct_png_intensity

    line = torch.linspace(0.0, 6.0, 64 * 64).reshape(64, 64)
    drr = drr_to_image(line).numpy()
    view = load_view_perx2ct(drr, 64)
    assert view.dtype == np.float32 and view.min() == 0.0 and view.max() == 1.0
    np.testing.assert_allclose(view * 255, np.round(view * 255), atol=1e-4)  # 8-bit levels
    assert np.all(np.diff(view.ravel()) >= 0)  # monotone in the line integral
    png = perx2ct_png_intensity(line.numpy())
    im = np.floor(line.numpy().astype(np.float64) / 6.0 * 255)  # savepng: raw / max * 255 -> uint8
    expected = np.minimum(np.floor(im / 255 * 256), 255)  # plt.imsave: autoscaled 256-entry grey map
    np.testing.assert_array_equal(png, expected.astype(np.uint8))
    assert load_view_perx2ct(drr, 32).shape == (32, 32)


@pytest.mark.parametrize(
    "l1_weight, l2_weight",
    [(1.0, 0.0), (0.0, 1.0), (0.5, 2.0)],
)
def test_reconstruction_loss_weights(l1_weight, l2_weight):
    """ReconstructionLoss = l1_weight * L1 + l2_weight * MSE (cpu_64.json trains with MSE alone)."""
    from bundles.perx2ct.scripts.losses import ReconstructionLoss

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    expected = l1_weight * F.l1_loss(pred, target) + l2_weight * F.mse_loss(pred, target)
    got = ReconstructionLoss(l1_weight=l1_weight, l2_weight=l2_weight)(pred, target)
    # two float32 means of n = 384 terms in [0, 1], each summed in an order the CPU's kernels choose: a sum's
    # rounding is at most n * eps relative (any order), hence the bound, not one machine's agreement
    n, eps = pred.numel(), torch.finfo(torch.float32).eps
    torch.testing.assert_close(got, expected, rtol=2 * n * eps, atol=0.0)


@pytest.mark.parametrize("l1_weight, l2_weight", [(0.0, 0.0), (-1.0, 1.0), (1.0, -0.5)])
def test_reconstruction_loss_rejects_bad_weights(l1_weight, l2_weight):
    from bundles.perx2ct.scripts.losses import ReconstructionLoss

    with pytest.raises(ValueError, match="l1_weight"):
        ReconstructionLoss(l1_weight=l1_weight, l2_weight=l2_weight)
