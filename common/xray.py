"""Radiographs in (PNG/JPEG, DICOM, our 2D NIfTI DRRs, arrays), model domain out.

:func:`load_xray` gives a float32 (H, W) image in [0, 1] displayed the radiologist's way (bones
and soft tissue bright, air dark, row 0 superior) plus the pixel spacing when the file knows it.
:func:`preprocess_xray` brings a real radiograph close to the DRRs our models are trained on
(``docs/ARCHITECTURE.md``: DRR = 1 - exp(-line integral), in [0, 1], bones bright): centred square
crop or pad, robust percentile normalisation, resize, and optional histogram matching to a DRR.

Sizes are checked before pixels are allocated: a file or array declaring more than ``max_pixels``
(default :data:`MAX_PIXELS`, environment variable ``XRAY2CT_MAX_XRAY_PIXELS``) raises
:class:`InputError`, and so does padding that would produce a square over the limit
(``(2, 60000)`` -> 60000 x 60000), so a 69-byte PNG that declares 60000 x 60000 never costs memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Resize
from PIL import Image, UnidentifiedImageError

from common.errors import InputError, require_file
from common.io import load_nifti_image, read_nifti_header

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_PIXELS = int(os.environ.get("XRAY2CT_MAX_XRAY_PIXELS", 8192 * 8192))  # larger than any detector
# Decoded DICOM pixel bytes (rows x columns x frames x samples x bits allocated / 8): 16 bits at MAX_PIXELS.
# A 32-bit 8192^2 radiograph would decode to 256 MiB before the float copies of the LUT steps.
MAX_DECODED_BYTES = int(os.environ.get("XRAY2CT_MAX_XRAY_DECODED_BYTES", 2 * MAX_PIXELS))


def check_pixel_count(path: str | None, shape, max_pixels: int | None = None, what: str = "image") -> int:
    """Pixels of a declared ``shape``; :class:`InputError` naming ``path`` when over the limit."""
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    dims = tuple(int(s) for s in shape)
    count = math.prod(dims)
    if any(d < 0 for d in dims) or count > limit:
        raise InputError(
            path,
            f"{what} of {' x '.join(map(str, dims))} pixels is over the limit of {limit:,} pixels "
            "(XRAY2CT_MAX_XRAY_PIXELS raises it for genuine files)",
        )
    return count


# ----------------------------------------------------------------------------------------------- loading
def load_xray(source: str | os.PathLike | np.ndarray) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Load a radiograph as float32 (H, W) in [0, 1] and its (row, col) pixel spacing in mm (or None).

    * PNG/JPEG/TIFF: 8-bit divided by 255, 16-bit by 65535; colour and alpha are dropped (luma).
      Spacing None (these files do not carry it reliably).
    * DICOM: modality LUT (rescale) and VOI LUT (window) applied as a viewer would, MONOCHROME1
      inverted, then scaled by its own min/max. Spacing from PixelSpacing, else
      ImagerPixelSpacing (at the detector, i.e. not corrected for geometric magnification).
    * NIfTI (our DRR files): the 2D array as stored, spacing from the header zooms; values
      outside [0, 1] are min/max scaled.
    * numpy array (H, W) or (H, W, 3|4): like a raster file (integers by their dtype's maximum,
      floats kept when already in [0, 1], otherwise min/max scaled).
    """
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
        return _normalise_array(_to_gray(array, None), None), None
    path = require_file(source)
    lower = path.lower()
    if lower.endswith(DICOM_SUFFIXES):
        return _load_dicom(path)
    if lower.endswith(NIFTI_SUFFIXES):
        return _load_nifti(path)
    if lower.endswith(RASTER_SUFFIXES):
        return _load_raster(path), None
    try:  # extensionless DICOM files are common
        return _load_dicom(path)
    except InputError:
        raise InputError(path, "unknown X-ray format (expected PNG, JPEG, TIFF, DICOM or 2D NIfTI)") from None


def _validate(image: np.ndarray, path: str | None) -> np.ndarray:
    if image.ndim != 2:
        raise InputError(path, f"expected a 2D radiograph, got an array of shape {tuple(image.shape)}")
    if image.size == 0 or min(image.shape) < 2:
        raise InputError(path, f"empty image of shape {tuple(image.shape)}")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise InputError(path, "image contains NaN or infinite values")
    return image


