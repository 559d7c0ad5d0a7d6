"""Uploaded radiographs: refuse what is not a usable X-ray before it reaches a model, with a message a user reads.

Files are recognised by their content (magic bytes), not their name, and their pixel size is read from the
header before any pixel data is decoded, so a huge or malformed upload costs no memory.
"""

from __future__ import annotations

import io
import os

from PIL import Image, UnidentifiedImageError

from common.atomic import atomic_path
from common.errors import InputError
from common.xray import load_xray

MAX_UPLOAD_BYTES = 20_000_000  # 20 MB: a 3000 x 3000 16-bit DICOM is 18 MB
MIN_SIDE = 64  # pixels; smaller is a thumbnail or an icon, not a radiograph
MAX_SIDE = 8192  # pixels; larger than any detector, and a decompression bomb guard
SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


def sniff_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"``, ``"dicom"`` (Part 10 preamble) from the first bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def image_size(data: bytes, fmt: str, name: str) -> tuple[int, int]:
    """(rows, cols) from the header only."""
    if fmt == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        except Exception as exc:  # pydicom raises many types for truncated or odd files
            raise InputError(name, f"not a readable DICOM image ({type(exc).__name__})") from None
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return int(pil.height), int(pil.width)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(name, f"not a readable {fmt.upper()} image ({exc})") from None


def validate_upload(data: bytes, name: str, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """Check an uploaded file's bytes; returns its format. Raises :class:`InputError` naming ``name``."""
    if len(data) == 0:
        raise InputError(name, "the file is empty")
    if len(data) > max_bytes:
        raise InputError(name, f"the file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
    fmt = sniff_format(data)
    if fmt is None:
        raise InputError(name, "not a PNG, JPEG or DICOM image")
    rows, cols = image_size(data, fmt, name)
    if min(rows, cols) < MIN_SIDE or max(rows, cols) > MAX_SIDE:
        raise InputError(
            name, f"image is {cols} x {rows} pixels; expected between {MIN_SIDE} and {MAX_SIDE} per side"
        )
    return fmt


def store_upload(data: bytes, name: str, folder: str, stem: str, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """Validate, write to ``<folder>/<stem>.<ext>`` (atomically) and check it decodes; returns the path."""
    fmt = validate_upload(data, name, max_bytes)
    path = os.path.join(folder, stem + SUFFIX[fmt])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    try:
        load_xray(path)  # decodes the pixels: truncated data, blank images, NaN...
    except InputError as exc:
        os.remove(path)
        raise InputError(name, exc.problem) from None
    return path
