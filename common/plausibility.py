"""Is a generated chest CT an adult chest? Published adult ranges, not the training set's (issue 22, item 4).

On the HU volume (canonical RAS): the body is everything above -500 HU (its largest connected part); the
lungs, the air (< -400 HU) inside it (outside air and the trachea above the lungs' top are mostly excluded by
keeping the two largest air components inside the body); the heart, soft tissue (0 to 100 HU... any
-100..300 HU) between the lungs below the carina level, approximated by the mediastinal band of the axial
slice where the lungs are widest. Measures and the adult ranges they are checked against:

* ``lung_volume_l``: 2.5-8.5 L (total lung capacity of adults ~4-8 L, a CT at full inspiration near it;
  ATS/ERS reference values, Stocks & Quanjer 1995; functional residual capacity ~2.5-3.5 L at rest);
* ``body_width_mm`` 250-450 and ``body_depth_mm`` 160-350 at the lungs' widest slice (ANSUR II chest
  breadth and depth, Gordon et al. 2014, with clothing-free CT margins);
* ``cardiothoracic_ratio``: widest heart / widest internal thorax on that slice, 0.35-0.55 (normal < 0.5 on
  PA films, Danzer 1919; CT axial ratios run slightly higher);
* ``heart_offset_mm``: the heart band's centre left of the midline (positive = patient's left), 0-80 mm
  (levocardia: about two thirds of the heart lies left of the midline).

A volume that does not show a body, two lungs or a heart gets ``None`` for what cannot be measured and a
warning; each measure outside its range gets a warning.
"""

from __future__ import annotations

import numpy as np

from common.volume import Volume

RANGES = {
    "lung_volume_l": (2.5, 8.5),
    "body_width_mm": (250.0, 450.0),
    "body_depth_mm": (160.0, 350.0),
    "cardiothoracic_ratio": (0.35, 0.55),
    "heart_offset_mm": (0.0, 80.0),
}
SOURCES = {
    "lung_volume_l": "adult total lung capacity ~4-8 L (ATS/ERS, Stocks & Quanjer 1995), widened for inspiration depth",
    "body_width_mm": "adult chest breadth (ANSUR II, Gordon et al. 2014), widened",
    "body_depth_mm": "adult chest depth (ANSUR II, Gordon et al. 2014), widened",
    "cardiothoracic_ratio": "normal CTR < 0.5 on PA films (Danzer 1919); axial CT slightly higher",
    "heart_offset_mm": "levocardia: about two thirds of the heart left of the midline",
}


def _largest(mask: np.ndarray, n: int = 1) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:n] + 1
    return np.isin(labels, keep)


def _run(line: np.ndarray) -> tuple[int, int] | None:
    idx = np.flatnonzero(line)
    return (int(idx[0]), int(idx[-1])) if idx.size else None


def plausibility(volume: Volume) -> dict:
    """``{"measures": {name: value or None}, "ranges", "sources", "in_range": {name: bool}, "warnings"}``."""
    from scipy import ndimage

    vol = volume.to_canonical()
    hu = np.asarray(vol.array, dtype=np.float32)
    sx, sy, sz = (float(s) for s in vol.spacing)
    measures: dict = dict.fromkeys(RANGES)
    warnings: list[str] = []
    body = _largest(hu > -500)
    for k in range(body.shape[2]):  # per axial slice: lungs reaching the volume's top or bottom stay holes
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    if not body.any():
        warnings.append("no body found (nothing above -500 HU)")
    else:
        lungs = _largest((hu < -400) & body, 2)
        voxel_l = sx * sy * sz / 1e6
        measures["lung_volume_l"] = float(lungs.sum() * voxel_l) if lungs.any() else None
        widths = lungs.any(axis=1).sum(axis=0)  # per z: lung width in voxels along x
        z = int(np.argmax(widths)) if lungs.any() else int(np.argmax(body.sum(axis=(0, 1))))
        x_run, y_run = _run(body[:, :, z].any(axis=1)), _run(body[:, :, z].any(axis=0))
        if x_run and y_run:
            measures["body_width_mm"] = float((x_run[1] - x_run[0] + 1) * sx)
            measures["body_depth_mm"] = float((y_run[1] - y_run[0] + 1) * sy)
        lung_x = _run(lungs[:, :, z].any(axis=1)) if lungs.any() else None
        if lung_x is None:
            warnings.append("no lungs found (no air inside the body)")
        else:
            # heart: the columns of the lungs' anterior half with no lung and at least 2 cm of soft tissue
            y_lungs = _run(lungs[:, :, z].any(axis=0))
            front = slice((y_lungs[0] + y_lungs[1]) // 2, y_lungs[1] + 1)
            soft = (hu[:, front, z] > -100) & (hu[:, front, z] < 300)
            heart_cols = ~lungs[:, front, z].any(axis=1) & (soft.sum(axis=1) * sy >= 20.0)
            heart_cols[: lung_x[0]] = False
            heart_cols[lung_x[1] + 1 :] = False
            heart_x = _run(heart_cols)
            thorax = (lung_x[1] - lung_x[0] + 1) * sx
            if heart_x is None:
                warnings.append("no heart found between the lungs")
            else:
                measures["cardiothoracic_ratio"] = float((heart_x[1] - heart_x[0] + 1) * sx / thorax)
                centre_x = (vol.shape[0] - 1) / 2.0
                # canonical RAS: x increases to the patient's right; left of the midline is negative x
                measures["heart_offset_mm"] = float((centre_x - (heart_x[0] + heart_x[1]) / 2.0) * sx)
    in_range = {}
    for key, (low, high) in RANGES.items():
        value = measures[key]
        in_range[key] = None if value is None else bool(low <= value <= high)
        if value is not None and not in_range[key]:
            warnings.append(f"{key} {value:.3g} outside the adult range {low:g}-{high:g}")
    return {"measures": measures, "ranges": {k: list(v) for k, v in RANGES.items()}, "sources": SOURCES,
            "in_range": in_range, "warnings": warnings}  # fmt: skip
