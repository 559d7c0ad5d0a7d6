"""The released PerX2CT checkpoint: converted weights reproduce the original forward pass; bad files fail clearly.

No real ``PerX2CT.ckpt`` here: the original architecture is rebuilt from installable code at random weights
(taming-transformers' ``Decoder`` from the PyPI package ``taming-transformers-rom1504``, installed test-only
by bin/setup.sh; a ResNet in torchvision's key layout written below, because torchvision does not import
beside our torch), saved as a Lightning 1.0-style checkpoint with the original key names, converted, and
compared with an independent re-statement of the original forward (camera, NeRF encoding, channel order).
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from numerics import network_atol

from bundles.perx2ct.scripts import convert_official
from bundles.perx2ct.scripts.geometry import (
    perx2ct_camera_grids,
    perx2ct_project,
    perx2ct_to_ras,
    perx2ct_view_orientation,
    ras_to_perx2ct,
)
from common.errors import InputError

taming_model = pytest.importorskip(
    "taming.modules.diffusionmodules.model",
    reason="bin/setup.sh installs taming-transformers-rom1504 (test-only)",
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# -- torchvision's ResNet layout (conv1, bn1, layerN.i.{conv1..3, bn1..3, downsample.0/1}), test-only ----------
class TVBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVResNetToLayer2(nn.Module):
    """torchvision ``resnet101`` with layer3/layer4/fc deleted, as PerX2CT's ``ResNetEncoder`` keeps it."""

    def __init__(self, layers=(3, 4)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(*[TVBottleneck(64 if i == 0 else 256, 64) for i in range(layers[0])])
        self.layer2 = nn.Sequential(
            *[TVBottleneck(256 if i == 0 else 512, 128, 2 if i == 0 else 1) for i in range(layers[1])]
        )

    def forward(self, x):
        return self.layer2(self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x))))))


def randomise(module: nn.Module, seed: int) -> None:
    """Random weights everywhere, including normalisation layers and BN running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype != torch.float32:
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif tensor.ndim == 1:  # norm scales
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) / math.sqrt(fan_in))


# -- the original forward, restated independently from the PerX2CT sources ------------------------------
def camera_grid(points: np.ndarray, view: str, fov_deg: float = 60.0) -> torch.Tensor:
    """Pinhole at radius 1 on +y (PA) / +z (lateral) looking at 0, world +y up; float64 look-at frame."""
    origin = np.array([1e-5, 1.0, 0.0]) if view == "pa" else np.array([0.0, 0.0, 1.0])
    forward = -origin / np.linalg.norm(origin)
    left = np.cross([0.0, 1.0, 0.0], forward)
    left /= np.linalg.norm(left)
    up = np.cross(forward, left)
    rel = points - origin
    x_cam, y_cam, z_cam = rel @ -left, rel @ up, rel @ -forward
    t = math.tan(math.radians(fov_deg) / 2)
    u, v = -x_cam / z_cam / t, -y_cam / z_cam / t
    return torch.from_numpy(np.stack([u, -v], -1)).float()


def nerf_encoding(p: torch.Tensor, multires: int = 10) -> torch.Tensor:
    parts = [p]
    for k in range(multires):
        parts += [torch.sin(p * 2.0**k), torch.cos(p * 2.0**k)]
    return torch.cat(parts, -1)


def original_slices(trunk, decoder, xray: torch.Tensor, axis: int, indices, n: int, f: int) -> torch.Tensor:
    """(1, 2, H, W) radiographs as stored (xray1/xray2 PNG / 255) -> (K, N, N) channel 1 of the decoder."""
    views = {
        "pa": xray[0, 0].flip(-1),
        "lateral": xray[0, 1].T.flip(0),
    }  # the loader's fliplr / transpose+flipud
    feats = {v: trunk((img[None, None].repeat(1, 3, 1, 1) - MEAN) / STD) for v, img in views.items()}
    world = (np.arange(n) - (n - 1) / 2) / n
    step = n // f
    coarse = world[::step] + (world[1] - world[0]) * (step - 1) / 2
    out = []
    for k in indices:
        axes = [coarse, coarse, coarse]
        axes[axis] = world[k : k + 1]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        pts = np.moveaxis(pts, axis, 0)[0].reshape(-1, 3)  # (F*F, 3), remaining axes in order
        sampled = []
        for view in ("pa", "lateral"):
            grid = camera_grid(pts, view).view(1, -1, 1, 2)
            s = F.grid_sample(feats[view], grid, mode="bilinear", align_corners=True, padding_mode="zeros")
            sampled.append(s[0, :, :, 0].T)  # (F*F, C)
        z = torch.cat([nerf_encoding(torch.from_numpy(pts).float()), *sampled], -1)
        z = z.T.reshape(1, -1, f, f)
        out.append(decoder(z)[0, 1])
    return torch.stack(out)


# -- a Lightning 1.0.8-style checkpoint ---------------------------------------------------------------
@pytest.fixture
def fake_lightning(monkeypatch):
    """A stand-in ``pytorch_lightning`` module, so the checkpoint pickles a reference to its callback class
    (as Lightning 1.0 does: callback states keyed by class); it is removed again before loading."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return ModelCheckpoint


