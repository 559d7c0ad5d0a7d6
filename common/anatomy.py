"""Anatomy metrics of a predicted CT: did the model draw the body, the lungs and the heart where they are?

PSNR cannot tell a model that drew the body outline from one that drew the lungs and heart (most of a chest
CT's PSNR headroom is the outline), so every X-ray -> CT report also scores the anatomy, per case:

``body_dice``
    Dice of the body masks. Body = HU > :data:`BODY_HU` (-500: halfway between air, -1000, and soft tissue,
    0, i.e. the 50 % partial-volume edge), largest 3D connected component (drops the table, noise, stray
    voxels), holes filled per axial slice (the lungs and airways are enclosed by the chest wall in every
    axial slice, not in 3D, where a cropped chest opens at the top and bottom faces).
``lung_dice``, ``lung_volume_error_ml``, ``lung_volume_error_pct``
    Lung = HU < :data:`LUNG_HU` (-400: halfway between aerated lung, about -850 to -700, and soft tissue,
    about 0 to 50) inside the filled body (so air outside the body never counts); includes the airways.
    The volume error is ``|V_pred - V_true|`` in mL (1 mL = 1000 mm^3) and in % of ``V_true``.
``heart_dice``, ``heart_centroid_error_mm`` (only where the case has a label map)
    The true heart is the label map's :data:`ANATOMY_LABELS` ``heart``. A predicted CT has no labels, so its
    heart is segmented by a rule (:func:`heart_mask`): voxels of ``HEART_HU`` (20 to 700 HU: myocardium and
    blood with or without contrast; above fat, below cortical bone) inside the body that have lung on both
    sides along the right-left axis in their row (the mediastinum) and lie anterior to the lungs' centre,
    opened by ``HEART_OPENING_MM`` (5 mm: cuts thin bridges to the chest wall and liver), largest 3D
    component. It also catches the great vessels, mediastinal muscle and the liver dome, so even the true CT
    does not reach Dice 1 (the example chest CT, LIDC-IDRI-0001, against its TotalSegmentator heart: Dice
    0.71 and centroid 16 mm apart at 2.8 x 2.8 x 5 mm, 0.62 and 28 mm at 4.9 x 4.9 x 5 mm): compare model
    and baselines, which go through the same rule. The centroid error is the distance in mm between the two masks' centres of mass.

Where a case has a label map (datalist key ``label``: a NIfTI on the same grid as ``ct``, values
:data:`ANATOMY_LABELS`), the true body and lungs come from it (``label > 0``, ``label == 2``) instead of
the HU rules; a prediction is always segmented by the HU rules. Label maps are resampled to the prediction's
grid with nearest-neighbour interpolation (cascade stages are smaller than the CT).

Volumes are (X, Y, Z) canonical RAS arrays in HU (:class:`common.volume.Volume` convention); ``spacing``
is the voxel size in mm. An empty true mask gives NaN for the metrics that divide by it (written as null).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from common.errors import InputError
from common.io import load_volume

# Label-map convention shared with data_prep's cohort (datalist key "label", aligned with "ct").
ANATOMY_LABELS: dict[str, int] = {"outside": 0, "body": 1, "lung": 2, "heart": 3, "bone": 4}

BODY_HU = -500.0
LUNG_HU = -400.0
HEART_HU = (20.0, 700.0)
HEART_OPENING_MM = 5.0

ANATOMY_CONVENTIONS = {
    "anatomy": {
        "labels": ANATOMY_LABELS,
        "body": f"HU > {BODY_HU:g}, largest 3D connected component, holes filled per axial slice "
        "(label map: label > 0)",
        "lung": f"HU < {LUNG_HU:g} inside the filled body (label map: label == {ANATOMY_LABELS['lung']})",
        "heart": f"label map: label == {ANATOMY_LABELS['heart']}; prediction: {HEART_HU[0]:g}..{HEART_HU[1]:g} HU "
        "inside the body with lung on both sides along right-left and anterior to the lungs' centre, opened by "
        f"{HEART_OPENING_MM:g} mm, largest 3D component (also catches great vessels: the true CT does not score 1)",
        "volume_error": "|V_pred - V_true| in mL and in % of V_true",
        "keys": [
            "body_dice",
            "lung_dice",
            "lung_volume_error_ml",
            "lung_volume_error_pct",
            "heart_dice",
            "heart_centroid_error_mm",
        ],
    }
}


# ----------------------------------------------------------------------------------------------- masks
def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.reshape(-1))[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: HU > -500, largest component, holes filled per axial (Z) slice."""
    body = _largest_component(np.asarray(hu) > BODY_HU)
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return body


def lung_mask(hu: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """(X, Y, Z) bool: HU < -400 inside ``body`` (default :func:`body_mask` of ``hu``)."""
    hu = np.asarray(hu)
    return (body_mask(hu) if body is None else body) & (hu < LUNG_HU)


def heart_mask(
    hu: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    body: np.ndarray | None = None,
    lung: np.ndarray | None = None,
) -> np.ndarray:
    """(X, Y, Z) bool: the rule-based heart of a CT without labels (module docstring); ``spacing`` in mm."""
    hu = np.asarray(hu)
    body = body_mask(hu) if body is None else body
    lung = lung_mask(hu, body) if lung is None else lung
    if not lung.any():
        return np.zeros_like(body)
    # lung on both sides along X (right-left) in the same (Y, Z) row: the mediastinum
    between = np.maximum.accumulate(lung, axis=0) & np.maximum.accumulate(lung[::-1], axis=0)[::-1] & ~lung
    anterior = np.arange(hu.shape[1])[None, :, None] > np.argwhere(lung)[:, 1].mean()  # RAS: +Y anterior
    soft = body & between & anterior & (hu >= HEART_HU[0]) & (hu <= HEART_HU[1])
    iterations = max(1, int(round(HEART_OPENING_MM / float(np.mean(np.asarray(spacing, dtype=float)[:2])))))
    soft = ndimage.binary_opening(soft, iterations=iterations)
    return _largest_component(soft) if soft.any() else soft


# ----------------------------------------------------------------------------------------------- scores
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); NaN when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


