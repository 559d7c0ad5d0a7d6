"""Trivial predictors every model is scored against, on the same cases and in the same conventions.

A quality figure only means something beside the figure of a predictor that does not do the task:

``mean_training_ct`` (X-ray -> CT: perx2ct, progressive_cascade, latent_ddpm)
    The voxel-wise mean of the training split's CTs (HU), the same volume for every case: it ignores
    the X-rays. A model that does not beat it has not learnt anything from the radiographs.
``box_down_up`` (autoencoders: vqgan_3d_patch)
    Average-pool the volume by the latent factor ``f`` and upsample it trilinearly: the same latent grid
    as the autoencoder, with one float per latent voxel instead of a code.
``copy_input`` (pix2pix_phase)
    The input (average CT) itself as the prediction of the phase CT.
The PE classifier's baselines (prevalence, X-ray only) are classification baselines and live in its
report. :func:`compare` gives the difference block every ``metrics_report.json`` carries.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import InputError

MEAN_TRAINING_CT = "mean_training_ct"
BOX_DOWN_UP = "box_down_up"
COPY_INPUT = "copy_input"

DESCRIPTIONS = {
    MEAN_TRAINING_CT: "voxel-wise mean of the training split's CTs (HU), the same volume for every case; "
    "ignores the X-rays",
    BOX_DOWN_UP: "average-pool by the latent factor, trilinear upsampling back (align_corners=False), "
    "replicate padding to a multiple of the factor: the autoencoder's latent grid with one float per "
    "latent voxel",
    COPY_INPUT: "the input volume itself as the prediction",
}

# Metric names containing one of these are errors (lower is better); every other metric is a score.
_LOWER_IS_BETTER = ("mae", "mse", "l1", "loss", "rmse", "error", "brier", "ece")


def lower_is_better(metric: str) -> bool:
    """True for error-like metrics (MAE, MSE, L1, loss...), False for scores (PSNR, SSIM, AUC...)."""
    name = metric.lower()
    return any(token in name for token in _LOWER_IS_BETTER)


def mean_training_ct(paths: Iterable[str | os.PathLike], shape: Sequence[int] | None = None) -> np.ndarray:
    """Voxel-wise mean (float32 HU, canonical RAS (X, Y, Z)) of the CT files ``paths``, read one at a time.

    Every CT must have the same shape (data_prep resamples datasets to one size); ``shape`` checks it
    against what the model predicts. Raises :class:`InputError` naming the first offending file.
    """
    from common.io import load_volume

    total: np.ndarray | None = None
    count = 0
    first = None
    for path in paths:
        path = os.fspath(path)
        array = np.asarray(load_volume(path).to_canonical().validate(path).array, dtype=np.float64)
        if total is None:
            if shape is not None and tuple(array.shape) != tuple(int(s) for s in shape):
                raise InputError(path, f"CT shape {array.shape} differs from the model's {tuple(shape)}")
            total, first = np.zeros_like(array), path
        elif array.shape != total.shape:
            raise InputError(path, f"CT shape {array.shape} differs from {total.shape} of {first}")
        total += array
        count += 1
    if total is None:
        raise InputError(None, "no training CTs to average for the mean-CT baseline")
    return (total / count).astype(np.float32)


def mean_training_ct_of_datalist(
    datalist_file: str | os.PathLike, split: str = "training", shape: Sequence[int] | None = None
) -> np.ndarray | None:
    """:func:`mean_training_ct` of the CTs of ``split`` in a data_prep ``dataset.json`` (paths relative to it).

    None when the file does not exist or the split is empty (e.g. at inference, where a model's stored
    prior is used instead).
    """
    import json

    datalist_file = os.fspath(datalist_file)
    if not os.path.isfile(datalist_file):
        return None
    with open(datalist_file) as f:
        items = json.load(f).get(split) or []
    if not items:
        return None
    base = os.path.dirname(os.path.abspath(datalist_file))
    return mean_training_ct([os.path.join(base, item["ct"]) for item in items], shape=shape)


def resize_volume(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, C, *size) by trilinear interpolation (identity when the size matches)."""
    size = tuple(int(s) for s in size)
    if tuple(volume.shape[2:]) == size:
        return volume
    return F.interpolate(volume.float(), size=size, mode="trilinear", align_corners=False)


def box_down_up(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool (B, C, X, Y, Z) by ``factor`` and upsample trilinearly back to the same shape.

    The volume is replicate-padded at its far end to a multiple of ``factor`` (as the sliding-window
    codec pads), pooled, upsampled to the padded size and cropped back.
    """
    if volume.ndim != 5:
        raise InputError(None, f"expected a (B, C, X, Y, Z) volume, got shape {tuple(volume.shape)}")
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return volume.clone()
    size = volume.shape[2:]
    pads: list[int] = []
    for s in reversed(size):
        pads += [0, -(-int(s) // factor) * factor - int(s)]
    x = volume.float()
    if any(pads):
        x = F.pad(x, pads, mode="replicate")
    coarse = F.avg_pool3d(x, kernel_size=factor, stride=factor)
    up = F.interpolate(coarse, size=x.shape[2:], mode="trilinear", align_corners=False)
    return up[(slice(None), slice(None), *(slice(0, int(s)) for s in size))].to(volume.dtype)


def copy_input(volume: torch.Tensor) -> torch.Tensor:
    """The pix2pix baseline: the input itself."""
    return volume


def compare(model: Mapping[str, float], baseline: Mapping[str, float]) -> dict:
    """``{"difference": model - baseline, "model_better": bool}`` per metric both have.

    ``difference`` is always model minus baseline (positive PSNR/SSIM difference = model better; negative
    MAE difference = model better); ``model_better`` applies each metric's direction.
    """
    difference, better = {}, {}
    for key, value in model.items():
        if key not in baseline:
            continue
        try:
            m, b = float(value), float(baseline[key])
        except (TypeError, ValueError):
            continue
        difference[key] = m - b
        better[key] = bool(m < b) if lower_is_better(key) else bool(m > b)
    return {"difference": difference, "model_better": better}
