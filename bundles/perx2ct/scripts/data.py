"""Data for PerX2CT: batch preparation over data_prep's datalist, and the per-iteration slice sampling.

Each datalist item has ``ct`` (HU volume, canonical RAS), ``pa`` and ``lateral`` (DRRs in [0, 1]). The
configs' transform chain (``preprocessing``) stacks the two views into ``image`` (2, H, W) and scales the CT
to [0, 1] with the XRAY2CT window. PerX2CT trains on single CT slices of random axis and position (sagittal,
coronal, axial): :class:`SliceSampler` is the trainer's ``prepare_batch`` that draws them and passes
``slice_index``/``axis`` to the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch

from common.errors import InputError, require_file

VIEW_KEYS = ("pa", "lateral")


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
