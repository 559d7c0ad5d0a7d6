"""Batch preparation: the datalist's CT key is both the network input and the reconstruction target."""

from __future__ import annotations

import glob
import os

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import convert_to_tensor

from common.datalist import load_split, require_cases
from common.errors import InputError


class PrepareCTBatch(PrepareBatch):
    """``batch[key]`` -> ``(images, images)`` on ``device`` (MONAI's default reads "image"/"label")."""

    def __init__(self, key: str = "ct"):
        self.key = key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        images = batchdata[self.key]
        if isinstance(images, torch.Tensor):
            images = images.to(device=device, non_blocking=non_blocking, **kwargs)
        else:
            images = convert_to_tensor(images, device=device)
        return images, images


def inference_items(
    source: str, key: str = "image", datalist_key: str = "test", datalist_image_key: str = "ct"
) -> list[dict]:
    """Items ``{key: path, ...}`` to reconstruct: a datalist folder (``dataset.json``, split ``datalist_key``,
    the CT under ``datalist_image_key``), a folder of NIfTI, or one file.

    ``key`` is the key the inference transforms read (``image``, the key MONAI Label sends). Raises
    :class:`common.errors.InputError` when it finds nothing to reconstruct.
    """
    if os.path.isfile(source):
        return [{key: source}]
    datalist = os.path.join(source, "dataset.json")
    if os.path.isfile(datalist):
        items = require_cases(load_split(datalist, datalist_key, source), datalist, datalist_key, "inference")
        return [{**item, key: item[datalist_image_key]} for item in items]
    files = sorted(glob.glob(os.path.join(source, "**", "*.nii*"), recursive=True))
    if not files:
        raise InputError(source, "no dataset.json and no NIfTI volume found: nothing to reconstruct")
    return [{key: f} for f in files]
