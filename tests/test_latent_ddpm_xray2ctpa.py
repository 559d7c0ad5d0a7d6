"""X-ray2CTPA (NoaCahan/X-ray2CTPA): BiomedCLIP's image tower from a local open_clip file, trained, concatenated to
the time embedding with scale/shift in every ResNet block; epsilon + L1 + 0.01 LPIPS on the rebuilt x0.

No download: files in open_clip's BiomedCLIP key layout (``visual.trunk.*`` = timm ``vit_base_patch16_224``,
``visual.head.proj.weight``, plus text-tower tensors that are ignored) are written from a plain-torch ViT in
timm's layout (below, test-only: timm and open_clip import torchvision, which does not work beside our
torch), at random weights, then loaded into our MONAI-ViT tower and compared with that ViT's forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDPMScheduler

from bundles.latent_ddpm.scripts.data import TargetPrepareBatch
from bundles.latent_ddpm.scripts.networks import (
    CLIP_MEAN,
    CLIP_STD,
    XRAY2CTPA_MEAN,
    XRAY2CTPA_STD,
    BiomedCLIPImageEncoder,
    ScaleShiftResnetBlock,
    XrayConditionedUNet,
    optimizer_param_groups,
)
from bundles.latent_ddpm.scripts.objective import EpsilonPerceptualLoss, radimagenet_perceptual_loss
from common.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "latent_ddpm" / "configs"


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = (
            self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        )
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5
        x = x + self.attn.proj((attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class TimmViTTower(nn.Module):
    """timm VisionTransformer (class token, learned pos_embed over 1 + patches) + open_clip's linear head."""

    def __init__(self, image=224, patch=16, dim=768, layers=12, heads=12, mlp=3072, embed=512):
        super().__init__()
        self.trunk = nn.Module()
        self.trunk.patch_embed = nn.Module()
        self.trunk.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.trunk.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.trunk.pos_embed = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim) * 0.02)
        self.trunk.blocks = nn.Sequential(*[TimmBlock(dim, heads, mlp) for _ in range(layers)])
        self.trunk.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Module()
        self.head.proj = nn.Linear(dim, embed, bias=False)

    def forward(self, rgb):  # rgb already resized and CLIP-normalised
        t = self.trunk
        x = t.patch_embed.proj(rgb).flatten(2).transpose(1, 2)
        x = torch.cat([t.cls_token.expand(x.shape[0], -1, -1), x], 1) + t.pos_embed
        x = t.norm(t.blocks(x))
        return F.normalize(self.head.proj(x[:, 0]), dim=-1)


