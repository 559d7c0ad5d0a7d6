"""X-ray file(s) in, generated CT NIfTI (HU, spacing of the training data) and previews out."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from tqdm import tqdm

from bundles.latent_ddpm.scripts.data import load_xray_tensor
from bundles.latent_ddpm.scripts.sampling import latents_to_unit_ct, sample_latents, unit_to_volume
from common.io import save_volume
from common.preview import save_montage_png, save_slice_gif
from common.volume import Volume


class LatentCTGenerator:
    """Sample a latent for an X-ray (DDIM/DDPM, optional guidance), decode it with the VQ-GAN, restore HU."""

    def __init__(
        self,
        network: torch.nn.Module,
        vqgan: torch.nn.Module,
        scheduler,
        latent_shape: Sequence[int],
        scale_factor: float,
        spacing: Sequence[float],
        roi: Sequence[int],
        xray_size: int,
        overlap: float = 0.25,
        guidance_scale: float = 1.0,
        requantize: bool = True,
        hu_window: str = "xray2ct",
        preprocess: bool = True,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        self.network = network.eval()
        self.vqgan = vqgan
        self.scheduler = scheduler
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.scale_factor = float(scale_factor)
        self.spacing = tuple(float(s) for s in spacing)
        self.roi = tuple(int(r) for r in roi)
        self.xray_size = int(xray_size)
        self.overlap = overlap
        self.guidance_scale = guidance_scale
        self.requantize = requantize
        self.hu_window = hu_window
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.seed = seed

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        state = torch.load(os.fspath(path), map_location=self.device, weights_only=True)
        self.network.load_state_dict(state.get("model", state))
        self.network.eval()

    @torch.no_grad()
    def generate(self, xray) -> tuple[Volume, torch.Tensor]:
        """An X-ray path or (H, W) [0, 1] array -> (HU Volume, the model-domain X-ray (size, size))."""
        image = torch.from_numpy(load_xray_tensor(xray, self.xray_size, self.preprocess))
        generator = torch.Generator().manual_seed(self.seed)
        latents = sample_latents(
            self.network, image[None, None].to(self.device), self.latent_shape, self.scheduler,
            self.guidance_scale, generator=generator,
        )  # fmt: skip
        unit = latents_to_unit_ct(
            self.vqgan,
            latents,
            self.scale_factor,
            self.roi,
            self.overlap,
            self.requantize,
            device=self.device,
        )
        return unit_to_volume(unit[0], self.spacing, self.hu_window), image

    def predict_files(self, files: Sequence[str], output_dir: str, previews: bool = True) -> list[str]:
        """Write ``<output_dir>/<name>_ct.nii.gz`` (+ montage PNG and axial GIF) per X-ray; returns NIfTI paths."""
        os.makedirs(output_dir, exist_ok=True)
        written = []
        for path in tqdm(list(files), desc="X-ray -> CT"):
            path = os.fspath(path)  # cases often share file names (<case>/pa.nii.gz): prefix the folder
            name = f"{os.path.basename(os.path.dirname(path))}_{os.path.basename(path).split('.')[0]}"
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