def _to_gray(array: np.ndarray, path: str | None) -> np.ndarray:
    """Drop a trailing RGB(A) channel axis (ITU-R 601 luma, as Pillow's "L") and singleton axes."""
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
        rgb = array[..., :3].astype(np.float64)
        gray = rgb @ np.array([0.299, 0.587, 0.114])
        array = (
            gray.astype(np.float32)
            if not np.issubdtype(array.dtype, np.integer)
            else gray.round().astype(array.dtype)
        )
    if array.ndim > 2:
        array = np.squeeze(array)
    return _validate(array, path)


def _minmax(image: np.ndarray, path: str | None) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        raise InputError(path, f"blank image: every pixel equals {lo}")
    return ((image - lo) / (hi - lo)).astype(np.float32)


def _normalise_array(image: np.ndarray, path: str | None) -> np.ndarray:
    """Integers by their dtype's range, floats kept when in [0, 1], else min/max scaled."""
    if image.dtype == np.bool_:
        image = image.astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        if image.dtype.itemsize <= 2 and image.min() >= 0:
            out = (image.astype(np.float32) / float(np.iinfo(image.dtype).max)).astype(np.float32)
        else:
            out = _minmax(image.astype(np.float64), path)
    else:
        image = image.astype(np.float32)
        out = image if image.min() >= 0.0 and image.max() <= 1.0 else _minmax(image, path)
    if float(out.max()) <= float(out.min()):
        raise InputError(path, f"blank image: every pixel equals {float(out.min())}")
    return np.ascontiguousarray(out, dtype=np.float32)