def save_open_clip(path, tower: nn.Module):
    state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    state["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 8)  # ignored
    state["logit_scale"] = torch.tensor(4.6)
    torch.save(state, path)
    return path


SMALL = dict(image_size=32, patch_size=16, width=64, layers=2, heads=4, mlp_dim=128, embed_dim=32)


def small_tower(seed=0):
    torch.manual_seed(seed)
    tower = TimmViTTower(image=32, patch=16, dim=64, layers=2, heads=4, mlp=128, embed=32)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-trivial norms and biases
    return tower.eval()


def test_biomedclip_tower_matches_the_timm_layout_forward(tmp_path):
    tower = small_tower()
    path = save_open_clip(tmp_path / "open_clip_pytorch_model.bin", tower)
    ours = BiomedCLIPImageEncoder(str(path), **SMALL)
    xray = torch.rand(3, 1, 48, 40)
    rgb = F.interpolate(xray.expand(-1, 3, -1, -1), size=(32, 32), mode="bicubic", align_corners=False)
    rgb = (rgb - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = tower(rgb)
        got = ours(xray)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    ours.train()
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())  # frozen


def test_full_size_biomedclip_layout_loads_and_runs(tmp_path):
    """The real BiomedCLIP image architecture (ViT-B/16, 224 px, 512-d) at random weights."""
    tower = TimmViTTower().eval()
    path = save_open_clip(tmp_path / "open_clip_pytorch_model.bin", tower)
    state = torch.load(path, weights_only=True)
    assert state["visual.trunk.pos_embed"].shape == (1, 197, 768)
    assert state["visual.trunk.blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert state["visual.head.proj.weight"].shape == (512, 768)
    ours = BiomedCLIPImageEncoder(str(path))
    xray = torch.rand(1, 1, 224, 224)
    rgb = (xray.expand(-1, 3, -1, -1) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(xray), tower(rgb), rtol=0, atol=1e-4)


def test_bad_biomedclip_files_fail_clearly(tmp_path):
    tower = small_tower()
    good = save_open_clip(tmp_path / "good.bin", tower)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(InputError, match="truncated.bin: not a readable PyTorch weights file"):
        BiomedCLIPImageEncoder(str(truncated), **SMALL)
    other = tmp_path / "densenet.pth"
    torch.save({"features.conv0.weight": torch.zeros(64, 1, 7, 7)}, other)
    with pytest.raises(InputError, match="densenet.pth: not an open_clip BiomedCLIP checkpoint"):
        BiomedCLIPImageEncoder(str(other), **SMALL)
    with pytest.raises(InputError, match=r"good.bin: .* here: not ViT-B/16"):  # another width
        BiomedCLIPImageEncoder(str(good), **{**SMALL, "width": 32, "mlp_dim": 64})
    with pytest.raises(InputError, match="not found"):
        BiomedCLIPImageEncoder(str(tmp_path / "missing.bin"), **SMALL)


PAPER = dict(trainable=True, mean=XRAY2CTPA_MEAN, std=XRAY2CTPA_STD, resize_mode="bilinear")
UNET = dict(latent_channels=4, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
            num_head_channels=8, norm_num_groups=4, condition_dropout=0.0)  # fmt: skip


def paper_unet(path, embed_dim=512, seed=0, **kwargs) -> XrayConditionedUNet:
    """X-ray2CTPA's conditioning alone (no tokens) with a small stand-in tower of BiomedCLIP's interface."""
    torch.manual_seed(seed)
    net = XrayConditionedUNet(**{**UNET, **kwargs}, xray_tokens=False,
                              image_embedding={"weights_path": str(path), **SMALL, "embed_dim": embed_dim, **PAPER})  # fmt: skip
    with torch.no_grad():  # MONAI zero-initialises conv2 and the output conv: no gradient would pass them
        for p in net.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.1)
    return net


def tower_file(tmp_path, embed=512):
    torch.manual_seed(1)
    tower = TimmViTTower(image=32, patch=16, dim=64, layers=2, heads=4, mlp=128, embed=embed).eval()
    return save_open_clip(tmp_path / "open_clip_pytorch_model.bin", tower), tower


@pytest.mark.parametrize(
    "settings, mean, std, mode",
    [
        ({}, CLIP_MEAN, CLIP_STD, "bicubic"),  # open_clip's BiomedCLIP preprocessing (the class default)
        (PAPER, (0.633,) * 3, (0.181,) * 3, "bilinear"),  # X-ray2CTPA preprocess/preprocess_xray.py:29-39
    ],
)
def test_tower_input_normalisation(tmp_path, settings, mean, std, mode):
    path, tower = tower_file(tmp_path, embed=32)
    ours = BiomedCLIPImageEncoder(str(path), **SMALL, **settings)
    xray = torch.rand(2, 1, 50, 44)
    rgb = (xray.expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    rgb = F.interpolate(rgb, size=(32, 32), mode=mode, align_corners=False)  # normalise, then resize (original)
    with torch.no_grad():
        # float32 rounding of (x - m) / s (|x| <= 1 / 0.181) through two blocks: 1e-5 as in the other tower tests
        torch.testing.assert_close(ours(xray), tower(rgb), rtol=0, atol=1e-5)
    assert ours.trainable == bool(settings) and all(p.requires_grad for p in ours.parameters()) == bool(settings)


def test_conditioning_path_has_the_original_shapes(tmp_path):
    """Unet3D (ddpm/diffusion.py:463-497): time_dim = 4 * dim, cond_dim = time_dim + 512, every conditioned
    ResnetBlock maps SiLU(cat(t, cond)) by Linear(cond_dim, 2 * dim_out) to scale and shift."""
    path, _ = tower_file(tmp_path)
    net = paper_unet(path)
    time_dim = 4 * UNET["channels"][0]
    assert net.cond_dim == time_dim + 512 == 544
    assert net.xray_encoder is None and not net.unet.with_conditioning  # the paper has no cross-attention
    blocks = [m for m in net.unet.modules() if "ResnetBlock" in type(m).__name__]
    assert blocks and all(type(m) is ScaleShiftResnetBlock for m in blocks)
    for block in blocks:
        assert block.time_emb_proj.in_features == 544
        assert block.time_emb_proj.out_features == 2 * block.out_channels
    seen = []
    hook = blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[1].detach()))
    x, t, xray = torch.randn(2, 4, 8, 8, 8), torch.tensor([3, 700]), torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        net(x, t, context=xray)
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        time_emb = net.unet.time_embed[:-1](get_timestep_embedding(t, UNET["channels"][0]))
        expected = torch.cat([time_emb, net.image_encoder(xray)], dim=1)  # exact: a sum with zeros
    hook.remove()
    assert seen[0].shape == (2, 544)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_scale_shift_block_is_the_hand_computation():
    torch.manual_seed(0)
    block = ScaleShiftResnetBlock(spatial_dims=3, in_channels=4, temb_channels=12, out_channels=8, norm_num_groups=2)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    x, emb = torch.randn(2, 4, 5, 5, 5), torch.randn(2, 12)
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = block.time_emb_proj(F.silu(emb)).chunk(2, dim=1)
    h = block.norm2(h) * (1 + scale[..., None, None, None]) + shift[..., None, None, None]  # the paper's modulation
    expected = block.skip_connection(x) + block.conv2(F.silu(h))
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), expected.detach(), rtol=0, atol=0)  # the same operations


