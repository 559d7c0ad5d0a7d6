"""latent_ddpm: the model learns, DDIM sampling geometry, guidance scale 1, X-ray -> latent -> CT chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bundles.latent_ddpm.scripts.data import load_latent, read_latent_datalist
from bundles.latent_ddpm.scripts.demo import random_vqgan
from bundles.latent_ddpm.scripts.extract_latents import extract_latents
from bundles.latent_ddpm.scripts.inference import (
    latents_to_unit_ct,
    make_scheduler,
    sample_latents,
    unit_to_volume,
)
from bundles.latent_ddpm.scripts.networks import XrayConditionedUNet
from common.codec import latent_factor, load_vqgan
from common.sliding_window import LatentSlidingWindowInferer
from common.xray import load_view

TINY = dict(
    channels=(16, 32), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
    cross_attention_dim=16, xray_init_features=8, xray_growth_rate=8, xray_block_config=(2, 2), xray_token_grid=None,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_latents(phantom_pairs, tmp_path_factory):
    """A randomly initialised tiny VQ-GAN (vqgan_3d_patch network_def + cpu_tiny, with its record) and the latents."""
    root = tmp_path_factory.mktemp("latent_ddpm_model")
    ckpt = random_vqgan(str(root / "vqgan.pt"))
    vqgan = load_vqgan(ckpt)
    manifest = extract_latents(str(phantom_pairs["root"]), str(ckpt), str(root / "latents"), roi=32)
    return dict(vqgan=vqgan, meta=read_latent_datalist(manifest), manifest=manifest, ckpt=ckpt)


def test_latent_cache_geometry_and_resume(tiny_latents):
    meta = tiny_latents["meta"]
    factor = latent_factor(tiny_latents["vqgan"])
    assert factor == 8
    assert meta["latent_shape"] == [8, 4, 4, 4]  # embedding_dim 8, 32 / 8
    assert meta["image_size"] == [32, 32, 32] and meta["spacing"] == pytest.approx([10.0] * 3)
    train = np.stack([load_latent(i["latent"]) for i in meta["training"]])
    assert meta["scale_factor"] == pytest.approx(1.0 / train.std(), rel=1e-5)
    # resume: a second run skips existing files and writes the same manifest
    before = {i["latent"]: Path(i["latent"]).stat().st_mtime_ns for i in meta["training"]}
    again = read_latent_datalist(
        extract_latents(
            str(Path(meta["training"][0]["ct"]).parents[1]), str(tiny_latents["ckpt"]),
            str(Path(tiny_latents["manifest"]).parent), roi=32,
        )
    )  # fmt: skip
    assert again["scale_factor"] == pytest.approx(meta["scale_factor"])
    assert {i["latent"]: Path(i["latent"]).stat().st_mtime_ns for i in again["training"]} == before


def _fixed_batch(meta):
    items = meta["training"][:2]
    z = torch.stack([torch.from_numpy(load_latent(i["latent"])) for i in items]) * meta["scale_factor"]
    x = torch.stack([torch.from_numpy(load_view(i["pa"], 32))[None] for i in items])
    return z, x


def test_noise_prediction_training_lowers_loss(tiny_latents):
    torch.manual_seed(0)
    z, x = _fixed_batch(tiny_latents["meta"])
    net = XrayConditionedUNet(z.shape[1], condition_dropout=0.0, **TINY)
    scheduler = make_scheduler("ddpm", 100, None)
    noise = torch.randn_like(z)
    t = torch.tensor([10, 60])
    noisy = scheduler.add_noise(z, noise, t)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def loss_fn():
        return torch.nn.functional.mse_loss(net(noisy, t, context=x), noise)

    with torch.no_grad():
        first = loss_fn().item()
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn().item()
    assert first == pytest.approx(1.0, abs=0.35)  # zero-initialised output conv: loss starts at E[noise^2]
    assert last < 0.6 * first, (first, last)


def _trained_net(latent_channels):
    torch.manual_seed(1)
    net = XrayConditionedUNet(latent_channels, condition_dropout=0.5, **TINY)
    with (
        torch.no_grad()
    ):  # MONAI zero-initialises output and attention projections: make the condition matter
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net.eval()


def test_ddim_two_steps_shape_and_guidance_scale_one(tiny_latents):
    meta = tiny_latents["meta"]
    z, x = _fixed_batch(meta)
    net = _trained_net(z.shape[1])
    scheduler = make_scheduler("ddim", 100, 2)
    assert len(scheduler.timesteps) == 2

    def run(scale):
        return sample_latents(
            net, x, meta["latent_shape"], scheduler, scale, generator=torch.Generator().manual_seed(3)
        )

    plain, guided = run(1.0), run(3.0)
    assert plain.shape == (2, *meta["latent_shape"]) and plain.dtype == torch.float32
    assert torch.isfinite(plain).all()
    assert not torch.allclose(plain, guided)
    # MONAI's cfg path with scale 1 (uncond + 1 * (cond - uncond)) equals the plain conditional path
    from monai.inferers import DiffusionInferer

    noise = torch.randn((2, *meta["latent_shape"]), generator=torch.Generator().manual_seed(3))
    cfg_one = DiffusionInferer(scheduler).sample(
        noise, net, scheduler, conditioning=x, verbose=False, cfg=1.0
    )
    torch.testing.assert_close(cfg_one, plain, rtol=1e-3, atol=1e-4)  # x0 = x_T / sqrt(1e-4): float noise x100


def test_xray_to_ct_chain(tiny_latents):
    meta = tiny_latents["meta"]
    xray = load_view(meta["test"][0]["pa"], 32)
    net = _trained_net(meta["latent_shape"][0])
    latents = sample_latents(
        net, torch.from_numpy(xray)[None, None], meta["latent_shape"], make_scheduler("ddim", 100, 2)
    )
    unit = latents_to_unit_ct(tiny_latents["vqgan"], latents, meta["scale_factor"], LatentSlidingWindowInferer((32, 32, 32)))
    assert unit.shape == (1, 1, 32, 32, 32)
    vol = unit_to_volume(unit[0], meta["spacing"])
    assert vol.shape == (32, 32, 32) and vol.spacing == pytest.approx((10.0, 10.0, 10.0))
    assert vol.orientation == "RAS" and vol.array.dtype == np.float32
    assert np.isfinite(vol.array).all() and vol.array.min() >= -1024.0 and vol.array.max() <= 2048.0
