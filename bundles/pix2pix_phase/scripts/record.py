"""Training record stored inside every checkpoint: hyperparameters and CT parameters as JSON.

``CheckpointSaver`` saves any object with ``state_dict()``/``load_state_dict()``, so the record rides in
the same ``.pt`` file as the generator (key ``record``). ``overrides`` are config ids with their values:
written as ``training_args.json`` they can be passed back to ``monai.bundle run --args_file`` to
rebuild the same network and training schedule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch

from common.atomic import atomic_write_text
from common.errors import InputError, require_file
from common.intensity import get_window

RECORD_KEY = "record"


def ct_parameters(
    datalist: Sequence[dict], key: str = "avg", window: str = "xray2ct", resize_to=None, image_size=None
) -> dict:
    """Voxel spacing, slice thickness (spacing along the superior axis), shape and HU window of the data.

    Reads NIfTI headers only (no voxels), in canonical RAS order as the dataset sees them.
    """
    cases = {}
    for i, item in enumerate(datalist):
        path = require_file(item[key])
        try:
            img = nib.as_closest_canonical(nib.load(path))
        except Exception as e:
            raise InputError(path, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
        spacing = [float(s) for s in img.header.get_zooms()[:3]]
        cases[str(item.get("id", i))] = {"spacing": spacing, "shape": [int(s) for s in img.shape[:3]]}
    spacings = np.array([c["spacing"] for c in cases.values()]) if cases else np.zeros((0, 3))
    return {
        "hu_window": get_window(window).as_dict(),
        "intensity": "HU clipped to the window, scaled to [-1, 1]",
        "axial_axis": "RAS axis 2 (superior)",
        "voxel_spacing": spacings.mean(0).tolist() if len(spacings) else None,
        "slice_thickness": float(spacings[:, 2].mean()) if len(spacings) else None,
        "image_size": image_size,
        "resize_to": resize_to,
        "cases": cases,
    }


class TrainingRecord:
    """A JSON-serialisable dict that ``CheckpointSaver``/``CheckpointLoader`` treat like a module."""

    def __init__(self, overrides: dict | None = None, ct: dict | None = None, bundle: str = "pix2pix_phase"):
        self.data = {"bundle": bundle, "overrides": _plain(overrides or {}), "ct": _plain(ct or {})}

    def state_dict(self) -> dict:
        return {"json": json.dumps(self.data, sort_keys=True)}

    def load_state_dict(self, state: dict) -> None:
        self.data = json.loads(state["json"])

    @property
    def overrides(self) -> dict:
        return self.data["overrides"]

    def write(self, folder: str | os.PathLike) -> str:
        """Write ``training_record.json`` and ``training_args.json`` (``--args_file`` ready) into ``folder``."""
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(
            os.path.join(folder, "training_args.json"), json.dumps(self.overrides, indent=2) + "\n"
        )
        path = os.path.join(folder, "training_record.json")
        atomic_write_text(path, json.dumps(self.data, indent=2) + "\n")
        return path


def load_training_record(checkpoint: str | os.PathLike) -> dict:
    """The record saved with a checkpoint (``{"bundle", "overrides", "ct"}``)."""
    path = require_file(checkpoint)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if RECORD_KEY not in state:
        raise InputError(path, f"checkpoint has no '{RECORD_KEY}' entry (keys: {sorted(state)})")
    record = TrainingRecord()
    record.load_state_dict(state[RECORD_KEY])
    return record.data


def _plain(value):
    """Config values (tuples, numpy, torch) -> JSON types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, torch.device):
        return str(value)
    return value