def test_gradients_reach_the_trainable_encoder_with_its_own_learning_rate(tmp_path):
    path, _ = tower_file(tmp_path)
    net = paper_unet(path)
    x, t, xray = torch.randn(2, 4, 8, 8, 8), torch.tensor([3, 700]), torch.rand(2, 1, 40, 40)
    net(x, t, context=xray).square().mean().backward()
    used = [(n, p) for n, p in net.image_encoder.named_parameters() if ".norm_cross_attn." not in n]  # MONAI's unused
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in used), [n for n, p in used if p.grad is None]
    groups = optimizer_param_groups(net, 1e-4)
    enc = {id(p) for p in net.image_encoder.parameters()}
    assert [len(g["params"]) for g in groups] == [len(list(net.parameters())) - len(enc), len(enc)]
    assert groups[1]["lr"] == 1e-4 and {id(p) for p in groups[1]["params"]} == enc
    opt = torch.optim.AdamW(groups, lr=1e-3)
    before = net.image_encoder.proj.weight.detach().clone()
    opt.step()
    # AdamW's first step moves every weight with a gradient by ~lr (sign of the gradient) plus lr * wd * w
    assert (net.image_encoder.proj.weight - before).abs().max().item() == pytest.approx(1e-4, rel=0.05)
    frozen = XrayConditionedUNet(**UNET, xray_tokens=False,
                                 image_embedding={"weights_path": str(path), **SMALL, "embed_dim": 512})  # fmt: skip
    frozen(x, t, context=xray).square().mean().backward()
    assert all(p.grad is None for p in frozen.image_encoder.parameters())
    assert len(optimizer_param_groups(frozen, 1e-4)) == 1
    with pytest.raises(ValueError, match="image_embedding"):
        XrayConditionedUNet(**UNET, xray_tokens=False)


def test_tokens_and_embedding_together_and_guidance_fill(tmp_path):
    path, _ = tower_file(tmp_path, embed=32)
    torch.manual_seed(0)
    net = XrayConditionedUNet(**UNET, cross_attention_dim=8, xray_init_features=4, xray_growth_rate=4,
                              xray_block_config=(1, 1), xray_token_grid=2,
                              image_embedding={"weights_path": str(path), **SMALL})  # fmt: skip
    x, t, xray = torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 500]), torch.rand(2, 1, 32, 32)
    assert net(x, t, context=xray).shape == x.shape and net.cond_dim == 32 + 32
    uncond = net(x, t, context=torch.full_like(xray, -1.0))  # classifier-free guidance's fill value
    torch.testing.assert_close(net(x, t, context=None), uncond)


class Identity2D(torch.nn.Module):
    """A stand-in perceptual distance d(a, b) = mean((a - b)^2): zero for equal slices, known gradient."""

    def forward(self, a, b):
        return (a - b).square().mean()


def _batch(channels=8, b=3, seed=0):
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015,
                              beta_end=0.0195, clip_sample=False, prediction_type="epsilon")  # fmt: skip
    prepare = TargetPrepareBatch(scheduler, 1000, condition_name="pa", prediction_type="epsilon")
    torch.manual_seed(seed)
    batch = {"image": torch.randn(b, channels, 4, 5, 6), "pa": torch.rand(b, 1, 16, 16)}
    images, target, _, kwargs = prepare(batch)
    return scheduler, prepare, images, target, kwargs


