"""Encode every CT of a dataset once with the frozen VQ-GAN and cache the latents for diffusion training.

``python -m bundles.latent_ddpm.scripts.extract_latents --dataset_dir D --vqgan_checkpoint C --output_dir O``
(console script ``xray2ct-extract-latents``)

Writes ``O/latents/<id>.npy`` (quantised latents (D, X/f, Y/f, Z/f), float32, unscaled) and the manifest
``O/latents.json``: the dataset's splits with a ``latent`` path per case, ``scale_factor`` = 1 / std of the
training latents (as in LDM, Rombach et al. 2022, so the diffusion sees unit-variance inputs), the spacing,
HU window, image and latent shapes, and the codec that encoded them (``vqgan``: checkpoint path, sha256 and
record; ``windows``; the dataset's sha256).

The codec is recorded in ``O/codec.json`` before the first latent is written. A cache whose codec (VQ-GAN
checkpoint contents, windows, HU window) or dataset differs from the configured one is stale: it is
re-encoded (``on_stale="reencode"``) or refused (``on_stale="error"``), never decoded. Resumable otherwise:
cases whose ``.npy`` exists are skipped; every file is written atomically, the manifest last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence

import fire
import numpy as np
import torch
from tqdm import tqdm

from bundles.latent_ddpm.scripts.data import LATENT_DATALIST, SPLITS, as_list, read_latent_datalist
from common.atomic import atomic_path, atomic_write_text
from common.checkpoint import file_sha256
from common.codec import codec_fingerprint, encode_volume, latent_factor, load_vqgan
from common.errors import InputError, require_file
from common.intensity import get_window
from common.io import load_volume
from common.sliding_window import LatentSlidingWindowInferer

CODEC_STAMP = "codec.json"
STALE_POLICIES = ("reencode", "error")
logger = logging.getLogger(__name__)


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def encode_ct(
    net: torch.nn.Module, ct_path: str, inferer: LatentSlidingWindowInferer, hu_window: str
) -> tuple[np.ndarray, tuple[int, ...], tuple[float, ...]]:
    """A CT file (HU) -> its quantised latent (D, X', Y', Z'), the image size and spacing."""
    vol = load_volume(ct_path).to_canonical().validate(ct_path)
    unit = torch.from_numpy(get_window(hu_window).to_unit(vol.array).astype(np.float32))[None, None]
    latents = encode_volume(net, unit, inferer)
    return latents.quantized[0].float().cpu().numpy(), vol.shape, vol.spacing


def codec_settings(
    vqgan_checkpoint: str, inferer: LatentSlidingWindowInferer, hu_window: str, datalist_path: str
) -> dict:
    """What a latent cache depends on: the VQ-GAN checkpoint (sha256 + record), windows, HU window, dataset."""
    fingerprint = codec_fingerprint(vqgan_checkpoint)
    roi = inferer.roi_size
    return {
        "vqgan": fingerprint,
        "windows": {
            "roi_size": [int(roi)] * 3 if isinstance(roi, int) else [int(r) for r in roi],
            "overlap": float(inferer.overlap),
            "mode": str(inferer.mode),
        },
        "hu_window": get_window(hu_window).as_dict(),
        "dataset": {"file": os.path.abspath(datalist_path), "sha256": file_sha256(datalist_path)},
    }


def _stale_reasons(stamp: Mapping, settings: Mapping) -> list[str]:
    reasons = []
    old, new = stamp.get("vqgan", {}), settings["vqgan"]
    if old.get("sha256") != new["sha256"]:
        reasons.append(
            f"it was encoded by the VQ-GAN checkpoint {old.get('checkpoint')} (sha256 {str(old.get('sha256'))[:12]}), "
            f"the configured one is {new['checkpoint']} (sha256 {new['sha256'][:12]})"
        )
    for key in ("windows", "hu_window"):
        if stamp.get(key) != settings[key]:
            reasons.append(f"its {key} {stamp.get(key)} differ from the configured {settings[key]}")
    if (stamp.get("dataset") or {}).get("sha256") != settings["dataset"]["sha256"]:
        reasons.append(f"the dataset {settings['dataset']['file']} changed since it was encoded")
    return reasons


def check_latent_cache(latent_datalist: str | os.PathLike, vqgan_checkpoint: str | os.PathLike) -> dict:
    """The manifest, after checking that the configured VQ-GAN checkpoint is the one that encoded the cache.

    Evaluation and inference decode sampled latents with ``vqgan_checkpoint``: latents of another codec
    would decode to noise, so a mismatch stops with a clear message.
    """
    meta = read_latent_datalist(latent_datalist)
    recorded = (meta.get("vqgan") or {}).get("sha256")
    current = file_sha256(require_file(vqgan_checkpoint))
    if recorded != current:
        raise InputError(
            latent_datalist,
            f"the latent cache was encoded by VQ-GAN sha256 {str(recorded)[:12]}, the configured checkpoint "
            f"{os.fspath(vqgan_checkpoint)} has sha256 {current[:12]}: decoding would use another latent space. "
            "Give the VQ-GAN the diffusion model was trained with, or retrain (the cache is then re-encoded)",
        )
    return meta


def extract_latents(
    dataset_dir: str,
    vqgan_checkpoint: str,
    output_dir: str,
    vqgan_def: Mapping | torch.nn.Module | None = None,
    inferer: LatentSlidingWindowInferer | None = None,
    roi: int | Sequence[int] = (256, 256, 128),
    overlap: float = 0.25,
    hu_window: str = "xray2ct",
    device: str = "cpu",
    on_stale: str = "reencode",
) -> str:
    """Encode all splits of ``<dataset_dir>/dataset.json`` (unless the cache is current); returns the manifest path.

    ``vqgan_def``: the VQ-GAN's network definition for checkpoints without a record (and checked against a
    record); ``inferer``: the codec's windows (default: ``roi``, ``overlap``, windows on ``device``).
    """
    if on_stale not in STALE_POLICIES:
        raise ValueError(f"on_stale must be one of {STALE_POLICIES}, got {on_stale!r}")
    datalist_path = require_file(os.path.join(dataset_dir, "dataset.json"))
    if inferer is None:
        inferer = LatentSlidingWindowInferer(as_list(roi), overlap=overlap, sw_device=device, device="cpu")
    settings = codec_settings(vqgan_checkpoint, inferer, hu_window, datalist_path)
    stamp_path = os.path.join(output_dir, CODEC_STAMP)
    manifest_path = os.path.join(output_dir, LATENT_DATALIST)
    latent_dir = os.path.join(output_dir, "latents")
    stamp = json.load(open(stamp_path)) if os.path.isfile(stamp_path) else None
    has_files = os.path.isdir(latent_dir) and any(n.endswith(".npy") for n in os.listdir(latent_dir))
    reasons = _stale_reasons(stamp, settings) if stamp is not None else (["its codec is unknown"] if has_files else [])
    if reasons:
        message = f"latent cache {output_dir} is stale: " + "; ".join(reasons)
        if on_stale == "error":
            raise InputError(output_dir, message + ". Remove it or set latent_cache_policy 'reencode'")
        logger.warning("%s: re-encoding every CT", message)
        shutil.rmtree(latent_dir, ignore_errors=True)
        for name in (LATENT_DATALIST, CODEC_STAMP):
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
    elif stamp is not None and os.path.isfile(manifest_path):
        return manifest_path  # current: nothing to encode

    with open(datalist_path) as f:
        datalist = json.load(f)
    cases = [(s, item) for s in SPLITS for item in datalist.get(s, [])]
    if not cases:
        raise InputError(datalist_path, "datalist has no cases")
    net = load_vqgan(vqgan_checkpoint, vqgan_def, device)
    os.makedirs(latent_dir, exist_ok=True)
    atomic_write_text(stamp_path, json.dumps(settings, indent=2) + "\n")
    manifest: dict = {s: [] for s in SPLITS}
    image_size = spacing = latent_shape = None
    for split, item in tqdm(cases, desc="encode CT -> latent"):
        ct = _resolve(dataset_dir, item["ct"])
        out = os.path.join(latent_dir, f"{item['id']}.npy")
        if os.path.exists(out):  # resume: encoded by this codec (the stamp says so)
            latent = np.load(out, allow_pickle=False)
            vol = load_volume(ct)
            size, sp = vol.shape, vol.spacing
        else:
            latent, size, sp = encode_ct(net, ct, inferer, hu_window)
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                np.save(f, latent)
        if image_size is not None and (tuple(size) != tuple(image_size) or latent.shape != tuple(latent_shape)):
            raise InputError(ct, f"size {size} differs from the other cases' {image_size}; resample the dataset")
        image_size, spacing, latent_shape = tuple(size), tuple(sp), latent.shape
        paths = ("ct", "pa", "lateral")  # and an anatomy label map (common.anatomy), unlike a PE class
        entry = {
            k: _resolve(dataset_dir, v) if k in paths or (k == "label" and isinstance(v, str)) else v
            for k, v in item.items()
        }
        manifest[split].append({**entry, "latent": os.path.relpath(out, output_dir)})
    train = manifest["training"] or manifest["validation"]
    stacked = np.stack([np.load(os.path.join(output_dir, i["latent"]), allow_pickle=False) for i in train])
    std = float(stacked.std())
    manifest.update(
        scale_factor=1.0 / std if std > 0 else 1.0,
        latent_std=std,
        latent_shape=list(latent_shape),
        image_size=list(image_size),
        spacing=list(spacing),
        factor=latent_factor(net),
        hu_window=settings["hu_window"],
        vqgan=settings["vqgan"],
        windows=settings["windows"],
        dataset=settings["dataset"],
        geometry=datalist.get("geometry"),
    )
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def main() -> None:
    fire.Fire(extract_latents)


if __name__ == "__main__":
    main()
