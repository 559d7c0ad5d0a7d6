"""X-ray -> latent sample -> decoded CT in HU, with MONAI's DiffusionInferer and DDPM/DDIM schedulers.

MONAI's ``LatentDiffusionInferer`` decodes the whole latent in one pass of the autoencoder; large CTs need
the VQ-GAN's sliding-window decoder (bundles.vqgan_3d_patch.scripts.codec.decode_latents), so sampling uses
``DiffusionInferer.sample`` on latents and decodes separately.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from bundles.vqgan_3d_patch.scripts.codec import decode_latents
from common.intensity import get_window
from common.volume import Volume

REFERENCE_TIMESTEPS = 1000  # LDM's chain length, for which beta_start/beta_end are given


def make_scheduler(
    kind: str = "ddim",
    num_train_timesteps: int = 1000,
    num_inference_steps: int | None = 50,
    schedule: str = "scaled_linear_beta",
    beta_start: float = 0.0015,
    beta_end: float = 0.0195,
):
    """DDPM or DDIM with the training schedule; sampling steps set. Latents are not clipped to [-1, 1].

    ``beta_start``/``beta_end`` are LDM's per-step values for a 1000-step chain; a chain of
    ``num_train_timesteps`` = T steps uses them times 1000 / T, so that every chain ends in (nearly) pure
    noise (alpha_bar_T ~ 1e-4). Unscaled, a 100-step chain ends at alpha_bar_T = 0.41: its last training
    step still holds 64 % of the signal, while sampling starts from pure noise, a state the model never
    saw (this made the CPU-size demo's samples meaningless).
    """
    scale = REFERENCE_TIMESTEPS / float(num_train_timesteps)
    if beta_end * scale >= 1.0:
        raise ValueError(
            f"num_train_timesteps {num_train_timesteps} is too short for beta_end {beta_end} (scaled beta >= 1)"
        )
    common = dict(
        num_train_timesteps=num_train_timesteps,
        schedule=schedule,
        beta_start=beta_start * scale,
        beta_end=beta_end * scale,
        clip_sample=False,
    )
    if kind == "ddpm":
        scheduler = DDPMScheduler(**common)
    elif kind == "ddim":
        scheduler = DDIMScheduler(**common)
    else:
        raise ValueError(f"scheduler kind must be 'ddpm' or 'ddim', got {kind!r}")
    if num_inference_steps:
        scheduler.set_timesteps(int(num_inference_steps))
    return scheduler


@torch.no_grad()
def sample_latents(
    network: torch.nn.Module,
    xray: torch.Tensor,
    latent_shape: Sequence[int],
    scheduler,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    verbose: bool = False,
) -> torch.Tensor:
    """Sample scaled latents (B, C, X', Y', Z') for X-rays (B, 1, H, W).

    ``guidance_scale`` 1 is the plain conditional model (one network call per step); other values use
    classifier-free guidance (two calls per step, MONAI's ``cfg``).
    """
    if noise is None:
        noise = torch.randn(
            (xray.shape[0], *[int(s) for s in latent_shape]), generator=generator, device="cpu"
        ).to(xray.device)
    inferer = DiffusionInferer(scheduler)
    cfg = None if float(guidance_scale) == 1.0 else float(guidance_scale)
    return inferer.sample(
        noise, network, scheduler, conditioning=xray, mode="crossattn", verbose=verbose, cfg=cfg
    )


@torch.no_grad()
def latents_to_unit_ct(
    vqgan: torch.nn.Module,
    latents: torch.Tensor,
    scale_factor: float,
    roi: Sequence[int],
    overlap: float = 0.25,
    requantize: bool = True,
    out_size: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Scaled latents -> CT in [0, 1] (B, 1, X, Y, Z) by the VQ-GAN's sliding-window decoder."""
    z = latents.float() / float(scale_factor)
    ct = decode_latents(
        vqgan,
        z,
        roi=roi,
        overlap=overlap,
        out_size=out_size,
        requantize=requantize,
        sw_device=device,
        device="cpu",
    )
    return ct.as_subclass(torch.Tensor).clamp(0.0, 1.0) if hasattr(ct, "as_subclass") else ct.clamp(0.0, 1.0)


def unit_to_volume(unit_ct: torch.Tensor, spacing: Sequence[float], hu_window: str = "xray2ct") -> Volume:
    """One (1, X, Y, Z) or (X, Y, Z) [0, 1] CT -> HU :class:`Volume`, canonical RAS, centred at the origin."""
    array = (
        get_window(hu_window).from_unit(unit_ct.detach().float().cpu().reshape(unit_ct.shape[-3:])).numpy()
    )
    return Volume.from_spacing(array.astype(np.float32), spacing)


class LatentCTSampler(Inferer):
    """MONAI ``Inferer`` for evaluators: X-ray batch in, decoded CT in [0, 1] out (sample + decode)."""

    def __init__(
        self,
        vqgan: torch.nn.Module,
        latent_shape: Sequence[int],
        scale_factor: float,
        scheduler,
        roi: Sequence[int],
        overlap: float = 0.25,
        guidance_scale: float = 1.0,
        requantize: bool = True,
        out_size: Sequence[int] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.vqgan = vqgan
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.scale_factor = float(scale_factor)
        self.scheduler = scheduler
        self.roi = tuple(int(r) for r in roi)
        self.overlap = overlap
        self.guidance_scale = guidance_scale
        self.requantize = requantize
        self.out_size = out_size
        self.seed = seed

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        xray = torch.as_tensor(inputs).as_subclass(torch.Tensor)
        generator = torch.Generator().manual_seed(self.seed)
        latents = sample_latents(
            network, xray, self.latent_shape, self.scheduler, self.guidance_scale, generator=generator
        )
        return latents_to_unit_ct(
            self.vqgan, latents, self.scale_factor, self.roi, self.overlap, self.requantize, self.out_size,
            device=xray.device,
        )  # fmt: skip
