"""X-ray2CTPA conditioning: BiomedCLIP's image tower from a local open_clip file, added to the time embedding.

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

from bundles.latent_ddpm.scripts.networks import (
    CLIP_MEAN,
    CLIP_STD,
    BiomedCLIPImageEncoder,
    XrayConditionedUNet,
)
from common.errors import InputError


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


def test_unet_adds_the_image_embedding_to_the_time_embedding(tmp_path):
    path = save_open_clip(tmp_path / "open_clip_pytorch_model.bin", small_tower())
    kwargs = dict(latent_channels=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                  num_head_channels=8, norm_num_groups=4, cross_attention_dim=8, xray_init_features=4,
                  xray_growth_rate=4, xray_block_config=(1, 1), xray_token_grid=2, condition_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    net = XrayConditionedUNet(**kwargs, image_embedding={"weights_path": str(path), **SMALL})
    with torch.no_grad():
        net.unet.class_embedding.weight.normal_()  # an untrained projection would be small but not zero
        for p in net.unet.parameters():  # MONAI zero-initialises the output convolutions
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.1)
    x, t = torch.randn(2, 2, 8, 8, 8), torch.tensor([10, 500])
    xray = torch.rand(2, 1, 32, 32)
    out = net(x, t, context=xray)
    assert out.shape == x.shape
    emb = net.image_encoder(xray)
    with torch.no_grad():  # the embedding path matters: another embedding changes the prediction
        tokens = net.encode_condition(xray)
        other = net.unet(x, timesteps=t, context=tokens, class_labels=torch.flip(emb, [0]))
    assert (other - out).abs().max() > 1e-4
    out.square().mean().backward()
    assert net.unet.class_embedding.weight.grad.abs().sum() > 0
    assert net.null_embedding.grad is None or not net.null_embedding.grad.any()  # no sample was dropped
    assert all(p.grad is None for p in net.image_encoder.parameters())  # frozen tower
    uncond = net(x, t, context=torch.full_like(xray, -1.0))  # classifier-free guidance's fill value
    torch.testing.assert_close(net(x, t, context=None), uncond)


def test_overlay_names_the_local_file():
    overlay = json.loads(
        (Path(__file__).parents[1] / "bundles/latent_ddpm/configs/xray2ctpa_encoder.json").read_text()
    )
    assert "open_clip_pytorch_model.bin" in overlay["biomedclip_weights"]
    assert overlay["network_def#image_embedding"] == {"weights_path": "@biomedclip_weights"}
