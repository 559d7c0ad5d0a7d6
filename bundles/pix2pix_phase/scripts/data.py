"""Data of the pix2pix bundle: the aligned slice dataset, batch preparation, the data's CT parameters.

Every axial slice of every (average CT, phase-0 CT) pair is one sample. MONAI has no map-style dataset that
emits a variable number of slices per volume with random access (``PatchDataset`` needs a fixed count per
image, ``GridPatchDataset`` is iterable and cannot be shuffled or split by ``DistributedSampler``), so
:class:`VolumeSliceDataset` indexes (volume, slice) pairs on top of a MONAI ``CacheDataset``: each volume is
loaded, reoriented, windowed and resized once (the configs' ``preprocessing`` chain), then sliced.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset
from torch.utils.data import Dataset

from common.datalist import case_id
from common.errors import InputError, require_file
from common.intensity import get_window

PAIR_KEYS = ("avg", "phase0")


class VolumeSliceDataset(Dataset):
    """Axial slices (C=1, H, W) of cached volume pairs; items are ``{"avg", "phase0", "case", "slice"}``."""

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable,
        keys: Sequence[str] = PAIR_KEYS,
        cache_num_workers: int = 0,
    ) -> None:
        self.keys = tuple(keys)
        self.volumes = CacheDataset(list(data), transform, num_workers=cache_num_workers, progress=False)
        self.index: list[tuple[int, int]] = []
        for v in range(len(self.volumes)):
            item = self.volumes[v]
            shapes = {k: tuple(item[k].shape) for k in self.keys}
            if len(set(shapes.values())) != 1:
                raise InputError(
                    data[v].get(self.keys[0]), f"pair shapes differ after preprocessing: {shapes}"
                )
            self.index.extend((v, z) for z in range(shapes[self.keys[0]][-1]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        v, z = self.index[i]
        item = self.volumes[v]
        out = {
            k: torch.as_tensor(item[k][..., z]).clone() for k in self.keys
        }  # plain tensors: cheap collation
        out["case"] = case_id(item, v)
        out["slice"] = z
        return out


def pad_slices_collate(batch: Sequence[dict], value: float = -1.0) -> dict:
    """Collate slices of different in-plane sizes (volumes of any size in one epoch, e.g. a 512^2 CT beside
    a 122x102 crop): every (C, H, W) tensor is padded around its centre to the batch's largest (H, W) with
    ``value`` (-1: air, the floor of the symmetric window, on input and target alike), then collated."""
    keys = [k for k, v in batch[0].items() if isinstance(v, torch.Tensor) and v.ndim == 3]
    height = max(int(item[k].shape[-2]) for item in batch for k in keys) if keys else 0
    width = max(int(item[k].shape[-1]) for item in batch for k in keys) if keys else 0
    padded = []
    for item in batch:
        item = dict(item)
        for k in keys:
            ph, pw = height - item[k].shape[-2], width - item[k].shape[-1]
            if ph or pw:
                sides = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
                item[k] = torch.nn.functional.pad(item[k], sides, value=value)
        padded.append(item)
    return torch.utils.data.default_collate(padded)


class PairBatch:
    """``prepare_batch`` for MONAI engines: (input, target) tensors from two dict keys, on ``device``."""

    def __init__(self, input_key: str = "avg", target_key: str | None = "phase0") -> None:
        self.input_key, self.target_key = input_key, target_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        x = torch.as_tensor(batchdata[self.input_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if self.target_key is None or self.target_key not in batchdata:
            return x, None
        y = torch.as_tensor(batchdata[self.target_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        return x, y


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


def inference_items(folder: str, pattern: str = "*.nii*", key: str = "avg") -> list[dict]:
    """``{key: path}`` for every file of ``folder`` matching ``pattern``; :class:`InputError` when there is none."""
    files = sorted(f for f in glob.glob(os.path.join(folder, pattern)) if not os.path.basename(f).startswith("."))
    if not files:
        raise InputError(folder, f"no input volume matches {pattern!r}: nothing to translate")
    return [{key: f} for f in files]
