"""Bring a radiograph (path or array) to the PerX2CT model domain: (size, size) float32 in [0, 1].

* Real radiographs (PNG, JPEG, TIFF, DICOM files) get ``common.xray.preprocess_xray``: robust percentile
  normalisation, centred square crop, resize, and optionally histogram matching to a training DRR.
* DRRs (data_prep's NIfTI files) and arrays are taken as already in the model domain: loaded with
  ``common.xray.load_xray`` (integers scaled by their dtype, floats outside [0, 1] min-max scaled) and resized.
* The released PerX2CT model (:func:`load_view_perx2ct`) saw 8-bit PNGs of plastimatch's raw line integrals,
  min-max scaled (its ``data_preprocessing/2_xraypro.py``: ``raw / max * 255`` to uint8, then
  ``matplotlib.pyplot.imsave``'s autoscaled grey map), resized to 128 with PIL's Lanczos filter, / 255.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from common.drr import image_to_line_integral
from common.errors import InputError
from common.xray import NIFTI_SUFFIXES, load_xray, preprocess_xray, square


def _check_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or min(array.shape) < 2:
        raise InputError(name, f"expected a 2D image, got an array of shape {tuple(array.shape)}")
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(name, f"expected a real-valued image, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise InputError(name, "expected a real-valued image, got complex values")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(name, "image contains NaN or infinite values")
    return array


def load_view(
    source, image_size: int, name: str = "x-ray", reference: np.ndarray | None = None
) -> np.ndarray:
    """A path (PNG, JPEG, DICOM, DRR NIfTI) or a 2D array -> (image_size, image_size) float32 in [0, 1]."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise InputError(path, "file not found")
        if not path.lower().endswith(NIFTI_SUFFIXES):
            return preprocess_xray(path, image_size, reference=reference)
        image, _ = load_xray(path)
    else:
        array = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
        image, _ = load_xray(_check_array(array, name))
    return preprocess_xray(image, image_size, square_mode="pad", percentiles=None)


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
        image, _ = load_xray(_check_array(array, name))
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
