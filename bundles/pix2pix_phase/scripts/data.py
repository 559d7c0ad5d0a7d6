"""Aligned NIfTI slice dataset: every axial slice of every (average CT, phase-0 CT) pair is one sample.

MONAI has no map-style dataset that emits a variable number of slices per volume with random access
(``PatchDataset`` needs a fixed count per image, ``GridPatchDataset`` is iterable and cannot be
shuffled or split by ``DistributedSampler``), so this small one indexes (volume, slice) pairs on top of
a MONAI ``CacheDataset``: each volume is loaded, reoriented, windowed and resized once, then sliced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import CacheDataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Resized,
)
from torch.utils.data import Dataset

from common.errors import InputError
from common.transforms import hu_window_transform

PAIR_KEYS = ("avg", "phase0")


def volume_transforms(
    keys: Sequence[str] = PAIR_KEYS,
    resize_to: int | Sequence[int] | None = None,
    window: str = "xray2ct",
) -> Compose:
    """Load -> channel first -> canonical RAS (axis 2 = superior, the axial slice axis) -> HU window to
    [-1, 1] -> optional in-plane resize (slice count kept). Invertible (``Invertd``) except the window."""
    keys = list(keys)
    transforms = [
        LoadImaged(keys=keys, image_only=False),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        hu_window_transform(keys, window=window, symmetric=True),
    ]
    if resize_to is not None:
        size = (resize_to, resize_to) if isinstance(resize_to, int) else tuple(resize_to)
        transforms.append(Resized(keys=keys, spatial_size=(*size, -1), mode="area"))
    transforms.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(transforms)


class VolumeSliceDataset(Dataset):
    """Axial slices (C=1, H, W) of cached volume pairs; items are ``{"avg", "phase0", "case", "slice"}``."""

    def __init__(
        self,
        data: Sequence[dict],
        transform: Compose | None = None,
        keys: Sequence[str] = PAIR_KEYS,
        cache_num_workers: int = 0,
    ) -> None:
        self.keys = tuple(keys)
        self.volumes = CacheDataset(
            list(data), transform or volume_transforms(keys), num_workers=cache_num_workers, progress=False
        )
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
        out["case"] = str(item.get("id", v))
        out["slice"] = z
        return out
