"""Demo: train a small VQ-GAN and the latent DDPM briefly on a dataset, generate CTs from X-rays, with previews.

``python -m bundles.latent_ddpm.scripts.demo --output_dir outputs/latent_ddpm_demo [--dataset_dir D]``
Without ``--dataset_dir`` a phantom dataset is made. Without ``--vqgan_checkpoint`` a vqgan_3d_patch
``cpu_small`` VQ-GAN is first trained on the same dataset (``vqgan_epochs``) through that bundle's configs:
a randomly initialised VQ-GAN decodes every latent to a constant volume (measured: 0.0-0.2 HU standard
deviation, 2 codes in use), which is why this demo used to write uniform grey CTs whatever the diffusion
model sampled.
"""

from __future__ import annotations

import os

import fire
import torch
from monai.bundle import run

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQGAN = os.path.join(os.path.dirname(HERE), "vqgan_3d_patch", "configs")


def train_vqgan(dataset_dir: str, output_dir: str, epochs: int = 60) -> str:
    """Train the vqgan_3d_patch ``cpu_small`` VQ-GAN on ``dataset_dir``; returns its best checkpoint."""
    files = [os.path.join(VQGAN, n) for n in ("train.json", "cpu_small.json")]
    interval = max(1, epochs // 3)
    run("training", config_file=files, dataset_dir=dataset_dir, bundle_root=output_dir,
        output_dir=os.path.join(output_dir, "eval"), max_epochs=epochs, val_interval=interval,
        save_interval=epochs)  # fmt: skip
    return os.path.join(output_dir, "models", "model.pt")


def demo(
    output_dir: str,
    dataset_dir: str | None = None,
    vqgan_checkpoint: str | None = None,
    epochs: int = 20,
    vqgan_epochs: int = 60,
) -> str:
    """Returns the folder holding the generated CT NIfTI, montage PNG and axial GIF."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(output_dir, exist_ok=True)
    if dataset_dir is None:
        from data_prep.phantom import make_phantom_dataset

        dataset_dir = os.path.join(output_dir, "phantom")
        if not os.path.exists(os.path.join(dataset_dir, "dataset.json")):
            make_phantom_dataset(
                dataset_dir, n_cases=16, size=32, spacing=12.0, geometry="perx2ct", drr_pixels=64
            )
    if vqgan_checkpoint is None:
        vqgan_checkpoint = train_vqgan(dataset_dir, os.path.join(output_dir, "vqgan"), vqgan_epochs)
    configs = os.path.join(HERE, "configs")
    common = dict(
        dataset_dir=dataset_dir, bundle_root=HERE, output_dir=output_dir, ckpt_dir=os.path.join(output_dir, "models"),
        vqgan_checkpoint=vqgan_checkpoint, logging_file=os.path.join(configs, "logging.conf"),
        meta_file=os.path.join(configs, "metadata.json"), max_epochs=epochs, val_interval=5, sampling_steps=20,
    )  # fmt: skip
    cfg = [os.path.join(configs, n) for n in ("train.json", "cpu_small.json")]
    run("training", config_file=cfg, **common)
    cfg = [os.path.join(configs, n) for n in ("train.json", "inference.json", "cpu_small.json")]
    run("inference", config_file=cfg, **common)
    return os.path.join(output_dir, "predictions")


if __name__ == "__main__":
    fire.Fire(demo)
