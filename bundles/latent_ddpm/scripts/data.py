"""Data pieces specific to latent diffusion: X-ray loading as a MONAI transform, the latent cache's datalist.

The latent cache (``extract_latents.py``) writes ``latents.json``: the dataset's splits with a ``latent`` path
per case, the ``scale_factor`` (1 / std of the training latents), the latent and image shapes, spacing, HU
window, DRR geometry and the VQ-GAN that encoded them (path, sha256 and record).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.transforms import MapTransform

from common.checkpoint import read_record
from common.datalist import load_split, require_cases
from common.errors import InputError, require_file
from common.xray import RASTER_SUFFIXES, load_view

LATENT_DATALIST = "latents.json"
SPLITS = ("training", "validation", "test")
XRAY_SUFFIXES = (*RASTER_SUFFIXES, ".dcm", ".dicom", ".nii", ".nii.gz")


class LoadXrayd(MapTransform):
    """Path -> (1, size, size) float32 [0, 1] with :func:`common.xray.load_view` (the loader inference uses too).

    Real radiographs (PNG, JPEG, DICOM) are preprocessed (percentile normalisation, square crop); training
    DRRs (NIfTI) are only padded to a square and resized. MONAI's ``LoadImaged`` would read the 2D NIfTI DRRs
    too, but possibly with another row/column order than :func:`common.xray.load_xray`; one loader for training
    and inference rules that mismatch out.
    """

    def __init__(self, keys, size: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.size = int(size)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(load_view(d[key], self.size, str(key)))[None]
        return d


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class TargetPrepareBatch(DiffusionPrepareBatch):
    """MONAI's ``DiffusionPrepareBatch`` with the training target of the scheduler's ``prediction_type``.

    ``"epsilon"``: the noise (MONAI's default); ``"v_prediction"``: ``scheduler.get_velocity`` (as MONAI's
    ``VPredictionPrepareBatch``); ``"sample"``: the clean latent x0 itself, which MONAI's engines lack. An x0
    model's error reaches the DDIM sample unamplified, where an epsilon model's error is multiplied by
    ``sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t)`` (~100 at t = T) when the sampler turns it into x0.
    """

    def __init__(
        self, scheduler, num_train_timesteps: int, condition_name: str | None = None, prediction_type: str = "epsilon"
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if getattr(scheduler, "prediction_type", prediction_type) != prediction_type:
            raise ValueError(
                f"the scheduler predicts {scheduler.prediction_type!r} but the target is {prediction_type!r}"
            )
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.last_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # kept for losses that need more than (pred, target), e.g. X-ray2CTPA's LPIPS on the rebuilt x0
        self.last_batch = (images, noise, timesteps)
        if self.prediction_type == "sample":
            return images
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return noise


def read_latent_datalist(path: str | os.PathLike) -> dict:
    """The manifest written by extract_latents (items, scale_factor, spacing, shapes), paths made absolute."""
    path = require_file(path)
    with open(path) as f:
        meta = json.load(f)
    for key in ("scale_factor", "latent_shape", "image_size", "spacing"):
        if key not in meta:
            raise InputError(path, f"latent datalist lacks '{key}' (not written by extract_latents?)")
    base = os.path.dirname(os.path.abspath(path))
    for split in SPLITS:
        for item in meta.get(split, []):
            for k in ("latent", "ct", "pa", "lateral"):
                if k in item and not os.path.isabs(item[k]):
                    item[k] = os.path.join(base, item[k])
    return meta


def latent_items(path: str | os.PathLike, split: str) -> list[dict]:
    """Items of ``split``, each with an ``image`` key (the latent path); ``[]`` before the cache exists."""
    if not os.path.isfile(path):
        return []
    return [{**item, "image": item["latent"]} for item in read_latent_datalist(path).get(split, [])]


def load_latent(path: str | os.PathLike) -> np.ndarray:
    """A cached latent (C, X', Y', Z') float32."""
    array = np.load(require_file(path), allow_pickle=False)
    if array.ndim != 4 or not np.all(np.isfinite(array)):
        raise InputError(path, f"expected a finite (C, X, Y, Z) latent, got shape {array.shape}")
    return array.astype(np.float32)


class LoadLatentd(MapTransform):
    """Cached latent path -> tensor (C, X', Y', Z') multiplied by the LDM ``scale_factor`` (unit variance)."""

    def __init__(self, keys, scale_factor: float, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.scale_factor = float(scale_factor)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(load_latent(d[key]) * self.scale_factor)
        return d


def evaluation_items(path: str | os.PathLike, split: str = "test") -> list[dict]:
    """Cases of ``split`` for evaluation: ``image`` = the PA X-ray, ``label`` = the paired CT (HU file);
    ``anatomy`` (the datalist's anatomy label map, :mod:`common.anatomy`) and ``source`` where recorded.

    ``[]`` when the latent cache does not exist yet (evaluation then stops at its split check).
    """
    if not os.path.isfile(path):
        return []
    return _evaluation_entries(read_latent_datalist(path).get(split, []))


def dataset_items(
    datalist_file: str | os.PathLike, split: str, dataset_dir: str | os.PathLike | None = None
) -> list[dict]:
    """``evaluation_items`` of the dataset's own datalist (``--dataset_dir``), not of the latent cache.

    Evaluation needs no latents (it samples from the X-rays and scores against the CT), so any dataset given by
    ``--dataset_dir`` evaluates, not only the one whose latents were cached under ``output_dir`` at training.
    """
    from common.datalist import case_id, load_split

    items = load_split(datalist_file, split, dataset_dir)
    return _evaluation_entries([{**item, "id": case_id(item)} for item in items])


def _evaluation_entries(cases: list[dict]) -> list[dict]:
    items = []
    for item in cases:
        entry = {"id": item["id"], "image": item["pa"], "label": item["ct"]}
        if isinstance(item.get("label"), str):
            entry["anatomy"] = item["label"]
        if item.get("source"):
            entry["source"] = str(item["source"])
        items.append(entry)
    return items


LATENT_SPACE_KEYS = ("latent_shape", "scale_factor", "spacing", "image_size")


def check_latent_channels(latent_datalist: str | os.PathLike, latent_channels: int) -> None:
    """Refuse a diffusion network whose ``latent_channels`` differ from the cached latents' channels (the VQ-GAN's
    ``embedding_dim``, read from its checkpoint record: the configs hold no copy of its architecture)."""
    channels = int(read_latent_datalist(latent_datalist)["latent_shape"][0])
    if channels != int(latent_channels):
        raise InputError(
            latent_datalist,
            f"the VQ-GAN's latents have {channels} channels (its embedding_dim) but the diffusion network is "
            f"configured for latent_channels {latent_channels}: set latent_channels {channels}",
        )


def latent_space(checkpoint: str | os.PathLike, latent_datalist: str | os.PathLike | None = None) -> dict:
    """``{"latent_shape", "scale_factor", "spacing", "image_size", ...}`` the diffusion model was trained in.

    From the diffusion checkpoint's record (``inputs``); a checkpoint without a record falls back to the
    latent cache's manifest ``latent_datalist``.
    """
    record = read_record(checkpoint)
    inputs = (record or {}).get("inputs", {})
    if all(k in inputs for k in LATENT_SPACE_KEYS):
        return dict(inputs)
    if latent_datalist is None or not os.path.isfile(latent_datalist):
        raise InputError(
            checkpoint, "has no record of its latent space and no latent cache (latents.json) was given"
        )
    meta = read_latent_datalist(latent_datalist)
    return {k: meta[k] for k in (*LATENT_SPACE_KEYS, "vqgan", "geometry", "hu_window") if k in meta}


def check_codec(space: Mapping, vqgan_checkpoint: str | os.PathLike) -> None:
    """Refuse a VQ-GAN checkpoint other than the one whose latents the diffusion model learnt (``space["vqgan"]``).

    ``space`` without a recorded codec (old checkpoints) passes with a warning.
    """
    import warnings

    from common.checkpoint import file_sha256

    recorded = (space.get("vqgan") or {}).get("sha256")
    if recorded is None:
        warnings.warn("the diffusion model's latent space records no VQ-GAN: its codec is not checked", stacklevel=2)
        return
    current = file_sha256(require_file(vqgan_checkpoint))
    if current != recorded:
        raise InputError(
            vqgan_checkpoint,
            f"has sha256 {current[:12]}, but the diffusion model was trained on latents of the VQ-GAN with sha256 "
            f"{recorded[:12]} ({space['vqgan'].get('checkpoint')}): its samples would decode to noise",
        )


def check_prediction_type(space: Mapping, prediction_type: str, checkpoint: str | os.PathLike) -> None:
    """Refuse to sample a network as another target than it learnt (``space["prediction_type"]``; records from
    before it was recorded are epsilon): an x0 model read as a noise model, or back, samples garbage."""
    learnt = str(space.get("prediction_type", "epsilon"))
    if learnt != prediction_type:
        raise InputError(
            checkpoint,
            f"was trained with prediction_type {learnt!r}, but the config samples {prediction_type!r}: "
            f"set prediction_type {learnt!r} (the overlay it was trained with)",
        )


def inference_inputs(
    input_path: str | os.PathLike | None, datalist_file: str | os.PathLike, split: str = "test", key: str = "pa"
) -> list[str]:
    """X-ray files to turn into CTs: ``input_path`` (a file or a folder of X-rays) or, when empty, the ``key``
    files of the dataset's ``split``. :class:`InputError` when nothing is found."""
    if input_path:
        path = os.fspath(input_path)
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise InputError(path, "input X-ray file or folder not found")
        files = sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(XRAY_SUFFIXES) and n[0] != "."
        )
        if not files:
            raise InputError(path, f"no X-ray ({', '.join(XRAY_SUFFIXES)}) in folder: nothing to infer")
        return files
    items = require_cases(load_split(datalist_file, split), datalist_file, split, "inference")
    return [item[key] for item in items]


def as_list(value: Sequence[int] | int, n: int = 3) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
