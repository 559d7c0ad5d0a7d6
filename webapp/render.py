"""Server-side pictures for the page: windowed CT slices, X-rays and DRRs as PNG bytes.

DRRs are rendered where they are scored (:func:`xray2ct.models.score_against_inputs`); this module only encodes them.

Slices use ``common.preview.oriented_slice`` (radiological orientation) and are resampled so a screen
pixel covers the same millimetres in both directions.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from common.errors import InputError
from common.intensity import get_window
from common.preview import VIEWS, oriented_slice, view_pixel_mm
from common.volume import Volume

WINDOW_PRESETS = ("lung", "mediastinum", "bone", "xray2ct")  # xray2ct: the whole network range
_SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
DISPLAY_PIXELS = 320  # longest side of a slice PNG


def _png(image_u8: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    pil = Image.fromarray(np.ascontiguousarray(image_u8))
    if size is not None and size != pil.size:
        pil = pil.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def slice_count(volume: Volume, axis: str) -> int:
    if axis not in _SLICE_AXIS:
        raise InputError(None, f"axis must be one of {VIEWS}, got {axis!r}")
    return int(volume.shape[_SLICE_AXIS[axis]])


def slice_png(volume: Volume, axis: str, index: int, window: str) -> bytes:
    """One slice of a canonical RAS HU volume through a named HU window, as an 8-bit PNG."""
    n = slice_count(volume, axis)
    if not 0 <= index < n:
        raise InputError(None, f"{axis} slice index must be in [0, {n - 1}], got {index}")
    if window not in WINDOW_PRESETS:
        raise InputError(None, f"window must be one of {WINDOW_PRESETS}, got {window!r}")
    plane = oriented_slice(np.asarray(volume.array, dtype=np.float32), axis, int(index))
    unit = get_window(window).to_unit(plane)
    row_mm, col_mm = view_pixel_mm(volume.spacing, axis)
    height_mm, width_mm = plane.shape[0] * row_mm, plane.shape[1] * col_mm
    scale = DISPLAY_PIXELS / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return _png(np.round(unit * 255.0).astype(np.uint8), size)


def xray_png(image: np.ndarray) -> bytes:
    """A (H, W) [0, 1] radiograph as an 8-bit PNG."""
    return _png(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8))