def test_epsilon_loss_is_l1_plus_perceptual_on_the_rebuilt_x0():
    """ddpm/diffusion.py:1056-1082: L1(noise, pred) + 0.01 * LPIPS(x0_hat slice, x0 slice), one random depth
    slice per sample (lpips_loss_fn), x0_hat = sqrt(1/a) x_t - sqrt(1/a - 1) pred (predict_start_from_noise)."""
    scheduler, prepare, images, target, kwargs = _batch()
    assert target is kwargs["noise"]  # epsilon: the target is the noise
    loss_fn = EpsilonPerceptualLoss(scheduler, prepare, perceptual=Identity2D(), perceptual_weight=0.01)
    pred = target + 0.3 * torch.randn_like(target)
    torch.manual_seed(7)
    got = loss_fn(pred, target)
    a = scheduler.alphas_cumprod[kwargs["timesteps"]].view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * images + (1 - a).sqrt() * target
    x0_hat = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    torch.manual_seed(7)
    z = torch.randint(0, images.shape[-1], (images.shape[0],))
    idx = torch.arange(images.shape[0])
    expected = (pred - target).abs().mean() + 0.01 * (x0_hat[idx, ..., z] - images[idx, ..., z]).square().mean()
    # x0_hat carries 1/sqrt(a) (<= 15 at t = T) times float32 rounding of O(1) terms: 1e-5 relative
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    torch.manual_seed(7)
    exact = loss_fn(target.clone(), target)  # a perfect noise estimate rebuilds x0: both terms vanish
    assert exact.item() < 1e-9  # (15 * 2**-24 * O(1))^2 * 0.01


def test_epsilon_loss_refuses_another_batch_or_objective():
    scheduler, prepare, _, target, _ = _batch()
    loss_fn = EpsilonPerceptualLoss(scheduler, prepare, perceptual=Identity2D())
    with pytest.raises(RuntimeError, match="did not prepare this batch"):
        loss_fn(target.clone(), target.clone())
    assert EpsilonPerceptualLoss(scheduler, prepare, perceptual_weight=0).perceptual is None
    x0_prepare = TargetPrepareBatch(DDPMScheduler(1000, prediction_type="sample"), 1000, prediction_type="sample")
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonPerceptualLoss(scheduler, x0_prepare)


class KerasBottleneck(nn.Module):
    """RadImageNet's ResNet-50 block (Keras layout: stride on the first 1x1 conv, biased convs, BN eps 1.001e-5)."""

    def __init__(self, cin, width, stride):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, eps=1.001e-5)  # noqa: E731
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, stride), bn(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1), bn(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1), bn(4 * width)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride), bn(4 * width)) if stride != 1 or cin != 4 * width else None
        )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(h)))))
        return F.relu(h + (self.downsample(x) if self.downsample is not None else x))