def _load_raster(path: str) -> np.ndarray:
    try:
        with Image.open(path) as pil:
            check_pixel_count(path, (pil.height, pil.width), what="image")  # header only, nothing decoded
            pil.load()
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(pil)
                if pil.mode == "I" and array.min() >= 0 and array.max() <= 65535:
                    array = array.astype(np.uint16)  # 16-bit PNGs may open as 32-bit "I"
            elif pil.mode == "F":
                array = np.asarray(pil, dtype=np.float32)
            else:
                array = np.asarray(pil.convert("L"))
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard (twice its MAX_IMAGE_PIXELS)
        raise InputError(path, f"image is too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"cannot read image ({exc})") from None
    return _normalise_array(_validate(array, path), path)


def pydicom_luts() -> tuple:
    """pydicom's ``(apply_modality_lut, apply_voi_lut)``: ``pydicom.pixels`` in 3.x, ``pixel_data_handlers`` in 2.4.

    MONAI Label 0.8.5 pins pydicom 2.4, so both are supported (bin/compat_check.sh runs the DICOM tests on 2.4).
    """
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _load_dicom(path: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from common.dicom import (  # pydicom: only where DICOM is read
        SizedFile,
        check_inflated_size,
        check_pixel_bytes,
        rescale,
    )

    apply_modality_lut, apply_voi_lut = pydicom_luts()

    check_inflated_size(path)
    try:
        with SizedFile(path) as f:
            ds = pydicom.dcmread(f)
        if ds.get("Rows") is None or ds.get("Columns") is None:
            raise InputError(path, "no Rows/Columns: not an image")
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
        extra = (frames,) if frames > 1 else ()
        extra += (samples,) if samples > 1 else ()
        check_pixel_count(path, (int(ds.Rows), int(ds.Columns), *extra), what="DICOM image")
        check_pixel_bytes(path, ds, MAX_DECODED_BYTES)
        raw = ds.pixel_array
    except InputError:
        raise
    except InvalidDicomError as exc:
        raise InputError(path, f"cannot read DICOM pixels ({exc})") from None
    except Exception as exc:  # pydicom raises assorted types on garbage (BytesLengthException, TypeError...)
        raise InputError(path, f"cannot read DICOM pixels ({type(exc).__name__}: {exc})") from None
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        raw = _to_gray(raw, path)
    if raw.ndim != 2:
        raise InputError(path, f"expected a single-frame 2D radiograph, got pixel data of shape {raw.shape}")
    # float32 and in place where the file allows it (plain rescale, linear window): pydicom's LUT functions
    # return float64 copies, four bytes more per pixel at every step (2.1 GB peak for a 16-bit 8192^2 image)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            if "ModalityLUTSequence" in ds:
                image = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
            else:
                slope, intercept = rescale(ds, path)
                image = raw.astype(np.float32)
                del raw
                if slope != 1.0:
                    image *= np.float32(slope)
                if intercept != 0.0:
                    image += np.float32(intercept)
            if "VOILUTSequence" in ds or ("WindowCenter" in ds and not _linear_window(image, ds)):
                image = np.asarray(apply_voi_lut(image, ds), dtype=np.float32)
    except InputError:
        raise
    except Exception as exc:  # malformed LUT sequences or window values (found by tests/test_fuzz.py)
        raise InputError(path, f"cannot apply the DICOM intensity LUTs ({type(exc).__name__}: {exc})") from None
    image = _validate(image, path)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        np.negative(image, out=image)  # MONOCHROME1 stores air bright: flip to the usual display
    return _minmax_inplace(image, path), _dicom_spacing(ds)


def _linear_window(image: np.ndarray, ds) -> bool:
    """DICOM's LINEAR / LINEAR_EXACT VOI window (first center/width) applied in place to a float32 image.

    The result runs 0..1 instead of pydicom's output range; the min/max scaling that follows makes the two
    equal. False (image untouched) for anything else, which pydicom's ``apply_voi_lut`` then handles.
    """
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if function not in ("LINEAR", "LINEAR_EXACT") or center is None or width is None:
        return False
    try:
        center, width = (
            float(v[0] if isinstance(v, Sequence) and not isinstance(v, str) else v) for v in (center, width)
        )
    except (TypeError, ValueError, IndexError):
        return False
    if not (np.isfinite(center) and np.isfinite(width)):
        return False
    if function == "LINEAR":  # PS3.3 C.11.2.1.2.1
        center, width = center - 0.5, width - 1
    if width <= 0:
        return False
    image -= np.float32(center)
    image /= np.float32(width)
    image += np.float32(0.5)
    np.clip(image, 0.0, 1.0, out=image)
    return True


def _minmax_inplace(image: np.ndarray, path: str | None) -> np.ndarray:
    """:func:`_minmax` of a float32 array that is not needed afterwards, without a temporary copy."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        raise InputError(path, f"blank image: every pixel equals {lo}")
    image -= np.float32(lo)
    image /= np.float32(hi - lo)  # the maximum becomes exactly 1 (x / x), the minimum exactly 0
    np.clip(image, 0.0, 1.0, out=image)  # hi - lo rounded to float32 may leave 1 + eps
    return image


def _dicom_spacing(ds) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            spacing = (float(value[0]), float(value[1]))
            if all(np.isfinite(s) and s > 0 for s in spacing):
                return spacing
    return None


def _load_nifti(path: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    try:
        check_pixel_count(path, read_nifti_header(path)["shape"], what="NIfTI image")
        img = load_nifti_image(path)
        array = np.asarray(img.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:2])
    except InputError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt headers or data
        raise InputError(path, f"cannot read NIfTI ({exc})") from None
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    image = _normalise_array(_validate(array, path), path)
    spacing = zooms if len(zooms) == 2 and all(z > 0 for z in zooms) else None
    return image, spacing


# ----------------------------------------------------------------------------------------------- preprocessing
def square(image: np.ndarray, mode: str = "crop", fill: float = 0.0) -> np.ndarray:
    """Centre-crop (``"crop"``) or zero-pad (``"pad"``) a 2D image to a square."""
    h, w = image.shape
    side = min(h, w) if mode == "crop" else max(h, w)
    if mode == "crop":
        top, left = (h - side) // 2, (w - side) // 2
        return image[top : top + side, left : left + side]
    if mode == "pad":
        check_pixel_count(None, (side, side), what=f"a {w} x {h} image padded to a square of")
        out = np.full((side, side), fill, dtype=image.dtype)
        top, left = (side - h) // 2, (side - w) // 2
        out[top : top + h, left : left + w] = image
        return out
    raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")


def percentile_normalise(image: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clip to the given percentiles and scale to [0, 1]: burnt-in labels and collimator edges saturate."""
    lo, hi = np.percentile(image, percentiles)
    if hi <= lo:
        raise InputError(None, f"image has no contrast between the {percentiles} percentiles")
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def match_histogram(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map intensities so the image's histogram (CDF) follows ``reference``'s (e.g. a training DRR).

    Hand-written because MONAI only offers histogram *equalisation* (``HistogramNormalize``):
    each pixel's empirical quantile is looked up in the reference's quantile function, so the
    output ranks pixels exactly as the input does (deterministic, monotone).
    """
    reference = np.asarray(reference, dtype=np.float64).ravel()
    if reference.size == 0 or not np.all(np.isfinite(reference)):
        raise InputError(None, "reference for histogram matching is empty or contains NaN")
    values, inverse, counts = np.unique(image.ravel(), return_inverse=True, return_counts=True)
    quantiles = (np.cumsum(counts) - 0.5 * counts) / image.size
    ref_sorted = np.sort(reference)
    ref_quantiles = (np.arange(ref_sorted.size) + 0.5) / ref_sorted.size
    mapped = np.interp(quantiles, ref_quantiles, ref_sorted)
    return mapped[inverse].reshape(image.shape).astype(np.float32)


def preprocess_xray(
    image: np.ndarray | str | os.PathLike,
    size: int = 256,
    square_mode: str = "crop",
    percentiles: tuple[float, float] | None = (0.5, 99.5),
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """A real radiograph -> float32 (size, size) in [0, 1] resembling our training DRRs.

    Steps (deterministic): load (when given a path), robust normalisation to the ``percentiles``
    (None: skip), centred square crop (default; drops the neck/abdomen margins that DRRs of chest
    CTs lack) or zero pad, MONAI ``Resize`` (``area`` when shrinking, ``bilinear`` when growing),
    and optional histogram matching to ``reference`` (a DRR from the training set, any size), which
    removes most of the contrast difference between detector processing and simulated DRRs.
    """
    source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    if source is not None:
        image, _ = load_xray(source)
    image = _validate(np.asarray(image, dtype=np.float32), source)
    if not np.all(np.isfinite(image)):
        raise InputError(source, "image contains NaN or infinite values")
    try:
        out = (
            percentile_normalise(image, percentiles) if percentiles is not None else np.clip(image, 0.0, 1.0)
        )
        out = square(out, square_mode, fill=0.0)
    except InputError as exc:  # name the file these steps did not know
        raise InputError(exc.path or source, exc.problem) from None
    if int(size) < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    mode = "area" if out.shape[0] >= size else "bilinear"
    resize = Resize(spatial_size=(int(size), int(size)), mode=mode)
    out = np.asarray(resize(torch.from_numpy(np.ascontiguousarray(out))[None]))[0]
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if reference is not None:
        out = np.clip(match_histogram(out, reference), 0.0, 1.0)
    return out


# ----------------------------------------------------------------------------------------------- model domain
def check_image_array(array: np.ndarray, name: str) -> np.ndarray:
    """A (H, W) or (1, H, W) real, finite array as (H, W); :class:`InputError` naming ``name`` otherwise."""
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
    """A path (PNG, JPEG, DICOM, DRR NIfTI) or a 2D array -> (image_size, image_size) float32 in [0, 1].

    * Real radiographs (PNG, JPEG, TIFF, DICOM files) get :func:`preprocess_xray`: robust percentile
      normalisation, centred square crop, resize, optional histogram matching to ``reference`` (a DRR).
    * DRRs (data_prep's NIfTI files) and arrays are taken as already in the model domain: loaded with
      :func:`load_xray` (integers scaled by their dtype, floats outside [0, 1] min-max scaled), padded
      to a square and resized.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise InputError(path, "file not found")
        if not path.lower().endswith(NIFTI_SUFFIXES):
            return preprocess_xray(path, image_size, reference=reference)
        image, _ = load_xray(path)
    else:
        array = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
        image, _ = load_xray(check_image_array(array, name))
    return preprocess_xray(image, image_size, square_mode="pad", percentiles=None)
