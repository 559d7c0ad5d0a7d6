"""Datalist reading, MONAI pre-processing and batch preparation for the cascade.

Inputs follow docs/ARCHITECTURE.md: ``ct`` (HU, canonical RAS), ``pa`` and ``lateral`` DRRs (H, W) in
[0, 1]. The CT is scaled with the XRAY2CT window to [0, 1] and area-resampled to the last stage's size;
X-rays are resized (bilinear) to ``xray_size`` and stacked as 2 channels [PA, lateral].
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, Lambdad, LoadImaged, Resized

from common.drr import DRRGeometry, get_geometry
from common.errors import InputError, require_file
from common.intensity import get_window
from common.transforms import hu_window_transform

XRAY_KEYS = ("pa", "lateral")


def read_dataset_info(datalist_file: str) -> dict:
    """``{"geometry": DRRGeometry, "spacing": (3,), "size": (3,), "fov_mm": (3,)}`` from dataset.json."""
    path = require_file(datalist_file)
    with open(path) as f:
        info = json.load(f)
    if "geometry" not in info or "spacing" not in info:
        raise InputError(path, "dataset.json needs 'geometry' and 'spacing' (see docs/ARCHITECTURE.md)")
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
    geometry: DRRGeometry = get_geometry(info["geometry"])
    return {
        "geometry": geometry,
        "spacing": spacing,
        "size": size,
        "fov_mm": tuple(s * n for s, n in zip(spacing, size)),
    }


def _as_image2d(x):
    """(1, H, W[, 1]) -> (1, H, W): DRR files may carry a trailing singleton axis."""
    while x.ndim > 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise InputError(None, f"expected a 2D X-ray, got shape {tuple(x.shape)}")
    return x


def pair_transforms(
    volume_size: int, xray_size: int, hu_window: str = "xray2ct", with_ct: bool = True
) -> Compose:
    """LoadImaged -> channel first -> HU window (CT) -> resize CT to ``volume_size``^3, X-rays to ``xray_size``^2."""
    keys = ["ct", *XRAY_KEYS] if with_ct else list(XRAY_KEYS)
    xforms = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        Lambdad(keys=list(XRAY_KEYS), func=_as_image2d),
        Resized(
            keys=list(XRAY_KEYS), spatial_size=(xray_size, xray_size), mode="bilinear", anti_aliasing=False
        ),
    ]
    if with_ct:
        xforms += [
            hu_window_transform("ct", hu_window),
            Resized(keys="ct", spatial_size=(volume_size,) * 3, mode="area"),
        ]
    xforms.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    return Compose(xforms)


def with_mean_prior(network, datalist_file: str, window: str = "xray2ct", split: str = "training"):
    """Give a ``mean_prior`` cascade the mean of ``split``'s CTs (``window`` scale) as stage 1's prior.

    Unchanged when the network has no prior or the datalist is missing or has no such split (inference and
    later stages: the prior then comes from the checkpoint).
    """
    from common.baselines import mean_training_ct_of_datalist

    target = network.module if hasattr(network, "module") else network
    if not target.stages[0].use_prior:
        return network
    mean_hu = mean_training_ct_of_datalist(datalist_file, split)
    if mean_hu is not None:
        target.set_mean_prior(torch.from_numpy(get_window(window).to_unit(mean_hu)))
    return network


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
