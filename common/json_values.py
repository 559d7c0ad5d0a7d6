"""One conversion of Python values (numpy, torch, paths, DRR geometries, HU windows) to JSON types.

Checkpoint records (:mod:`common.checkpoint`) and reports (:mod:`common.handlers`) both write JSON from config
values and metrics; this is the one rule for both. Records are strict (an unknown type is an error: a record
must stay plain data) and keep NaN as a float; reports turn NaN and +-inf into ``null`` (strict JSON) and pass
unknown types through.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from common.errors import InputError


def plain(value, strict: bool = True, finite: bool = False):
    """``value`` as JSON types: mappings -> dicts with str keys, tuples/arrays/tensors -> lists, numpy scalars ->
    Python numbers, paths/devices/dtypes -> str, objects with ``as_dict()`` -> that dict.

    ``strict``: an unknown type raises :class:`InputError` (else it is returned as it is); ``finite``: NaN and
    +-inf become None.
    """
    if hasattr(value, "as_dict") and callable(value.as_dict):
        return plain(value.as_dict(), strict, finite)
    if isinstance(value, Mapping):
        return {str(k): plain(v, strict, finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, strict, finite) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), strict, finite) if finite else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and finite and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None or not strict:
        return value
    raise InputError(None, f"cannot record a value of type {type(value).__name__} ({value!r}) in a checkpoint")


def jsonable(value):
    """:func:`plain` for reports: NaN and +-inf -> None (one rule everywhere), unknown types passed through."""
    return plain(value, strict=False, finite=True)
