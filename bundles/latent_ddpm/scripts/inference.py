"""The latent diffusion model's Python inference API: X-ray -> latent sample -> decoded CT in HU.

Sampling is MONAI's ``DiffusionInferer.sample`` with a DDPM or DDIM scheduler; the sampled latent is decoded
by the VQ-GAN codec (:mod:`common.codec`) with sliding windows, because MONAI's ``LatentDiffusionInferer``
decodes the whole latent in one pass, which large CTs do not fit. :class:`LatentCTSampler` is that path as
a MONAI ``Inferer`` (X-ray batch -> CT in [0, 1]; evaluation and inference use it); :class:`LatentCTGenerator`
turns X-ray files into NIfTI volumes (HU, the training data's spacing) and previews with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from tqdm import tqdm

from common.checkpoint import load_weights
from common.codec import decode_latents
from common.intensity import get_window
from common.io import save_volume
from common.preview import save_montage_png, save_slice_gif
from common.sliding_window import LatentSlidingWindowInferer
from common.volume import Volume
from common.xray import load_view

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
    ``num_train_timesteps`` = T steps uses them times 1000 / T (as the configs' ``beta_start``/``beta_end``),
    so that every chain ends in (nearly) pure noise (alpha_bar_T ~ 1e-4). Unscaled, a 100-step chain ends at
    alpha_bar_T = 0.41: its last training step still holds 64 % of the signal while sampling starts from
    pure noise, a state the model never saw.
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
    inferer: LatentSlidingWindowInferer,
    requantize: bool = True,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Scaled latents -> CT in [0, 1] (B, 1, X, Y, Z) by the VQ-GAN's sliding-window decoder (``inferer``)."""
    z = latents.float() / float(scale_factor)
    ct = decode_latents(vqgan, z, inferer, out_size=out_size, requantize=requantize)
    return torch.as_tensor(ct).as_subclass(torch.Tensor).clamp(0.0, 1.0)


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
        latent_space: dict,
        scheduler,
        codec_inferer: LatentSlidingWindowInferer,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        requantize: bool = True,
        out_size: Sequence[int] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.vqgan = vqgan
        self.latent_shape = tuple(int(s) for s in latent_space["latent_shape"])
        self.scale_factor = float(latent_space["scale_factor"])
        self.scheduler = scheduler
        if num_inference_steps:
            scheduler.set_timesteps(int(num_inference_steps))
        self.codec_inferer = codec_inferer
        self.guidance_scale = guidance_scale
        self.requantize = requantize
        self.out_size = out_size if out_size is not None else latent_space.get("image_size")
        self.seed = seed

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        xray = torch.as_tensor(inputs).as_subclass(torch.Tensor)
        generator = torch.Generator().manual_seed(self.seed)
        latents = sample_latents(
            network, xray, self.latent_shape, self.scheduler, self.guidance_scale, generator=generator
        )
        return latents_to_unit_ct(
            self.vqgan, latents, self.scale_factor, self.codec_inferer, self.requantize, self.out_size
        )


class LatentCTGenerator:
    """X-ray files -> CT volumes: the model-domain X-ray, :class:`LatentCTSampler` (the inferer), HU volume.

    ``inferer`` samples and decodes (its scheduler, steps, guidance, seed and the VQ-GAN codec);
    ``latent_space["spacing"]`` is the training data's voxel spacing given to the output.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: LatentCTSampler,
        latent_space: dict,
        xray_size: int,
        hu_window: str = "xray2ct",
        device: str | torch.device = "cpu",
    ):
        self.network = network.eval()
        self.inferer = inferer
        self.spacing = tuple(float(s) for s in latent_space["spacing"])
        self.xray_size = int(xray_size)
        self.hu_window = hu_window
        self.device = torch.device(device)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        load_weights(self.network, path, expected_bundle="latent_ddpm")
        self.network.eval()

    @torch.no_grad()
    def generate(self, xray) -> tuple[Volume, torch.Tensor]:
        """An X-ray path or (H, W) [0, 1] array -> (HU Volume, the model-domain X-ray (size, size))."""
        image = torch.from_numpy(load_view(xray, self.xray_size))
        unit = self.inferer(image[None, None].to(self.device), self.network)
        return unit_to_volume(unit[0], self.spacing, self.hu_window), image

    def predict_files(self, files: Sequence[str], output_dir: str, previews: bool = True) -> list[str]:
        """Write ``<output_dir>/<case>_ct.nii.gz`` (+ montage PNG and axial GIF) per X-ray; returns NIfTI paths.

        ``<case>`` is :func:`common.datalist.case_id` of the file (``<case>/pa.nii.gz`` -> ``<case>``).
        """
        from common.datalist import case_id

        os.makedirs(output_dir, exist_ok=True)
        written = []
        for path in tqdm(list(files), desc="X-ray -> CT"):
            path = os.fspath(path)
            name = case_id({"image": path})
            volume, image = self.generate(path)
            out = save_volume(volume, os.path.join(output_dir, f"{name}_ct.nii.gz"))
            if previews:
                save_montage_png(
                    os.path.join(output_dir, f"{name}_montage.png"),
                    {"generated": volume},
                    {"input": image.numpy()},
                )
                save_slice_gif(os.path.join(output_dir, f"{name}_axial.gif"), volume)
            written.append(out)
        return written
