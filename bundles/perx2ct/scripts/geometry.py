"""Where each decoded CT slice's feature points lie, and where they land in the PA and lateral X-rays.

PerX2CT decodes a CT slice from a coarse (F x F) grid of 3D points; each point gathers the 2D encoder
features at its perspective projection in both radiographs. Two cameras are provided:

* ``drr`` (default, for models trained here): ``common.drr.DRRGeometry.project_points``, the camera that
  rendered the training DRRs, so a point samples exactly the detector pixel whose ray passes through it
  (``grid_sample(align_corners=False)``; no view flips or transposes are needed).
* ``perx2ct``: the released model's own pi-GAN style camera (github.com/dek924/PerX2CT,
  ``x2ct_nerf/modules/inr/model.py``): world = the CT as a unit cube centred on 0, a pinhole at radius 1
  on +y (PA, pose (0, 0)) or +z (lateral, pose (pi/2, pi/2)) looking at the origin, fov 60 degrees,
  ``grid_sample(align_corners=True)``. Its views are the stored radiographs flipped: PA ``fliplr``,
  lateral transposed then ``flipud`` (:func:`perx2ct_view_orientation`). Used only to run the official
  checkpoint (``configs/perx2ct_official.json``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from common.drr import DRRGeometry, detector_geometry

VIEWS = ("pa", "lateral")
AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}
CAMERAS = ("drr", "perx2ct")
# (pitch, yaw) of the released model's two cameras (its data loader's ``mapping_camera_type2pose``)
PERX2CT_POSES = {"pa": (0.0, 0.0), "lateral": (math.pi / 2, math.pi / 2)}


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
    geom = detector_geometry(geometry, size)  # the network passes its camera, already at its input size
    vox = slice_points_vox(volume_size, feature_res, axis)
    mm = vox_to_mm(vox, volume_size, spacing)
    out = {view: pixel_to_grid(geom.project_points(mm, view), size).float() for view in VIEWS}
    out["unit"] = vox_to_unit(vox, volume_size).float()
    return out


def perx2ct_world_to_camera(pitch: float, yaw: float) -> torch.Tensor:
    """(4, 4) float32 world->camera matrix of the released model's camera at pose (pitch, yaw), radius 1.

    The same float32 operations as the original: a point on the unit sphere (pitch clamped to
    [1e-5, pi - 1e-5], x = 0 replaced by 1e-5), a look-at frame towards the origin with world +y up,
    then the inverse of the camera->world matrix.
    """
    phi = torch.clamp(torch.tensor([float(pitch)], dtype=torch.float32), 1e-5, math.pi - 1e-5)
    theta = torch.tensor([float(yaw)], dtype=torch.float32)
    origin = torch.stack(
        [torch.sin(phi) * torch.cos(theta), torch.cos(phi), torch.sin(phi) * torch.sin(theta)], -1
    )
    origin[:, 0][origin[:, 0] == 0] = 1e-5
    forward = -origin / torch.norm(-origin, dim=-1, keepdim=True)
    up = torch.tensor([[0.0, 1.0, 0.0]])
    left = torch.cross(up, forward, dim=-1)
    left = left / torch.norm(left, dim=-1, keepdim=True)
    up = torch.cross(forward, left, dim=-1)
    up = up / torch.norm(up, dim=-1, keepdim=True)
    rotation = torch.eye(4).unsqueeze(0)
    rotation[:, :3, :3] = torch.stack((-left, up, -forward), dim=-1)
    translation = torch.eye(4).unsqueeze(0)
    translation[:, :3, 3] = origin
    return torch.inverse(translation @ rotation)[0]


def perx2ct_project(points_unit: torch.Tensor, view: str, fov_deg: float = 60.0) -> torch.Tensor:
    """Unit-cube world points (..., 3) -> ``grid_sample`` (x, y) in [-1, 1] (align_corners=True) in ``view``.

    Pinhole projection ``uv = -xy_cam / z_cam`` scaled by ``1 / tan(fov / 2)``, y flipped (row 0 at +y).
    """
    world_to_cam = perx2ct_world_to_camera(*PERX2CT_POSES[view])
    pts = points_unit.to(torch.float32).reshape(1, -1, 3)
    pts = torch.cat((pts, torch.ones_like(pts[..., :1])), dim=-1)
    cam = torch.bmm(world_to_cam[None], pts.permute(0, 2, 1)).permute(0, 2, 1)
    uv = -cam[..., :2] / cam[..., 2:3]
    xy = uv / np.tan((2 * math.pi * float(fov_deg) / 360) / 2)
    grid = torch.cat([xy[..., 0:1], -xy[..., 1:2]], -1)
    return grid.reshape(*points_unit.shape[:-1], 2)


def perx2ct_camera_grids(
    volume_size: int, feature_res: int, axis: int, fov_deg: float = 60.0
) -> dict[str, torch.Tensor]:
    """The released model's grids (N, F, F, 2) per view for every slice along ``axis``, plus unit coords.

    Volume indices are the original's array axes (D0, D1, D2) = (axial slice, row, column) of its CT.
    """
    unit = vox_to_unit(slice_points_vox(volume_size, feature_res, axis), volume_size).float()
    out = {view: perx2ct_project(unit, view, fov_deg) for view in VIEWS}
    out["unit"] = unit
    return out


def perx2ct_view_orientation(image: np.ndarray | torch.Tensor, view: str):
    """A stored radiograph (rows, cols) -> the orientation the released model's camera expects.

    PA: left-right flip; lateral: transpose, then up-down flip (its data loader's
    ``apply_preprocessing_xray_according2cam``). Works on the last two axes.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if isinstance(image, torch.Tensor):
        return image.flip(-1) if view == "pa" else image.transpose(-1, -2).flip(-2)
    out = np.flip(image, -1) if view == "pa" else np.flip(np.swapaxes(image, -1, -2), -2)
    return np.ascontiguousarray(out)


def perx2ct_to_ras(volume: np.ndarray | torch.Tensor):
    """The released model's CT array (D0, D1, D2) -> canonical RAS (X, Y, Z) (works on the last 3 axes).

    Its preprocessing keeps the DICOM layout of LIDC-IDRI: D0 = slices in InstanceNumber order (superior ->
    inferior in LIDC-IDRI, e.g. LIDC-IDRI-0001: instance 1 at z = -10 mm, 133 at z = -340 mm),
    D1 = image rows (anterior -> posterior), D2 = columns (patient right -> left). RAS reverses all three:
    X = reversed D2, Y = reversed D1, Z = reversed D0.
    """
    if isinstance(volume, torch.Tensor):
        return volume.flip(-1, -2, -3).permute(*range(volume.ndim - 3), -1, -2, -3)
    return np.ascontiguousarray(np.flip(volume, (-1, -2, -3)).swapaxes(-1, -3))


def ras_to_perx2ct(volume: np.ndarray | torch.Tensor):
    """Inverse of :func:`perx2ct_to_ras` (the map is its own inverse)."""
    return perx2ct_to_ras(volume)
