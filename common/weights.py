"""Read published third-party weights (MedicalNet, BiomedCLIP, ...) from a local file, safely and clearly.

One job: ``torch.load(weights_only=True)`` (nothing is unpickled beyond tensors and containers), the
usual wrappers unwrapped (``{"state_dict": ...}``, ``{"model": ...}``), DataParallel's ``module.`` prefix
stripped, and every failure reported as :class:`common.errors.InputError` naming the file. Checking that
the tensors fit a network is the caller's (it knows the architecture). Our own checkpoints are not read here.
"""

from __future__ import annotations

import os

import torch

from common.checkpoint import check_torch_file
from common.errors import InputError


def read_state_dict(
    path: str | os.PathLike, what: str = "weights", strip_prefix: str = "module."
) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file, ``strip_prefix`` removed from their names."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, f"{what} file not found")

    check_torch_file(path, legacy="size")  # no zip bomb; legacy (pre-1.6) files: only their size is checked
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickled object that is not allowed
        raise InputError(path, f"not a readable PyTorch weights file ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise InputError(path, "no state dict of tensors in the file")
    return {k.removeprefix(strip_prefix) if strip_prefix else k: v for k, v in state.items()}
