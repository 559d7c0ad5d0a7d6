"""Where each decoded CT slice's feature points lie, and where they land in the PA and lateral X-rays.

PerX2CT decodes a CT slice from a coarse (F x F) grid of 3D points; each point gathers the 2D encoder
features at its perspective projection in both radiographs. The projection itself is
``common.drr.DRRGeometry.project_points``: the same camera that rendered the training DRRs, so a point
samples exactly the detector pixel whose ray passes through it (no view flips or transposes are needed,
unlike the original repository's camera model, which flips PA left-right and transposes+flips the lateral).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.drr import DRRGeometry, get_geometry

VIEWS = ("pa", "lateral")
AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


def feature_point_indices(volume_size: int, feature_res: int) -> torch.Tensor:
    """Voxel indices (F,) at the centres of the F blocks of ``volume_size / F`` voxels (PerX2CT's offset)."""
    if volume_size % feature_res:
        raise ValueError(f"volume_size {volume_size} must be a multiple of feature_res {feature_res}")
    step = volume_size // feature_res
    return torch.arange(feature_res, dtype=torch.float64) * step + (step - 1) / 2.0


def slice_points_vox(volume_size: int, feature_res: int, axis: int) -> torch.Tensor:
    """Voxel coordinates (N, F, F, 3) of the feature points of every slice along ``axis``.

    Dim 0 is the slice index; dims 1, 2 run along the remaining array axes in increasing order, which is
    also the layout of the decoded (N, N) slice.
    """
    n = volume_size
    coarse = feature_point_indices(n, feature_res)
    full = torch.arange(n, dtype=torch.float64)
    grids = [coarse, coarse, coarse]
    grids[axis] = full
    mesh = torch.stack(torch.meshgrid(*grids, indexing="ij"), dim=-1)  # (.., .., .., 3) in X, Y, Z order
    return mesh.movedim(axis, 0).contiguous()


def vox_to_mm(points_vox: torch.Tensor, volume_size: int, spacing: Sequence[float]) -> torch.Tensor:
    """Voxel index -> RAS mm with the volume centre (the DRR isocenter) at 0."""
    spacing_t = torch.as_tensor([float(s) for s in spacing], dtype=points_vox.dtype)
    return (points_vox - (volume_size - 1) / 2.0) * spacing_t


def vox_to_unit(points_vox: torch.Tensor, volume_size: int) -> torch.Tensor:
    """Voxel index -> PerX2CT's normalised world coordinate ``(i - (N-1)/2) / N`` in [-0.5, 0.5]."""
    return (points_vox - (volume_size - 1) / 2.0) / volume_size


def pixel_to_grid(rc: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Detector (row, col) pixel coords -> ``grid_sample`` (x, y) for ``align_corners=False``.

    Pixel centres are at integer (row, col); with ``align_corners=False`` -1/+1 are the image borders, so
    the same normalised coordinate addresses the same physical spot in the image and in any feature map
    computed from it, whatever its stride.
    """
    h, w = int(image_size[0]), int(image_size[1])
    x = (rc[..., 1] + 0.5) / w * 2.0 - 1.0
    y = (rc[..., 0] + 0.5) / h * 2.0 - 1.0
    return torch.stack((x, y), dim=-1)


def projection_grids(
    volume_size: int,
    feature_res: int,
    spacing: Sequence[float],
    geometry: str | dict | DRRGeometry,
    image_size: int | Sequence[int],
    axis: int,
) -> dict[str, torch.Tensor]:
    """``grid_sample`` grids (N, F, F, 2) per view for every slice along ``axis``, plus unit coords (N, F, F, 3)."""
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(image_size)
    geom = get_geometry(geometry).resized(size)
    vox = slice_points_vox(volume_size, feature_res, axis)
    mm = vox_to_mm(vox, volume_size, spacing)
    out = {view: pixel_to_grid(geom.project_points(mm, view), size).float() for view in VIEWS}
    out["unit"] = vox_to_unit(vox, volume_size).float()
    return out
