"""Uploaded radiographs: refuse what is not a usable X-ray before it reaches a model, with a message a user reads.

Files are recognised by their content (magic bytes), not their name. Checking an upload costs no pixel
memory: it is copied to disk in 1 MiB pieces (stopping at the size limit), then only its header is read
(rows and columns, frames, a deflated DICOM's inflated size). Decoding happens later, for admitted jobs
only, a bounded number at a time (:mod:`webapp.app`).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from PIL import Image

from common.atomic import atomic_path
from common.errors import InputError
from common.xray import MAX_PIXELS

MAX_UPLOAD_BYTES = 20_000_000  # 20 MB: a 3000 x 3000 16-bit DICOM is 18 MB
MIN_SIDE = 64  # pixels; smaller is a thumbnail or an icon, not a radiograph
MAX_SIDE = 8192  # pixels; larger than any detector, and a decompression bomb guard
INFLATE_FACTOR = 4  # a deflated DICOM may inflate to this many times the upload limit
SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
CHUNK = 1 << 20


class UploadTooLarge(InputError):
    """An upload over the byte limit (HTTP 413)."""


def sniff_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"``, ``"dicom"`` (Part 10 preamble) from the first bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def image_size(path: str, fmt: str, name: str, max_inflated_bytes: int) -> tuple[int, int]:
    """(rows, cols) from the header only; a multi-frame DICOM counts its frames into the rows."""
    if fmt == "dicom":
        import pydicom

        from common.dicom import SizedFile, check_inflated_size, check_pixel_bytes
        from common.xray import MAX_DECODED_BYTES

        try:
            check_inflated_size(path, max_inflated_bytes)
        except InputError as exc:
            raise InputError(name, exc.problem) from None
        try:
            with SizedFile(path) as f:  # a declared element length costs no more than the upload holds
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            frames = int(ds.get("NumberOfFrames") or 1) * int(ds.get("SamplesPerPixel") or 1)
            check_pixel_bytes(name, ds, MAX_DECODED_BYTES)  # bits allocated count too: 32-bit RLE
            return int(ds.Rows) * frames, int(ds.Columns)
        except InputError:
            raise
        except Exception as exc:  # pydicom raises many types for truncated or odd files
            raise InputError(name, f"not a readable DICOM image ({type(exc).__name__})") from None
    try:
        with Image.open(path) as pil:  # reads the header; pixels stay undecoded
            return int(pil.height), int(pil.width)
    except Image.DecompressionBombError:
        raise InputError(
            name, "image declares far more pixels than any radiograph (decompression bomb?)"
        ) from None
    except Exception as exc:  # Pillow raises assorted types on garbage
        raise InputError(name, f"not a readable {fmt.upper()} image ({type(exc).__name__}: {exc})") from None


def save_upload(
    source: BinaryIO,
    name: str,
    folder: str,
    stem: str,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> str:
    """Copy an upload to ``<folder>/<stem>.<ext>`` (atomically) after checking size, format and header.

    Raises :class:`InputError` naming ``name`` (:class:`UploadTooLarge` over ``max_bytes``). No pixel is
    decoded here.
    """
    head = source.read(CHUNK)
    if not head:
        raise InputError(name, "the file is empty")
    fmt = sniff_format(head)
    path = os.path.join(folder, stem + SUFFIX.get(fmt, ".bin"))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            size = len(head)
            f.write(head)
            while size <= max_bytes and (chunk := source.read(CHUNK)):
                size += len(chunk)
                f.write(chunk)
        if size > max_bytes:
            raise UploadTooLarge(name, f"larger than the {max_bytes / 1e6:.0f} MB limit")
        if fmt is None:
            raise InputError(name, "not a PNG, JPEG or DICOM image")
        rows, cols = image_size(tmp, fmt, name, INFLATE_FACTOR * max_bytes)
        if min(rows, cols) < MIN_SIDE or max(rows, cols) > MAX_SIDE or rows * cols > max_pixels:
            raise InputError(
                name,
                f"image is {cols} x {rows} pixels; expected {MIN_SIDE} to {MAX_SIDE} per side "
                f"and at most {max_pixels / 1e6:.0f} megapixels",
            )
    return path
