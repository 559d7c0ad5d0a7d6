"""Progressive cascade: back-projection geometry, freezing, stage losses (DRR term), checkpointing, learning."""

from __future__ import annotations

import warnings

import pytest
import torch
from numerics import network_atol

from bundles.progressive_cascade.scripts.data import CascadeBatch, read_dataset_info
from bundles.progressive_cascade.scripts.losses import CascadeStageLoss, TriPlanarPerceptualLoss, gradient_l1
from bundles.progressive_cascade.scripts.networks import ProgressiveCascade, backprojection_grid
from common.drr import get_geometry

TINY = dict(
    volume_sizes=(8, 16, 32),
    xray_size=32,
    feature_sizes=(8, 16, 32),
    encoder_channels=(8, 8, 8),
    head_channels=4,
    refiner_channels=((8, 16), (8, 16), (4, 8)),
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_prep.phantom import make_phantom_dataset

    path = make_phantom_dataset(tmp_path_factory.mktemp("cascade_ds"), n_cases=4, size=32, drr_pixels=32)
    return read_dataset_info(path), path


@pytest.fixture(scope="module")
def batch(dataset):
    info, path = dataset
    import json
    import os

    d = json.load(open(path))
    case = (d["training"] + d["validation"] + d["test"])[0]
    root = os.path.dirname(path)
    files = {
        k: os.path.join(root, case[k]) if not os.path.isabs(case[k]) else case[k]
        for k in ("ct", "pa", "lateral")
    }
    from pathlib import Path

    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundles" / "progressive_cascade" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json")])
    parser.update({"volume_sizes": [8, 16, 32], "xray_size": 32})
    data = parser.get_parsed_content("preprocessing")(files)  # the bundle's own transform chain
    return CascadeBatch("dict")({k: v[None] for k, v in data.items()})


def _net(info, stage, **kw):
    torch.manual_seed(0)
    return ProgressiveCascade(info["geometry"], info["fov_mm"], stage=stage, **{**TINY, **kw})


def test_backprojection_grid_orientation():
    geom = get_geometry("x2ctgan")
    grid_pa = backprojection_grid(geom, 9, (360.0, 360.0, 360.0), "pa").reshape(9, 9, 9, 2)
    grid_lat = backprojection_grid(geom, 9, (360.0, 360.0, 360.0), "lateral").reshape(9, 9, 9, 2)
    assert torch.allclose(grid_pa[4, 4, 4], torch.zeros(2), atol=1e-6)  # isocentre -> detector centre
    # PA: patient right (+x) appears on the image left (col < centre); superior (+z) at the top (row < centre)
    assert grid_pa[8, 4, 4, 0] < 0 and grid_pa[4, 4, 8, 1] < 0
    # lateral: anterior (+y) on the image left; the x position only changes magnification
    assert grid_lat[4, 8, 4, 0] < 0 and grid_lat[4, 4, 8, 1] < 0
    # cone beam: a point nearer the source (posterior for PA) is magnified more
    assert abs(grid_pa[8, 0, 4, 0]) > abs(grid_pa[8, 8, 4, 0])


def test_freezing_keeps_earlier_stages_bit_identical(dataset, batch):
    info, _ = dataset
    net = _net(info, stage=2)
    xrays, target = batch
    frozen_before = {
        k: v.clone() for k, v in net.state_dict().items() if k.startswith(("encoder.", "stages.0."))
    }
    trained_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("stages.1.")}
    params = [p for p in net.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for p in net.encoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    loss_fn = CascadeStageLoss(2, info["geometry"], info["fov_mm"], ssim_win_size=5, perceptual_weight=0.0)
    for _ in range(3):
        net.train()  # as the engine does every iteration
        assert not net.encoder.training and not net.stages[0].training and net.stages[1].training
        opt.zero_grad()
        loss_fn(net(xrays), target).backward()
        opt.step()
    after = net.state_dict()
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    assert any(not torch.equal(trained_before[k], after[k]) for k in trained_before)


def test_drr_reprojection_zero_for_ground_truth_and_differentiable(dataset, batch):
    info, _ = dataset
    _, target = batch
    loss_fn = CascadeStageLoss(3, info["geometry"], info["fov_mm"], ssim_win_size=5)
    gt = target["ct"]
    loss_fn(gt, target)
    assert loss_fn.last_terms["drr"] == pytest.approx(0.0, abs=2e-6)
    assert loss_fn.last_terms["l1"] == 0.0 and loss_fn.last_terms["edge"] == 0.0
    pred = (gt + 0.05 * torch.randn_like(gt)).clamp(0, 1).requires_grad_(True)
    loss_fn(pred, target)
    assert loss_fn.last_terms["drr"] > 1e-3
    drr = loss_fn.drr(pred, {v: target[v] for v in ("pa", "lateral")}, loss_fn.spacing(pred.shape[2:]))
    drr.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_stage_terms_and_weights(dataset):
    info, _ = dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s2 = CascadeStageLoss(2, info["geometry"], info["fov_mm"])
    assert any("perceptual loss skipped" in str(w.message) for w in caught)
    assert set(CascadeStageLoss(1, info["geometry"], info["fov_mm"]).weights) == {"l1", "ssim"}
    assert s2.weights == {"l1": 1.0, "ssim": 0.5}  # perceptual skipped without weights
    s3 = CascadeStageLoss(3, info["geometry"], info["fov_mm"], edge_weight=0.7)
    assert s3.weights == {"l1": 1.0, "ssim": 0.5, "edge": 0.7, "drr": 0.3}
    a = torch.zeros(1, 1, 4, 4, 4)
    b = a.clone()
    b[..., 2:] = 1.0  # one step edge along z: |diff| differs by 1 at 16 of 48 z-differences
    assert gradient_l1(a, b).item() == pytest.approx((16 / 48) / 3)


def test_triplanar_perceptual_from_local_torchscript(tmp_path):
    torch.manual_seed(0)
    feat = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    path = tmp_path / "features.ts"
    torch.jit.script(feat).save(str(path))
    loss = TriPlanarPerceptualLoss(str(path))
    x = torch.rand(1, 1, 8, 8, 8)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    y = torch.rand(1, 1, 8, 8, 8, requires_grad=True)
    value = loss(y, x)
    value.backward()
    assert value.item() > 0 and y.grad.abs().sum() > 0
    full = CascadeStageLoss(2, "x2ctgan", (192.0,) * 3, perceptual_weights_path=str(path), ssim_win_size=5)
    assert full.weights["perceptual"] == 0.1


def test_gradient_checkpointing_gives_the_same_gradients(dataset, batch):
    info, _ = dataset
    xrays, target = batch
    grads = []
    for flag in (False, True):
        net = _net(info, stage=3, gradient_checkpointing=(False, False, flag))
        net.stages[2].refiner.head.conv.weight.data.normal_(0, 0.1)  # non-zero so gradients reach every block
        net.train()
        net(xrays).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]))
    # recomputation repeats the forward; float32 reorderings at most (tests/numerics.py)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=network_atol(net, grads[0], torch.float32))
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_loss_falls_on_a_fixed_batch(dataset, batch, stage):
    info, _ = dataset
    xrays, target = batch
    net = _net(info, stage=stage)
    loss_fn = CascadeStageLoss(stage, info["geometry"], info["fov_mm"], ssim_win_size=5)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        net.train()
        opt.zero_grad()
        loss = loss_fn(net(xrays), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
