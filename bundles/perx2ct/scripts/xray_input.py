"""Bring a radiograph (path or array) to the PerX2CT model domain: (size, size) float32 in [0, 1].

* Real radiographs (PNG, JPEG, TIFF, DICOM files) get ``common.xray.preprocess_xray``: robust percentile
  normalisation, centred square crop, resize, and optionally histogram matching to a training DRR.
* DRRs (data_prep's NIfTI files) and arrays are taken as already in the model domain: loaded with
  ``common.xray.load_xray`` (integers scaled by their dtype, floats outside [0, 1] min-max scaled) and resized.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from common.errors import InputError
from common.xray import NIFTI_SUFFIXES, load_xray, preprocess_xray


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
