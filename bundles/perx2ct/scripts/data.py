"""Data for PerX2CT: batch preparation over data_prep's datalist, and the per-iteration slice sampling.

Each datalist item has ``ct`` (HU volume, canonical RAS), ``pa`` and ``lateral`` (DRRs in [0, 1]). The
configs' transform chain (``preprocessing``) stacks the two views into ``image`` (2, H, W) and scales the CT
to [0, 1] with the XRAY2CT window. PerX2CT trains on single CT slices of random axis and position (sagittal,
coronal, axial): :class:`SliceSampler` is the trainer's ``prepare_batch`` that draws them and passes
``slice_index``/``axis`` to the network.

The released PerX2CT model (:func:`load_view_perx2ct`) saw 8-bit PNGs of plastimatch's raw line integrals,
min-max scaled (its ``data_preprocessing/2_xraypro.py``: ``raw / max * 255`` to uint8, then
``matplotlib.pyplot.imsave``'s autoscaled grey map), resized to 128 with PIL's Lanczos filter, / 255.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from common.drr import image_to_line_integral
from common.errors import InputError
from common.xray import NIFTI_SUFFIXES, check_image_array, load_xray, square

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


def perx2ct_png_intensity(line_integral: np.ndarray) -> np.ndarray:
    """A projection (H, W) linear in the line integral -> PerX2CT's stored 8-bit PNG values (uint8).

    ``raw / max * 255`` truncated to uint8, then matplotlib's autoscaled grey colormap (256 entries:
    ``min(floor((v - min) / (max - min) * 256), 255)``), which is what ``plt.imsave`` wrote.
    """
    raw = np.asarray(line_integral, dtype=np.float64)
    peak = raw.max()
    if not np.isfinite(peak) or peak <= 0:
        raise InputError(None, "projection has no positive values")
    im = (np.clip(raw, 0.0, None) / peak * 255).astype(np.uint8).astype(np.float64)
    lo, hi = im.min(), im.max()
    if hi <= lo:
        raise InputError(None, "projection has no contrast")
    return np.minimum(np.floor((im - lo) / (hi - lo) * 256), 255).astype(np.uint8)


def load_view_perx2ct(source, image_size: int = 128, name: str = "x-ray") -> np.ndarray:
    """A radiograph as the released PerX2CT model saw it: (image_size, image_size) float32 = PNG / 255.

    Our DRRs (NIfTI files or arrays in [0, 1] = ``1 - exp(-L / 4)``) are turned back into line integrals
    first; other radiographs (PNG, JPEG, DICOM) are taken as already linear in them (unknown detector
    processing). The orientation is ours (radiologist display); the network applies the released camera's
    flips itself.
    """
    from PIL import Image

    is_path = isinstance(source, (str, os.PathLike))
    if is_path and not os.path.exists(os.fspath(source)):
        raise InputError(os.fspath(source), "file not found")
    if is_path:
        image, _ = load_xray(os.fspath(source))
        drr = os.fspath(source).lower().endswith(NIFTI_SUFFIXES)
    else:
        array = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
        image, _ = load_xray(check_image_array(array, name))
        drr = True
    image = square(np.asarray(image, dtype=np.float32), "pad", fill=0.0)
    linear = image_to_line_integral(torch.from_numpy(image)).numpy() if drr else image
    try:
        png = perx2ct_png_intensity(linear)
    except InputError as e:
        raise InputError(os.fspath(source) if is_path else name, e.problem) from None
    if png.shape != (image_size, image_size):
        png = np.asarray(Image.fromarray(png).resize((image_size, image_size), Image.LANCZOS))
    return png.astype(np.float32) / 255.0
