"""Encode every CT of a dataset once with the frozen VQ-GAN and cache the latents for diffusion training.

``python -m bundles.latent_ddpm.scripts.extract_latents --dataset_dir D --vqgan_checkpoint C --output_dir O``

Writes ``O/latents/<id>.npy`` (quantised latents (D, X/f, Y/f, Z/f), float32, unscaled) and the manifest
``O/latents.json``: the dataset's splits with a ``latent`` path per case, ``scale_factor`` = 1 / std of the
training latents (as in LDM, Rombach et al. 2022, so the diffusion sees unit-variance inputs), the spacing,
HU window, image and latent shapes and the VQ-GAN used. Resumable: cases whose ``.npy`` exists are skipped;
every file is written atomically, the manifest last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import fire
import numpy as np
import torch
from tqdm import tqdm

from bundles.latent_ddpm.scripts.autoencoder import latent_factor, load_frozen_vqgan
from bundles.latent_ddpm.scripts.data import LATENT_DATALIST, as_list
from common.atomic import atomic_path, atomic_write_text
from common.codec import encode_volume
from common.errors import InputError, require_file
from common.intensity import get_window
from common.io import load_volume

SPLITS = ("training", "validation", "test")


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def encode_ct(
    net: torch.nn.Module,
    ct_path: str,
    roi: Sequence[int],
    overlap: float,
    hu_window: str,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, tuple[int, ...], tuple[float, ...]]:
    """A CT file (HU) -> its quantised latent (D, X', Y', Z'), the image size and spacing."""
    vol = load_volume(ct_path).to_canonical().validate(ct_path)
    unit = torch.from_numpy(get_window(hu_window).to_unit(vol.array).astype(np.float32))[None, None]
    latents = encode_volume(net, unit, roi=roi, overlap=overlap, sw_device=device, device="cpu")
    return latents.quantized[0].float().cpu().numpy(), vol.shape, vol.spacing


def extract_latents(
    dataset_dir: str,
    vqgan_checkpoint: str,
    output_dir: str,
    vqgan_config: str | Sequence[str] | None = None,
    roi: int | Sequence[int] = (256, 256, 128),
    overlap: float = 0.25,
    hu_window: str = "xray2ct",
    device: str = "cpu",
) -> str:
    """Encode all splits of ``<dataset_dir>/dataset.json``; returns the manifest path."""
    datalist_path = require_file(os.path.join(dataset_dir, "dataset.json"))
    with open(datalist_path) as f:
        datalist = json.load(f)
    if vqgan_config is None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        vqgan_config = os.path.join(os.path.dirname(here), "vqgan_3d_patch", "configs", "train.json")
    net = load_frozen_vqgan(vqgan_checkpoint, vqgan_config, device)
    factor = latent_factor(net)
    roi = as_list(roi)
    latent_dir = os.path.join(output_dir, "latents")
    os.makedirs(latent_dir, exist_ok=True)
    manifest: dict = {s: [] for s in SPLITS}
    image_size = spacing = latent_shape = None
    cases = [(s, item) for s in SPLITS for item in datalist.get(s, [])]
    if not cases:
        raise InputError(datalist_path, "datalist has no cases")
    for split, item in tqdm(cases, desc="encode CT -> latent"):
        ct = _resolve(dataset_dir, item["ct"])
        out = os.path.join(latent_dir, f"{item['id']}.npy")
        if os.path.exists(out):  # resume
            latent = np.load(out)
            vol = load_volume(ct)
            size, sp = vol.shape, vol.spacing
        else:
            latent, size, sp = encode_ct(net, ct, roi, overlap, hu_window, device)
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                np.save(f, latent)
        if image_size is not None and (
            tuple(size) != tuple(image_size) or latent.shape != tuple(latent_shape)
        ):
            raise InputError(
                ct, f"size {size} differs from the other cases' {image_size}; resample the dataset"
            )
        image_size, spacing, latent_shape = tuple(size), tuple(sp), latent.shape
        entry = {k: _resolve(dataset_dir, v) if k in ("ct", "pa", "lateral") else v for k, v in item.items()}
        manifest[split].append({**entry, "latent": os.path.relpath(out, output_dir)})
    train = manifest["training"] or manifest["validation"]
    stacked = np.stack([np.load(os.path.join(output_dir, i["latent"])) for i in train])
    std = float(stacked.std())
    manifest.update(
        scale_factor=1.0 / std if std > 0 else 1.0,
        latent_std=std,
        latent_shape=list(latent_shape),
        image_size=list(image_size),
        spacing=list(spacing),
        factor=factor,
        hu_window=get_window(hu_window).as_dict(),
        vqgan_checkpoint=os.path.abspath(vqgan_checkpoint),
        vqgan_config=[
            os.path.abspath(c) for c in ([vqgan_config] if isinstance(vqgan_config, str) else vqgan_config)
        ],
        geometry=datalist.get("geometry"),
    )
    path = os.path.join(output_dir, LATENT_DATALIST)
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


if __name__ == "__main__":
    fire.Fire(extract_latents)
