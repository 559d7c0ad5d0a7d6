"""The latent diffusion model's Python inference API: X-ray -> latent sample -> decoded CT in HU.

Sampling is MONAI's ``DiffusionInferer.sample`` with a DDPM or DDIM scheduler; the sampled latent is decoded
by the VQ-GAN codec (:mod:`common.codec`) with sliding windows, because MONAI's ``LatentDiffusionInferer``
decodes the whole latent in one pass, which large CTs do not fit. :class:`LatentCTSampler` is that path as
a MONAI ``Inferer`` (X-ray batch -> CT in [0, 1]; evaluation and inference use it); :class:`LatentCTGenerator`
turns X-ray files into NIfTI volumes (HU, the training data's spacing) and previews with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from tqdm import tqdm

from common.checkpoint import build_for_inference, configured_network_def, load_weights
from common.codec import decode_latents
from common.errors import InputError
from common.intensity import get_window
from common.io import save_volume
from common.preview import save_montage_png, save_slice_gif
from common.sliding_window import LatentSlidingWindowInferer
from common.volume import Volume
from common.xray import load_view

REFERENCE_TIMESTEPS = 1000  # LDM's chain length, for which beta_start/beta_end are given
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_scheduler(
    kind: str = "ddim",
    num_train_timesteps: int = 1000,
    num_inference_steps: int | None = 50,
    schedule: str = "scaled_linear_beta",
    beta_start: float = 0.0015,
    beta_end: float = 0.0195,
    prediction_type: str = "epsilon",
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
        prediction_type=prediction_type,
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
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample scaled latents (B, C, X', Y', Z') for X-rays (B, 1, H, W).

    ``guidance_scale`` 1 is the plain conditional model (one network call per step); other values use
    classifier-free guidance (MONAI's ``cfg``: conditional and unconditional halves in one doubled batch).
    ``progress(done, total)`` is called after every denoising step (a progress bar over the steps).
    """
    if noise is None:
        noise = torch.randn(
            (xray.shape[0], *[int(s) for s in latent_shape]), generator=generator, device="cpu"
        ).to(xray.device)
    inferer = DiffusionInferer(scheduler)
    cfg = None if float(guidance_scale) == 1.0 else float(guidance_scale)
    model = network if progress is None else _StepCounter(network, len(scheduler.timesteps), progress)
    return inferer.sample(
        noise, model, scheduler, conditioning=xray, mode="crossattn", verbose=verbose, cfg=cfg
    )