def save_lightning(path, trunk, decoder, callback_class=None, extra_state=None):
    state = {f"encoder.network_fn.cond_encoder.model.{k}": v for k, v in trunk.state_dict().items()}
    state["encoder.axis_emb.weight"] = torch.empty(3, 0)
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # dropped by the converter
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    state.update(extra_state or {})
    ckpt = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 9e-5, "params": [0]}]}], "lr_schedulers": []}  # fmt: skip
    if callback_class is not None:
        ckpt["callbacks"] = {
            callback_class: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.1)}
        }
    torch.save(ckpt, path)
    return path


def build_original(ch: int, resolution: int, attn_res: int, seed: int = 0):
    torch.manual_seed(seed)
    trunk = TVResNetToLayer2()
    decoder = taming_model.Decoder(
        ch=ch, out_ch=3, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=[attn_res], dropout=0.0,
        in_channels=3, resolution=resolution, z_channels=2 * 512 + 63, double_z=False,
    )  # fmt: skip
    randomise(trunk, seed + 1)
    randomise(decoder, seed + 2)
    return trunk.eval(), decoder.eval()


def check_equal_to_original(tmp_path, ckpt_path, trunk, decoder, n, image, slices):
    out = tmp_path / "model.pt"
    kwargs = convert_official.convert(str(ckpt_path), str(out), volume_size=n, image_size=image)
    assert kwargs["decoder_res_blocks"] == 3 and kwargs["out_channels"] == 3 and kwargs["output_channel"] == 1
    assert kwargs["encoder_layers"] == [3, 4] and kwargs["latent_dim"] == 512 and kwargs["pe_multires"] == 10
    record = torch.load(out, map_location="cpu", weights_only=True)
    net = convert_official.build_official_network(kwargs, image_size=image).eval()
    net.load_state_dict(record["model"])
    f = net.feature_res
    xray = torch.rand(1, 2, image, image, generator=torch.Generator().manual_seed(5))
    worst = 0.0
    with torch.inference_mode():
        feats = net.encode(xray)
        for axis, indices in slices.items():
            ours = net.decode_slices(feats, torch.tensor([indices]), axis)[0]
            ref = original_slices(trunk, decoder, xray, axis, indices, n, f)
            assert ref.abs().max() > 0.05  # a non-trivial output
            worst = max(worst, float((ours - ref).abs().max()))
    # float32 both sides (our grids and coordinates are float32: geometry.perx2ct_camera_grids), different
    # code: the statistical float32 bound (~1e-3 of a ~3 output here, 1.7e-5 seen; a wrong key is O(0.1))
    atol = network_atol(net, ref, torch.float32)
    assert atol < 0.02 and worst < atol, (worst, atol)
    return net, xray


