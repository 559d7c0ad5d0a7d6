"""Data for PerX2CT: MONAI pipelines over data_prep's datalist, and the per-iteration slice sampling.

Each datalist item has ``ct`` (HU volume, canonical RAS), ``pa`` and ``lateral`` (DRRs in [0, 1]). The
pipeline stacks the two views into ``image`` (2, H, W) and scales the CT to [0, 1] with the XRAY2CT window.
PerX2CT trains on single CT slices of random axis and position (sagittal, coronal, axial): ``SliceSampler``
is the trainer's ``prepare_batch`` that draws them and passes ``slice_index``/``axis`` to the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    ConcatItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Resized,
)

from common.errors import InputError, require_file
from common.transforms import hu_window_transform

VIEW_KEYS = ("pa", "lateral")


def pair_transforms(image_size: int, window: str = "xray2ct", load: bool = True) -> Compose:
    """Load CT + both DRRs, window the CT to [0, 1], stack the views into ``image`` (2, H, W)."""
    keys = ["ct", *VIEW_KEYS]
    xforms = []
    if load:
        xforms += [LoadImaged(keys=keys, reader="NibabelReader", image_only=True)]
    xforms += [
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
        hu_window_transform(keys="ct", window=window),
        Resized(keys=list(VIEW_KEYS), spatial_size=(image_size, image_size), mode="bilinear"),
        ConcatItemsd(keys=list(VIEW_KEYS), name="image", dim=0),
    ]
    return Compose(xforms)


def dataset_spacing(datalist_file: str, default: Sequence[float] = (2.5, 2.5, 2.5)) -> list[float]:
    """The dataset's voxel spacing (``"spacing"`` in data_prep's dataset.json), else ``default``."""
    if not os.path.exists(datalist_file):
        return [float(s) for s in default]
    with open(datalist_file) as f:
        meta = json.load(f)
    return [float(s) for s in meta.get("spacing", default)]


def dataset_geometry(datalist_file: str, default: str | dict = "perx2ct") -> str | dict:
    """The DRR geometry recorded in data_prep's dataset.json (dict or preset name), else ``default``."""
    if not os.path.exists(datalist_file):
        return default
    with open(datalist_file) as f:
        return json.load(f).get("geometry", default) or default


def _check_volume(ct: torch.Tensor, volume_size: int) -> None:
    if tuple(ct.shape[-3:]) != (volume_size,) * 3:
        raise InputError(
            None, f"CT batch has spatial shape {tuple(ct.shape[-3:])}, network expects {volume_size}^3"
        )


class SliceSampler:
    """``prepare_batch`` for training: random slice axis per batch, ``slices_per_sample`` random slices per case.

    Returns ``(image, target_slices, (), {"slice_index": (B, K), "axis": a})`` as MONAI engines expect.
    """

    def __init__(self, volume_size: int, axes: Sequence[int] = (0, 1, 2), slices_per_sample: int = 1):
        self.volume_size = int(volume_size)
        self.axes = [int(a) for a in axes]
        self.k = int(slices_per_sample)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        ct = batchdata["ct"].to(device=device, non_blocking=non_blocking)
        _check_volume(ct, self.volume_size)
        b = image.shape[0]
        axis = self.axes[int(torch.randint(len(self.axes), (1,)).item())]
        index = torch.randint(self.volume_size, (b, self.k), device=image.device)
        target = select_slices(ct[:, 0], index, axis)
        return image, target, (), {"slice_index": index, "axis": axis}


def select_slices(volume: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, X, Y, Z) volume, (B, K) indices -> (B, K, d1, d2) slices (remaining axes in order)."""
    moved = volume.movedim(1 + axis, 1)  # (B, N, d1, d2)
    gather = index.view(*index.shape, 1, 1).expand(-1, -1, *moved.shape[2:])
    return torch.gather(moved, 1, gather)


def volume_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for evaluation: both views in, the whole [0, 1] CT as the target."""
    return (
        batchdata["image"].to(device=device, non_blocking=non_blocking),
        batchdata["ct"].to(device=device, non_blocking=non_blocking),
    )


def with_mean_prior(network, datalist_file: str, window: str = "xray2ct", split: str = "training"):
    """Give a ``mean_prior`` network the voxel-wise mean of ``split``'s CTs (``window`` scale); returns it.

    Networks built without ``mean_prior`` and datalists that are missing or have no such split are
    returned unchanged (inference: the prior then comes from the checkpoint).
    """
    from common.baselines import mean_training_ct_of_datalist
    from common.intensity import get_window

    if not getattr(network, "mean_prior", False):
        return network
    mean_hu = mean_training_ct_of_datalist(datalist_file, split, shape=(network.volume_size,) * 3)
    if mean_hu is None:
        return network
    return network.set_mean_prior(torch.from_numpy(get_window(window).to_unit(mean_hu)))


def load_drr(path: str) -> np.ndarray:
    """A DRR file written by data_prep (2D NIfTI, [0, 1]) as float32 (H, W)."""
    path = require_file(path)
    try:
        array = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
    except Exception as e:
        raise InputError(path, f"cannot read DRR ({type(e).__name__}: {e})") from e
    array = np.squeeze(array)
    if array.ndim != 2:
        raise InputError(path, f"expected a 2D DRR, got shape {array.shape}")
    return array


def load_split(datalist_file: str, base_dir: str, keys: Sequence[str] = ("test", "validation")) -> list[dict]:
    """The first non-empty split among ``keys`` of a MONAI datalist (paths resolved against ``base_dir``)."""
    from monai.data import load_decathlon_datalist

    with open(require_file(datalist_file)) as f:
        meta = json.load(f)
    for key in keys:
        if meta.get(key):
            return load_decathlon_datalist(datalist_file, data_list_key=key, base_dir=base_dir)
    raise InputError(datalist_file, f"no non-empty split among {list(keys)}")
