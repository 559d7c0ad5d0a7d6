"""Dataset geometry and batch preparation for the cascade.

Inputs follow docs/ARCHITECTURE.md: ``ct`` (HU, canonical RAS), ``pa`` and ``lateral`` DRRs (H, W) in
[0, 1]. The configs' transform chain (``preprocessing``) scales the CT with the XRAY2CT window to [0, 1] and
area-resamples it to the last stage's size; X-rays are resized (bilinear) to ``xray_size``;
:class:`CascadeBatch` stacks them as 2 channels [PA, lateral].
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from common.datalist import dataset_geometry
from common.errors import InputError, require_file

XRAY_KEYS = ("pa", "lateral")


DEFAULT_INFO = {"spacing": (1.5, 1.5, 1.5), "size": (256, 256, 256)}


def read_dataset_info(datalist_file: str) -> dict:
    """``{"geometry": DRRGeometry, "spacing": (3,), "size": (3,), "fov_mm": (3,)}`` from dataset.json.

    Without the file (a config parsed on a machine without data) the defaults of a 256^3, 1.5 mm dataset; a
    checkpoint trained otherwise is refused when loaded (its record says so). ``geometry``: the DRRs' camera
    (:func:`common.datalist.dataset_geometry`, the one reader and its one default).
    """
    if not os.path.isfile(datalist_file):
        spacing, size = DEFAULT_INFO["spacing"], DEFAULT_INFO["size"]
        return {
            "geometry": dataset_geometry(datalist_file),
            "spacing": spacing,
            "size": size,
            "fov_mm": tuple(s * n for s, n in zip(spacing, size)),
        }
    path = require_file(datalist_file)
    with open(path) as f:
        info = json.load(f)
    if "spacing" not in info:
        raise InputError(path, "dataset.json needs 'spacing' (see docs/ARCHITECTURE.md)")
    spacing = tuple(float(s) for s in info["spacing"])
    size = info.get("size")
    if size is None:  # fall back to the first CT's header
        first = (info.get("training") or info.get("validation") or info.get("test") or [None])[0]
        if first is None:
            raise InputError(path, "dataset.json has neither 'size' nor any case")
        ct = first["ct"] if os.path.isabs(first["ct"]) else os.path.join(os.path.dirname(path), first["ct"])
        size = nib.load(ct).shape[:3]
    size = tuple(int(s) for s in np.broadcast_to(np.asarray(size), (3,)))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(path, f"bad spacing {spacing}")
    return {
        "geometry": dataset_geometry(path),
        "spacing": spacing,
        "size": size,
        "fov_mm": tuple(s * n for s, n in zip(spacing, size)),
    }


def as_image2d(x):
    """(1, H, W[, 1]) -> (1, H, W): DRR files may carry a trailing singleton axis."""
    while x.ndim > 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise InputError(None, f"expected a 2D X-ray, got shape {tuple(x.shape)}")
    return x


class CascadeBatch:
    """``prepare_batch`` for MONAI engines: ``(xrays (B,2,S,S), target)``.

    ``target="dict"`` (training loss): ``{"ct", "pa", "lateral"}``; ``target="tensor"``: the CT resized to
    ``size`` (validation of one stage); ``target="stages"``: a dict ``stage{k}`` -> CT at ``sizes[k-1]``.
    """

    def __init__(self, target: str = "dict", size: int | None = None, sizes: Sequence[int] = ()):
        if target not in ("dict", "tensor", "stages"):
            raise ValueError(f"unknown target kind {target!r}")
        self.target, self.size, self.sizes = target, size, tuple(sizes)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        pa = batchdata["pa"].to(device=device, non_blocking=non_blocking)
        lat = batchdata["lateral"].to(device=device, non_blocking=non_blocking)
        xrays = torch.cat((pa, lat), dim=1)
        ct = batchdata["ct"].to(device=device, non_blocking=non_blocking)
        if self.target == "dict":
            return xrays, {"ct": ct, "pa": pa, "lateral": lat}
        if self.target == "tensor":
            return xrays, resize_volume(ct, self.size)
        return xrays, {f"stage{k + 1}": resize_volume(ct, s) for k, s in enumerate(self.sizes)}


def resize_volume(ct: torch.Tensor, size: int | None) -> torch.Tensor:
    """Area-resample (B, 1, ...) to ``size``^3 (no-op when already that size or size is None)."""
    if size is None or tuple(ct.shape[2:]) == (size,) * 3:
        return ct
    return F.interpolate(ct, size=(size,) * 3, mode="area")