class RadImageNetResNet50(nn.Module):
    """The architecture MONAI's hub model ``radimagenet_resnet50`` returns (features of layer4), random weights."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3), nn.BatchNorm2d(64, eps=1.001e-5)
        cin, layers = 64, []
        for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers.append(nn.Sequential(*[KerasBottleneck(cin if i == 0 else 4 * width, width, stride if i == 0 else 1) for i in range(n)]))
            cin = 4 * width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def test_real_perceptual_loss_through_monai_with_a_random_radimagenet(monkeypatch, tmp_path):
    """MONAI's PerceptualLoss(spatial_dims=2, network_type="radimagenet_resnet50") (diffusion.py:798), its hub
    download replaced by a randomly initialised network of the same architecture (no weights here)."""
    calls = []

    def fake_hub_load(repo, model, **kwargs):
        calls.append((repo, model))
        torch.manual_seed(0)
        return RadImageNetResNet50()

    monkeypatch.setattr(torch.hub, "load", fake_hub_load)
    monkeypatch.setattr(torch.hub, "set_dir", lambda d: None)  # MONAI sets the global hub dir to cache_dir
    with pytest.warns(UserWarning, match="cache_dir"):
        perceptual = radimagenet_perceptual_loss(str(tmp_path / "hub"))
    assert calls == [("Project-MONAI/perceptual-models:main", "radimagenet_resnet50")]
    assert sum(p.numel() for p in perceptual.parameters()) > 23_000_000 and not any(p.requires_grad for p in perceptual.parameters())
    scheduler, prepare, _, target, _ = _batch(channels=8, b=2)
    loss_fn = EpsilonPerceptualLoss(scheduler, prepare, perceptual=perceptual, perceptual_weight=0.01)
    pred = (target + 0.5 * torch.randn_like(target)).requires_grad_()
    loss = loss_fn(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > F.l1_loss(pred, target).item()
    assert pred.grad is not None and pred.grad.abs().sum() > 0

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.warns(UserWarning), pytest.raises(InputError, match=r"hub.*RadImageNet-ResNet50_notop.pth"):
        radimagenet_perceptual_loss(str(tmp_path / "hub"))


def test_overlay_reproduces_the_paper_settings(tmp_path, monkeypatch):
    path, _ = tower_file(tmp_path)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in ("train.json", "cpu_tiny.json", "xray2ctpa_encoder.json")])
    parser.update({"bundle_root": str(tmp_path), "biomedclip_weights": str(path),
                   **{f"network_def#image_embedding#{k}": v for k, v in SMALL.items() if k != "embed_dim"}})  # fmt: skip
    assert parser["prediction_type"] == "epsilon" and parser["condition_dropout"] == 0.0
    assert parser["network_def#image_embedding"]["trainable"] is True
    assert (parser["network_def#image_embedding"]["mean"], parser["network_def#image_embedding"]["std"]) == (0.633, 0.181)
    assert parser["network_def#image_embedding"]["resize_mode"] == "bilinear"
    net = parser.get_parsed_content("network")
    assert net.xray_encoder is None and net.cond_dim == 4 * 16 + 512 and net.image_encoder.trainable
    optimizer = parser.get_parsed_content("optimizer")
    assert [g["lr"] for g in optimizer.param_groups] == [parser["learning_rate"], 1e-4]
    monkeypatch.setattr(torch.hub, "load", lambda repo, model, **kw: RadImageNetResNet50())
    monkeypatch.setattr(torch.hub, "set_dir", lambda d: None)
    with pytest.warns(UserWarning, match="cache_dir"):
        loss = parser.get_parsed_content("loss")
    assert isinstance(loss, EpsilonPerceptualLoss) and loss.perceptual_weight == 0.01 and loss.l1_weight == 1.0
    assert loss.prepare_batch is parser.get_parsed_content("prepare_batch")
    assert loss.perceptual is not None


@pytest.mark.slow
def test_overlay_trains_through_monai_bundle_and_infers(phantom_pairs, tmp_path, monkeypatch):
    """One epoch of train.json + cpu_tiny.json + xray2ctpa_encoder.json (small stand-in tower, random
    RadImageNet network), evaluate.json and inference.json with the overlay (the checkpoint record must agree with it)."""
    from monai.bundle import run

    from bundles.latent_ddpm.scripts.demo import random_vqgan
    from common.checkpoint import read_record

    path, _ = tower_file(tmp_path)
    monkeypatch.setattr(torch.hub, "load", lambda repo, model, **kw: RadImageNetResNet50())
    monkeypatch.setattr(torch.hub, "set_dir", lambda d: None)
    common = dict(
        dataset_dir=str(phantom_pairs["root"]), bundle_root=str(REPO / "bundles" / "latent_ddpm"),
        output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"),
        vqgan_checkpoint=random_vqgan(str(tmp_path / "vqgan.pt")), max_epochs=1, sampling_steps=2,
        logging_file=str(CONFIGS / "logging.conf"), meta_file=str(CONFIGS / "metadata.json"),
    )  # fmt: skip
    small = {f"network_def#image_embedding#{k}": v for k, v in SMALL.items() if k != "embed_dim"}
    files = [str(CONFIGS / n) for n in ("train.json", "cpu_tiny.json", "xray2ctpa_encoder.json")]
    with pytest.warns(UserWarning, match="cache_dir"):
        run("training", config_file=files, biomedclip_weights=str(path), **small, **common)
    record = read_record(tmp_path / "models" / "model.pt")
    assert record["inputs"]["prediction_type"] == "epsilon"
    assert record["network_def"]["xray_tokens"] is False
    assert record["network_def"]["image_embedding"]["trainable"] is True
    files = [str(CONFIGS / n) for n in ("train.json", "evaluate.json", "cpu_tiny.json", "xray2ctpa_encoder.json")]
    run("evaluating", config_file=files, biomedclip_weights=str(path), perceptual_weight=0.0, **small, **common)
    report = json.loads((tmp_path / "out" / "metrics_report.json").read_text())
    assert report["n_cases"] == 2 and "psnr_xray2ct" in report["metrics"]
    files = [str(CONFIGS / n) for n in ("inference.json", "cpu_tiny.json", "xray2ctpa_encoder.json")]
    run("inference", config_file=files, biomedclip_weights=str(path), **small, **common)  # the record must agree
    assert len(list((tmp_path / "out" / "predictions").glob("*_ct.nii.gz"))) == 2
