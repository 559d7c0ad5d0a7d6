"""Size limits checked before memory is allocated for a declared volume, shared by every reader
(:mod:`common.io` for NIfTI/HDF5/NPY, :mod:`common.dicom` for DICOM series).

The voxel limit is the ``max_voxels`` argument, default :data:`MAX_VOXELS` (environment variable
``XRAY2CT_MAX_VOXELS``); a gzip stream cannot inflate more than :data:`DEFLATE_MAX_RATIO`:1, so a forged
76-byte header never costs gigabytes of memory.
"""

from __future__ import annotations

import math
import os

from common.errors import InputError

MAX_VOXELS = int(os.environ.get("XRAY2CT_MAX_VOXELS", 1024**3))  # 4 GiB as float32; a 512^2 x 4000 CT fits
DEFLATE_MAX_RATIO = 1032  # deflate's hard limit on the inflated / compressed size ratio


def check_voxel_count(
    path: str | os.PathLike | None, shape, max_voxels: int | None = None, what: str = "volume"
) -> int:
    """The number of voxels of ``shape``; :class:`InputError` when over ``max_voxels`` (default MAX_VOXELS)."""
    limit = MAX_VOXELS if max_voxels is None else int(max_voxels)
    dims = [int(s) for s in shape]
    if any(d < 0 for d in dims):
        raise InputError(path, f"header declares a negative size {tuple(dims)}")
    count = math.prod(dims)
    if count > limit:
        raise InputError(
            path,
            f"{what} of shape {tuple(dims)} has {count:,} voxels, over the limit of {limit:,} "
            "(raise it with max_voxels= or XRAY2CT_MAX_VOXELS if the file is genuine)",
        )
    return count


def check_payload_fits(path: str, offset: int, nbytes: int, compressed: bool) -> None:
    """Refuse a header whose declared data cannot be in the file (truncated or forged header)."""
    size = os.path.getsize(path)
    if compressed:
        most = DEFLATE_MAX_RATIO * size
        if offset + nbytes > most:
            raise InputError(
                path,
                f"header declares {nbytes:,} bytes of data but a {size:,}-byte gzip file inflates to at most "
                f"{most:,} bytes: truncated file or forged header",
            )
    elif offset + nbytes > size:
        raise InputError(
            path,
            f"truncated file: {size:,} bytes, the header declares {offset + nbytes:,} (data from byte {offset})",
        )
