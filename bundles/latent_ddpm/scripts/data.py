"""Data pieces specific to latent diffusion: X-ray loading as a MONAI transform, the latent datalist."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Resize

from common.errors import InputError, require_file
from common.xray import load_xray, preprocess_xray

LATENT_DATALIST = "latents.json"


class LoadXrayd(MapTransform):
    """Path -> (1, size, size) float32 [0, 1] with :func:`common.xray.load_xray` (the loader inference uses too).

    ``preprocess`` runs :func:`common.xray.preprocess_xray` (percentile normalisation, square crop) for real
    radiographs; training DRRs are already in [0, 1] and square, so they are only resized. MONAI's
    LoadImaged would read the 2D NIfTI DRRs too, but possibly with another row/column order than
    ``load_xray``; one loader for training and inference rules that mismatch out.
    """

    def __init__(self, keys, size: int, preprocess: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.size = int(size)
        self.preprocess = preprocess

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(load_xray_tensor(d[key], self.size, self.preprocess))[None]
        return d


def load_xray_tensor(source, size: int, preprocess: bool = False) -> np.ndarray:
    """An X-ray path or (H, W) array -> (size, size) float32 in [0, 1]."""
    if preprocess:
        return preprocess_xray(source, size=size)
    image = load_xray(source)[0] if isinstance(source, (str, os.PathLike)) else np.asarray(source, np.float32)
    resize = Resize((size, size), mode="area" if image.shape[0] >= size else "bilinear")
    out = np.asarray(resize(torch.from_numpy(np.ascontiguousarray(image))[None]))[0]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def read_latent_datalist(path: str | os.PathLike) -> dict:
    """The manifest written by extract_latents (items, scale_factor, spacing, shapes), paths made absolute."""
    path = require_file(path)
    with open(path) as f:
        meta = json.load(f)
    for key in ("scale_factor", "latent_shape", "image_size", "spacing"):
        if key not in meta:
            raise InputError(path, f"latent datalist lacks '{key}' (not written by extract_latents?)")
    base = os.path.dirname(os.path.abspath(path))
    for split in ("training", "validation", "test"):
        for item in meta.get(split, []):
            for k in ("latent", "ct", "pa", "lateral"):
                if k in item and not os.path.isabs(item[k]):
                    item[k] = os.path.join(base, item[k])
    return meta


def latent_items(path: str | os.PathLike, split: str) -> list[dict]:
    """Datalist items of ``split``, each with an ``image`` key (the latent path) for MONAI's engines."""
    return [{**item, "image": item["latent"]} for item in read_latent_datalist(path).get(split, [])]


def load_latent(path: str | os.PathLike) -> np.ndarray:
    """A cached latent (C, X', Y', Z') float32."""
    array = np.load(require_file(path))
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


def as_list(value: Sequence[int] | int, n: int = 3) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def evaluation_items(path: str | os.PathLike, splits: Sequence[str] = ("test",)) -> list[dict]:
    """Held-out cases for evaluation: ``image`` = the PA X-ray, ``label`` = the paired CT (HU file)."""
    meta = read_latent_datalist(path)
    items = [
        {"id": item["id"], "image": item["pa"], "label": item["ct"]}
        for s in splits
        for item in meta.get(s, [])
    ]
    if not items:
        raise InputError(path, f"no cases in splits {list(splits)}")
    return items