@pytest.mark.numerics
def test_converted_checkpoint_reproduces_the_original_forward(tmp_path, fake_lightning):
    """Small decoder (ch 32, attention at 8 px, 32^3 output), full ResNet-101-to-layer2 encoder layout."""
    trunk, decoder = build_original(ch=32, resolution=32, attn_res=8)
    ckpt = save_lightning(tmp_path / "PerX2CT.ckpt", trunk, decoder, callback_class=fake_lightning)
    for name in (
        "pytorch_lightning.callbacks.model_checkpoint",
        "pytorch_lightning.callbacks",
        "pytorch_lightning",
    ):
        del sys.modules[name]  # Lightning is not importable when the converter loads the file
    with pytest.raises(Exception, match="Unsupported global"):  # plain weights_only refuses the file...
        torch.load(ckpt, weights_only=True)
    net, xray = check_equal_to_original(  # ...the converter reads it safely
        tmp_path, ckpt, trunk, decoder, n=32, image=64, slices={0: [0, 13, 31], 1: [7], 2: [20]}
    )
    # whole volume: canonical RAS = the original's axial slices reordered. An equivalence of two summation
    # orders (chunks of 11 vs one decode), so in float64, where rounding is ~1e-14 and a logic error O(1)
    net, xray = net.double(), xray.double()
    with torch.inference_mode():
        vol = net.reconstruct(xray, chunk_size=11)[0, 0]
        axial = net.decode_slices(net.encode(xray), torch.arange(32)[None], 0)[0]
    assert vol.shape == (32, 32, 32) and vol.dtype == torch.float64
    torch.testing.assert_close(vol, perx2ct_to_ras(axial), rtol=0, atol=network_atol(net, axial))


@pytest.mark.slow
def test_paper_size_checkpoint_reproduces_the_original_forward(tmp_path):
    """The released configuration: ch 128, ch_mult (1, 2, 4), attention at 32 px, 128^3 output, 128^2 X-rays."""
    trunk, decoder = build_original(ch=128, resolution=128, attn_res=32)
    ckpt = save_lightning(tmp_path / "PerX2CT.ckpt", trunk, decoder)
    check_equal_to_original(
        tmp_path, ckpt, trunk, decoder, n=128, image=128, slices={0: [64], 1: [3], 2: [100]}
    )


