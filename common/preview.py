"""Pictures users look at: orthogonal-slice montages, slice GIFs and X-ray PNGs (Pillow only).

Volumes are canonical RAS arrays (X=Right, Y=Anterior, Z=Superior, see ``docs/ARCHITECTURE.md``)
in HU; a :class:`common.volume.Volume` is reoriented to canonical first and brings its spacing.
Every slice is shown the way radiologists read it:

* axial: seen from the feet, anterior up, patient's right on the image left;
* coronal: seen from the front, superior up, patient's right on the image left;
* sagittal: seen from the patient's left, superior up, anterior on the image left
  (as our lateral DRRs).

Slices are resampled for display so each screen pixel covers the same millimetres in both
directions: anisotropic voxels (e.g. 0.7 x 0.7 x 2.5 mm) are not squashed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.atomic import atomic_path
from common.errors import InputError
from common.intensity import HUWindow, get_window
from common.volume import Volume

VIEWS = ("axial", "coronal", "sagittal")
# Spatial axis each view slices through, and the (row, column) array axes shown.
_SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_SHOWN_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
LABEL_HEIGHT = 14
GAP = 4
BACKGROUND = 0
TEXT_COLOUR = 255


# ----------------------------------------------------------------------------------------------- inputs
def _as_canonical(volume, spacing, name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Volume | array -> (canonical RAS float32 array, spacing mm); validates shape and values."""
    if isinstance(volume, Volume):
        canonical = volume.to_canonical()
        array, vol_spacing = np.asarray(canonical.array, dtype=np.float32), canonical.spacing
        spacing = vol_spacing if spacing is None else spacing
    else:
        array = np.asarray(volume, dtype=np.float32)
        spacing = (1.0, 1.0, 1.0) if spacing is None else spacing
    array = np.squeeze(array) if array.ndim > 3 else array
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(name, f"expected a 3D volume, got shape {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise InputError(name, "volume contains NaN or infinite values")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(name, f"spacing must be 3 positive numbers, got {spacing}")
    return array, spacing  # type: ignore[return-value]


def _to_uint8(image: np.ndarray, window: HUWindow | None) -> np.ndarray:
    """HU through ``window`` (or an already [0, 1] image when None) -> uint8."""
    unit = window.to_unit(image) if window is not None else np.clip(image, 0.0, 1.0)
    return np.round(np.asarray(unit, dtype=np.float32) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- slicing
def oriented_slice(array: np.ndarray, view: str, index: int | None = None) -> np.ndarray:
    """A 2D slice of a canonical RAS array, oriented for display (see the module docstring).

    The shown axes run toward R, A or S with increasing index; radiological display puts the
    patient's right, anterior and superior at the image left/top, so both image axes are reversed.
    """
    if view not in _SLICE_AXIS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    axis = _SLICE_AXIS[view]
    index = array.shape[axis] // 2 if index is None else index
    plane = np.take(array, index, axis=axis)  # remaining axes keep their order
    row_axis, col_axis = _SHOWN_AXES[view]
    remaining = [a for a in range(3) if a != axis]
    plane = np.transpose(plane, (remaining.index(row_axis), remaining.index(col_axis)))
    return plane[::-1, ::-1]


def view_pixel_mm(spacing: Sequence[float], view: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of :func:`oriented_slice` for ``view``."""
    row_axis, col_axis = _SHOWN_AXES[view]
    return float(spacing[row_axis]), float(spacing[col_axis])


def _display(plane_u8: np.ndarray, pixel_mm: tuple[float, float], mm_per_pixel: float) -> Image.Image:
    """Resample so that one screen pixel is ``mm_per_pixel`` in both directions."""
    height = max(1, round(plane_u8.shape[0] * pixel_mm[0] / mm_per_pixel))
    width = max(1, round(plane_u8.shape[1] * pixel_mm[1] / mm_per_pixel))
    return Image.fromarray(plane_u8).resize((width, height), Image.Resampling.BILINEAR)


def _labelled(panel: Image.Image, text: str, font) -> Image.Image:
    out = Image.new("L", (panel.width, panel.height + LABEL_HEIGHT), BACKGROUND)
    out.paste(panel, (0, LABEL_HEIGHT))
    ImageDraw.Draw(out).text((2, 1), text, fill=TEXT_COLOUR, font=font)
    return out


def _grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of panels onto one canvas, columns aligned by their widest panel."""
    n_cols = max(len(r) for r in rows)
    col_w = [max((r[c].width for r in rows if c < len(r)), default=0) for c in range(n_cols)]
    row_h = [max(p.height for p in r) for r in rows]
    width = sum(col_w) + GAP * (n_cols + 1)
    height = sum(row_h) + GAP * (len(rows) + 1)
    canvas = Image.new("L", (width, height), BACKGROUND)
    y = GAP
    for r, panels in enumerate(rows):
        x = GAP
        for c, panel in enumerate(panels):
            canvas.paste(panel, (x, y))
            x += col_w[c] + GAP
        y += row_h[r] + GAP
    return canvas


def _check_xray(image, name: str) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    image = np.squeeze(image) if image.ndim > 2 else image
    if image.ndim != 2 or image.size == 0:
        raise InputError(name, f"expected a 2D X-ray image, got shape {tuple(image.shape)}")
    if not np.all(np.isfinite(image)):
        raise InputError(name, "X-ray contains NaN or infinite values")
    return image


# ----------------------------------------------------------------------------------------------- outputs
def render_montage(
    volumes: Mapping[str, Volume | np.ndarray],
    xrays: Mapping[str, np.ndarray] | None = None,
    window: str | HUWindow = "lung",
    spacing: Sequence[float] | None = None,
    panel_size: int = 256,
) -> Image.Image:
    """The montage image of :func:`save_montage_png` (one row per volume, axial/coronal/sagittal)."""
    if not volumes:
        raise InputError(None, "no volume to show")
    w = get_window(window)
    font = ImageFont.load_default()
    arrays = {name: _as_canonical(vol, spacing, name) for name, vol in volumes.items()}
    largest_mm = max(max(s * n for s, n in zip(sp, arr.shape)) for arr, sp in arrays.values())
    mm_per_pixel = largest_mm / panel_size  # one scale for every panel: sizes compare across rows
    rows = []
    for name, (array, sp) in arrays.items():
        row = []
        for view in VIEWS:
            panel = _display(_to_uint8(oriented_slice(array, view), w), view_pixel_mm(sp, view), mm_per_pixel)
            row.append(_labelled(panel, f"{name}: {view}", font))
        rows.append(row)
    if xrays:
        row = []
        for name, image in xrays.items():
            image = _check_xray(image, name)
            scale = panel_size / max(image.shape)
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            panel = Image.fromarray(_to_uint8(image, None)).resize(size, Image.Resampling.BILINEAR)
            row.append(_labelled(panel, name, font))
        rows.append(row)
    return _grid(rows)


def save_montage_png(
    path: str | os.PathLike,
    volumes: Mapping[str, Volume | np.ndarray],
    xrays: Mapping[str, np.ndarray] | None = None,
    window: str | HUWindow = "lung",
    spacing: Sequence[float] | None = None,
    panel_size: int = 256,
) -> str:
    """Write a PNG: one row per HU volume (middle axial/coronal/sagittal slices), X-rays as a last row.

    ``spacing`` (mm) applies to plain arrays (default 1 mm); a :class:`Volume` uses its own.
    The largest physical extent is drawn ``panel_size`` pixels wide; X-rays ([0, 1]) are drawn
    ``panel_size`` pixels along their longest side.
    """
    image = render_montage(volumes, xrays, window=window, spacing=spacing, panel_size=panel_size)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return os.fspath(path)


def save_slice_gif(
    path: str | os.PathLike,
    volume: Volume | np.ndarray,
    axis: str = "axial",
    window: str | HUWindow = "lung",
    compare: Volume | np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    max_frames: int = 48,
    panel_size: int = 256,
    frame_ms: int = 80,
) -> str:
    """Write an animated GIF stepping through ``axis`` slices, beside ``compare`` when given.

    At most ``max_frames`` evenly spaced slices are used (GIF size stays small); slices run from
    inferior to superior (axial), posterior to anterior (coronal), left to right (sagittal).
    """
    if axis not in _SLICE_AXIS:
        raise ValueError(f"axis must be one of {VIEWS}, got {axis!r}")
    if max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    w = get_window(window)
    stacks = [_as_canonical(volume, spacing, "volume")]
    if compare is not None:
        stacks.append(_as_canonical(compare, spacing, "compare"))
        if stacks[1][0].shape != stacks[0][0].shape:
            raise InputError(
                "compare", f"shape {stacks[1][0].shape} does not match the volume's {stacks[0][0].shape}"
            )
    n = stacks[0][0].shape[_SLICE_AXIS[axis]]
    indices = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int))
    largest_mm = max(max(s * k for s, k in zip(sp, arr.shape)) for arr, sp in stacks)
    mm_per_pixel = largest_mm / panel_size
    frames = []
    for index in indices:
        panels = [
            _display(
                _to_uint8(oriented_slice(arr, axis, int(index)), w), view_pixel_mm(sp, axis), mm_per_pixel
            )
            for arr, sp in stacks
        ]
        frames.append(_grid([panels]).convert("P"))
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return os.fspath(path)


def save_xray_png(path: str | os.PathLike, image: np.ndarray, bits: int = 8) -> str:
    """Write a (H, W) [0, 1] radiograph as a grayscale PNG (8 or 16 bit), atomically."""
    image = _check_xray(image, os.fspath(path))
    if bits == 8:
        pil = Image.fromarray(_to_uint8(image, None))
    elif bits == 16:
        pil = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16))
    else:
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return os.fspath(path)