def centroid_mm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Centre of mass (3,) in mm from voxel (0, 0, 0); NaN for an empty mask."""
    idx = np.argwhere(np.asarray(mask, bool))
    if idx.size == 0:
        return np.full(3, np.nan)
    return idx.mean(axis=0) * np.asarray(spacing, dtype=np.float64)


def anatomy_metrics(
    pred_hu: np.ndarray,
    target_hu: np.ndarray,
    spacing: Sequence[float],
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """The module's per-case metrics of (X, Y, Z) HU arrays; ``labels`` an optional aligned label map."""
    pred_hu, target_hu = np.asarray(pred_hu, np.float32), np.asarray(target_hu, np.float32)
    if pred_hu.shape != target_hu.shape or pred_hu.ndim != 3:
        raise ValueError(f"need two (X, Y, Z) volumes of one shape, got {pred_hu.shape} and {target_hu.shape}")
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    p_body = body_mask(pred_hu)
    p_lung = lung_mask(pred_hu, p_body)
    if labels is None:
        t_body = body_mask(target_hu)
        t_lung = lung_mask(target_hu, t_body)
    else:
        t_body = labels > ANATOMY_LABELS["outside"]
        t_lung = labels == ANATOMY_LABELS["lung"]
    v_pred, v_true = float(p_lung.sum()) * voxel_ml, float(t_lung.sum()) * voxel_ml
    out = {
        "body_dice": dice(p_body, t_body),
        "lung_dice": dice(p_lung, t_lung),
        "lung_volume_error_ml": abs(v_pred - v_true),
        "lung_volume_error_pct": 100.0 * abs(v_pred - v_true) / v_true if v_true > 0 else float("nan"),
    }
    if labels is not None:
        t_heart = labels == ANATOMY_LABELS["heart"]
        p_heart = heart_mask(pred_hu, spacing, p_body, p_lung)
        out["heart_dice"] = dice(p_heart, t_heart)
        out["heart_centroid_error_mm"] = float(
            np.linalg.norm(centroid_mm(p_heart, spacing) - centroid_mm(t_heart, spacing))
        )
    return out


# ----------------------------------------------------------------------------------------------- label maps
def load_label_map(path: str | os.PathLike, shape: Sequence[int] | None = None) -> np.ndarray:
    """A label map file -> (X, Y, Z) int16 canonical RAS, resampled (nearest) to ``shape`` when given.

    Raises :class:`InputError` naming the file for a non-3D map or values outside :data:`ANATOMY_LABELS`.
    """

    path = os.fspath(path)
    vol = load_volume(path).to_canonical().validate(path)
    array = np.asarray(vol.array)
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        raise InputError(path, "label map values must be integers")
    array = array.astype(np.int16)
    bad = sorted(set(np.unique(array).tolist()) - set(ANATOMY_LABELS.values()))
    if bad:
        raise InputError(path, f"label map has values {bad[:5]} outside the anatomy labels {ANATOMY_LABELS}")
    if shape is not None and tuple(array.shape) != tuple(int(s) for s in shape):
        t = torch.from_numpy(array.astype(np.float32))[None, None]
        size = tuple(int(s) for s in shape)
        array = torch.nn.functional.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy().astype(np.int16)
    return array


class AnatomyMetrics:
    """Per-case metric object for :class:`common.handlers.MetricsReport`: :func:`anatomy_metrics`.

    Called ``metric(pred_hu (C, X, Y, Z), target_hu, context)``; the case's label map is
    ``context["item"][label_key]`` when that is a file path (a PE class or a loaded CT under the same key
    is ignored). Voxel size: ``spacing`` (mm) or, for outputs whose size varies (cascade stages),
    ``fov_mm / shape``.
    """

    def __init__(
        self,
        spacing: Sequence[float] | None = None,
        fov_mm: Sequence[float] | None = None,
        label_key: str = "label",
        cache_size: int = 8,
    ):
        if (spacing is None) == (fov_mm is None):
            raise ValueError("give exactly one of spacing and fov_mm")
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.fov_mm = None if fov_mm is None else tuple(float(f) for f in fov_mm)
        self.label_key = label_key
        self.conventions = ANATOMY_CONVENTIONS
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = int(cache_size)

    def _labels(self, item: Mapping | None, shape: tuple[int, ...]) -> np.ndarray | None:
        path = (item or {}).get(self.label_key)
        if isinstance(path, (list, tuple)) and len(path) == 1:
            path = path[0]
        if not isinstance(path, (str, os.PathLike)) or not os.path.splitext(os.fspath(path))[1]:
            return None
        key = (os.fspath(path), shape)
        if key not in self._cache:
            self._cache[key] = load_label_map(path, shape)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._cache[key]

    def __call__(self, pred_hu, target_hu, context: Mapping | None = None) -> dict[str, float]:
        pred = torch.as_tensor(pred_hu).as_subclass(torch.Tensor).detach().float().cpu()
        target = torch.as_tensor(target_hu).as_subclass(torch.Tensor).detach().float().cpu()
        pred, target = pred.reshape(-1, *pred.shape[-3:])[0].numpy(), target.reshape(-1, *target.shape[-3:])[0].numpy()
        spacing = self.spacing or tuple(f / n for f, n in zip(self.fov_mm, pred.shape))
        labels = self._labels((context or {}).get("item"), tuple(pred.shape))
        return anatomy_metrics(pred, target, spacing, labels)