def test_official_overlay_builds_the_converted_architecture():
    """configs/perx2ct_official.json builds exactly the network the converter fills (same keys and shapes)."""
    import json
    import os

    from bundles.perx2ct.scripts.networks import PerX2CTNet

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overlay = json.load(open(os.path.join(here, "bundles/perx2ct/configs/perx2ct_official.json")))
    base = json.load(open(os.path.join(here, "bundles/perx2ct/configs/inference.json")))["network_def"]
    kwargs = {k: v for k, v in base.items() if k not in ("_target_", "target") and not str(v).startswith("@")}
    kwargs.update({k.split("#", 1)[1]: v for k, v in overlay.items() if k.startswith("network_def#")})
    kwargs.update(
        volume_size=overlay["volume_size"], image_size=overlay["image_size"], spacing=overlay["spacing"]
    )
    ours = PerX2CTNet(**kwargs, geometry="perx2ct")
    trunk, decoder = build_original(ch=128, resolution=128, attn_res=32)
    state = {f"encoder.network_fn.cond_encoder.model.{k}": v for k, v in trunk.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    inferred = convert_official.infer_network_kwargs(state)
    expected = convert_official.build_official_network(inferred)
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    assert ours.camera == "perx2ct" and ours.output_channel == 1 and ours.decode_axis == 0


# -- bad files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_original():
    return build_original(ch=32, resolution=32, attn_res=8)


def test_truncated_or_foreign_files_fail_with_the_file_name(tmp_path, small_original):
    trunk, decoder = small_original
    good = save_lightning(tmp_path / "good.ckpt", trunk, decoder)
    data = good.read_bytes()
    cases = {
        "truncated.ckpt": data[: len(data) // 2],
        "text.ckpt": b"this is not a checkpoint\n" * 10,
        "empty.ckpt": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError, match=name):
            convert_official.convert(str(path), str(tmp_path / "out.pt"))
        assert not (tmp_path / "out.pt").exists()
    with pytest.raises(InputError, match="file not found"):
        convert_official.convert(str(tmp_path / "missing.ckpt"), str(tmp_path / "out.pt"))


def test_other_architectures_are_refused(tmp_path, small_original):
    trunk, decoder = small_original
    bare = tmp_path / "bare.pt"  # a state dict, not a Lightning checkpoint
    torch.save(trunk.state_dict(), bare)
    with pytest.raises(InputError, match="no 'state_dict'"):
        convert_official.convert(str(bare), str(tmp_path / "o.pt"))
    other = tmp_path / "other.ckpt"  # a Lightning checkpoint of another model
    torch.save({"state_dict": {"model.layer.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(InputError, match="not a PerX2CT checkpoint"):
        convert_official.convert(str(other), str(tmp_path / "o.pt"))
    glob_ckpt = save_lightning(tmp_path / "global.ckpt", trunk, decoder,
                               extra_state={"encoder.network_fn.cond_encoder.model.layer3.0.conv1.weight": torch.zeros(1)})  # fmt: skip
    with pytest.raises(InputError, match="PerX2CT_global"):
        convert_official.convert(str(glob_ckpt), str(tmp_path / "o.pt"))


def test_unknown_pickled_globals_are_refused_not_executed(tmp_path, monkeypatch, small_original):
    trunk, decoder = small_original
    module = types.ModuleType("evil_payload")
    calls = []

    class Payload:
        def __reduce__(self):
            return (calls.append, ("ran",))

    Payload.__module__, Payload.__qualname__ = "evil_payload", "Payload"
    module.Payload = Payload
    monkeypatch.setitem(sys.modules, "evil_payload", module)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hparams": Payload()}, path)
    calls.clear()
    with pytest.raises(InputError, match="refusing to unpickle"):
        convert_official.read_lightning_state_dict(str(path))
    assert calls == []


# -- the camera against our DRR convention ------------------------------------------------------------
def test_released_camera_sees_a_drr_blob_where_our_projector_puts_it():
    """Our DRRs (radiologist display) through the released camera's view flips land on the blob's voxel.

    The volume is a 320 mm cube (the original's CT) rendered with PerX2CT's plastimatch geometry (SAD 700,
    SID 949, 500 mm detector), which the released camera (radius 1 = 320 mm, fov 60) matches at the
    isocentre plane; the blob sits in that plane for each view, so perspective differences vanish. This
    pins our reading of the original's conventions (its PNGs oriented as ours, its array = reversed RAS).
    """
    from common.drr import drr_to_image, get_geometry, render_drr
    from common.intensity import hu_to_mu

    n, spacing = 32, 10.0
    geom = get_geometry("perx2ct").resized(64)
    idx = torch.arange(n, dtype=torch.float32)
    gx, gy, gz = torch.meshgrid(idx, idx, idx, indexing="ij")
    for view, centre in (("pa", (6.0, 15.5, 23.0)), ("lateral", (15.5, 25.0, 8.0))):  # RAS voxel coords
        d2 = (gx - centre[0]) ** 2 + (gy - centre[1]) ** 2 + (gz - centre[2]) ** 2
        hu = -1000.0 + 3000.0 * torch.exp(-d2 / 2.0)
        image = drr_to_image(render_drr(hu_to_mu(hu)[None, None], (spacing,) * 3, geom, view))[0, 0]
        seen = perx2ct_view_orientation(image, view)
        d = [n - 1 - centre[2], n - 1 - centre[1], n - 1 - centre[0]]  # the original's (D0, D1, D2)
        unit = (torch.tensor(d) - (n - 1) / 2) / n
        grid = perx2ct_project(unit, view).view(1, 1, 1, 2)
        value = F.grid_sample(seen[None, None], grid, align_corners=True).item()
        assert value > 0.85 * float(image.max()), (view, value, float(image.max()))
    onehot = np.zeros((n, n, n), np.float32)
    onehot[3, 10, 29] = 1  # RAS (X, Y, Z)
    assert np.argwhere(ras_to_perx2ct(onehot))[0].tolist() == [n - 1 - 29, n - 1 - 10, n - 1 - 3]
    np.testing.assert_array_equal(perx2ct_to_ras(ras_to_perx2ct(onehot)), onehot)


def test_perx2ct_grids_match_the_independent_camera():
    grids = perx2ct_camera_grids(32, 8, axis=1)
    world = (np.arange(32) - 15.5) / 32
    coarse = world[::4] + (world[1] - world[0]) * 1.5
    pts = np.stack(np.meshgrid(coarse, world[5:6], coarse, indexing="ij"), -1)[:, 0].reshape(-1, 3)
    for view in ("pa", "lateral"):
        torch.testing.assert_close(grids[view][5].reshape(-1, 2), camera_grid(pts, view), rtol=0, atol=1e-6)