class _StepCounter(torch.nn.Module):
    """The denoising network, reporting each call (one per sampling step) to ``progress(done, total)``."""

    def __init__(self, network: torch.nn.Module, total: int, progress: Callable[[int, int], None]):
        super().__init__()
        self.network, self.total, self.progress, self.done = network, int(total), progress, 0

    def forward(self, *args, **kwargs):
        out = self.network(*args, **kwargs)
        self.done += 1
        self.progress(min(self.done, self.total), self.total)
        return out


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
        self.num_inference_steps = len(scheduler.timesteps)
        self.codec_inferer = codec_inferer
        self.guidance_scale = guidance_scale
        self.requantize = requantize
        self.out_size = out_size if out_size is not None else latent_space.get("image_size")
        self.seed = seed

    def __call__(
        self,
        inputs: torch.Tensor,
        network,
        *args,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """X-rays (B, 1, H, W) -> CT (B, 1, X, Y, Z) in [0, 1]; steps, guidance and seed default to the config's."""
        xray = torch.as_tensor(inputs).as_subclass(torch.Tensor)
        if num_inference_steps:
            self.scheduler.set_timesteps(int(num_inference_steps))
        generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        guidance = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        latents = sample_latents(
            network, xray, self.latent_shape, self.scheduler, guidance, generator=generator, progress=progress
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
        self.hu_window = get_window(hu_window)
        self.device = torch.device(device)
        self.network.to(self.device)
        self.latent_space = dict(latent_space)
        self.vqgan_checkpoint: str | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        vqgan_checkpoint: str | os.PathLike | None = None,
        config_files: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        bundle_root: str = BUNDLE_ROOT,
        **overrides,
    ) -> LatentCTGenerator:
        """The diffusion model of ``checkpoint`` and its VQ-GAN, built from their records, ready to sample.

        The latent space (shape, scale factor, spacing, CT size, HU window, X-ray size, DRR geometry,
        the codec's windows) is the one the checkpoint records. ``vqgan_checkpoint`` defaults to the file the
        record names; another file than the one whose latents the model learnt is refused (sha256).
        ``config_files`` / ``overrides`` (``inference.json`` + overlays) are checked against the record
        (:func:`common.checkpoint.build_for_inference`); sampling settings (scheduler kind and betas,
        ``sampling_steps``, ``guidance_scale``, ``sample_seed``, ``requantize``) come from them.
        """
        from bundles.latent_ddpm.scripts.data import check_codec, latent_space
        from common.codec import load_vqgan

        default = [os.path.join(bundle_root, "configs", "inference.json")]
        network, record, parser = build_for_inference(
            checkpoint,
            config_files=config_files,
            default_config_files=default,
            expected_bundle="latent_ddpm",
            runtime_arguments=("condition_dropout",),
            input_ids=("hu_window", "xray_size", "num_train_timesteps"),
            overrides=overrides,
            settings={"bundle_root": bundle_root},
            device=device,
        )
        if record is not None and "latent_shape" in (record.get("inputs") or {}):
            space = dict(record["inputs"])
        else:
            space = latent_space(checkpoint, parser.get_parsed_content("latent_datalist"))
        vqgan_checkpoint = vqgan_checkpoint or (space.get("vqgan") or {}).get("checkpoint")
        if not vqgan_checkpoint:
            raise InputError(os.fspath(checkpoint), "records no VQ-GAN: give the VQ-GAN checkpoint (--vqgan)")
        check_codec(space, vqgan_checkpoint)
        # the VQ-GAN's architecture comes from its record; a configured vqgan_def only serves record-less checkpoints
        vqgan_def = configured_network_def(parser, "vqgan_def") if config_files and parser.get("vqgan_def") else None
        vqgan = load_vqgan(vqgan_checkpoint, vqgan_def, device)
        windows = space.get("codec_windows")
        if windows:
            codec = LatentSlidingWindowInferer(
                windows["roi_size"], overlap=windows.get("overlap", 0.25), mode=windows.get("mode", "gaussian"),
                sw_device=device, device="cpu",
            )  # fmt: skip
        else:
            codec = parser.get_parsed_content("codec_inferer")
        if space.get("num_train_timesteps"):
            parser["num_train_timesteps"] = int(space["num_train_timesteps"])
        # the target the network was trained on; checkpoints from before it was recorded predicted noise
        parser["prediction_type"] = str(space.get("prediction_type", "epsilon"))
        inferer = LatentCTSampler(
            vqgan,
            space,
            parser.get_parsed_content("sampling_scheduler"),
            codec,
            num_inference_steps=parser.get_parsed_content("sampling_steps"),
            guidance_scale=parser.get_parsed_content("guidance_scale"),
            requantize=parser.get_parsed_content("requantize"),
            seed=parser.get_parsed_content("sample_seed"),
        )
        xray_size = space.get("xray_size") or parser.get_parsed_content("xray_size")
        window = space.get("hu_window") or parser.get("hu_window", "xray2ct")
        generator = cls(network, inferer, space, xray_size, window, device)
        generator.vqgan_checkpoint = os.fspath(vqgan_checkpoint)
        return generator

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        load_weights(self.network, path, expected_bundle="latent_ddpm")
        self.network.eval()

    @property
    def geometry(self):
        """The DRR camera of the training X-rays (None when the latent space does not record it)."""
        from common.drr import get_geometry

        geometry = self.latent_space.get("geometry")
        return None if geometry is None else get_geometry(geometry)

    def preprocess(self, xray) -> torch.Tensor:
        """An X-ray path or (H, W) array -> (1, 1, S, S) float32 [0, 1], the model domain."""
        return torch.from_numpy(load_view(xray, self.xray_size))[None, None]

    @torch.no_grad()
    def generate_from_view(self, image: torch.Tensor, progress=None, **options) -> Volume:
        """A model-domain X-ray (1, 1, S, S) -> HU Volume; ``options``: ``num_inference_steps``,
        ``guidance_scale``, ``seed`` (default: the config's); ``progress(done, total)`` per step."""
        unit = self.inferer(image.to(self.device), self.network, progress=progress, **options)
        return unit_to_volume(unit[0], self.spacing, self.hu_window)

    @torch.no_grad()
    def generate(self, xray, progress=None, **options) -> tuple[Volume, torch.Tensor]:
        """An X-ray path or (H, W) [0, 1] array -> (HU Volume, the model-domain X-ray (size, size))."""
        image = self.preprocess(xray)
        return self.generate_from_view(image, progress, **options), image[0, 0]

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
