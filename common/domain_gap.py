"""A domain-gap figure the intensity preparation cannot game (issue 22, item 3).

Histogram matching makes any intensity-distribution distance small by construction, so the statistics
here are ones a monotone intensity map barely moves or cannot move: image structure and anatomy geometry.
Per view, on the image the model sees ((S, S) in [0, 1]):

* ``spectral_slope``: slope of log radial power vs log spatial frequency (4 / S to 0.4 cycles per pixel):
  how fast detail falls off; a gain leaves it unchanged;
* ``gradient_cv``: coefficient of variation of the gradient magnitude (edges concentrated or spread); gain-free;
* ``fine_to_coarse``: energy of the Laplacian over energy of the gradient (texture fineness); gain-free;
* ``body_fraction``: the body's width over the image width (:func:`common.radiograph.body_extent`);
  geometry, which no intensity map changes.

:func:`drr_statistics` gives their range over the training DRRs (stored in the checkpoint record at
training); :func:`domain_gap` scores an input view against it: per statistic a z-score against the training
mean and spread, and a warning when the value is outside the training range widened by half of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from common.datalist import load_split
from common.radiograph import body_extent
from common.xray import load_xray

STATISTICS = ("spectral_slope", "gradient_cv", "fine_to_coarse", "body_fraction")


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """The :data:`STATISTICS` of one (H, W) image in [0, 1]."""

    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    centred = (img - img.mean()) * np.outer(np.hanning(h), np.hanning(w))  # no edge leakage
    power = np.abs(np.fft.fftshift(np.fft.fft2(centred))) ** 2
    fy, fx = np.meshgrid(np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing="ij")
    radius = np.hypot(fy, fx)
    edges = np.geomspace(4.0 / min(h, w), 0.4, 13)
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ring = (radius >= lo) & (radius < hi)
        if ring.any() and power[ring].mean() > 0:
            centres.append(np.sqrt(lo * hi))
            means.append(power[ring].mean())
    slope = float(np.polyfit(np.log(centres), np.log(means), 1)[0]) if len(centres) >= 3 else float("nan")
    gy, gx = np.gradient(img)
    grad = np.hypot(gy, gx)
    lap = np.gradient(gy, axis=0) + np.gradient(gx, axis=1)
    tiny = np.finfo(np.float64).tiny
    return {
        "spectral_slope": slope,
        "gradient_cv": float(grad.std() / max(grad.mean(), tiny)),
        "fine_to_coarse": float((lap**2).mean() / max((grad**2).mean(), tiny)),
        "body_fraction": float(body_extent(img)["width_px"] / w),
    }


def drr_statistics(datalist_file: str | os.PathLike, split: str = "training", max_cases: int = 200) -> dict | None:
    """Per view, ``{statistic: {"min", "max", "mean", "std"}}`` over a datalist's DRRs, plus ``n_cases``."""

    if not datalist_file or not os.path.isfile(datalist_file):
        return None
    items = load_split(datalist_file, split)[: int(max_cases)]
    out: dict = {}
    for view in ("pa", "lateral"):
        rows = [image_statistics(load_xray(i[view])[0]) for i in items if i.get(view)]
        if rows:
            out[view] = {k: _span([r[k] for r in rows]) for k in STATISTICS}
    return {**out, "n_cases": len(items)} if out else None


def _span(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "std": float(a.std())}


def domain_gap(views: np.ndarray, names: Sequence[str], reference: Mapping | None) -> dict:
    """Each view's statistics against the training DRRs' (``reference``: :func:`drr_statistics`).

    ``{"views": {view: {stat: {"value", "training_min", "training_max", "z", "in_range"}}}, "score": mean |z|
    over views and statistics, "warnings": [...]}``; z uses the training spread (at least 5 % of the mean's
    magnitude, so a one-case training set does not divide by zero). Without a reference: values only.
    """
    out: dict = {"views": {}, "score": None, "warnings": []}
    zs = []
    for i, view in enumerate(names):
        stats = image_statistics(views[i])
        ref = (reference or {}).get(view)
        block = {}
        for key, value in stats.items():
            entry: dict = {"value": value}
            if ref and key in ref:
                r = ref[key]
                spread = max(r["std"], 0.05 * abs(r["mean"]), 1e-6)
                half = 0.5 * (r["max"] - r["min"])
                z = (value - r["mean"]) / spread
                inside = bool(r["min"] - half - 1e-12 <= value <= r["max"] + half + 1e-12)
                entry.update(training_min=r["min"], training_max=r["max"], z=float(z), in_range=inside)
                zs.append(abs(z))
                if not inside:
                    out["warnings"].append(f"{view} {key} {value:.3g} outside the training DRRs' "
                                           f"{r['min']:.3g}..{r['max']:.3g}")  # fmt: skip
            block[key] = entry
        out["views"][view] = block
    if zs:
        out["score"] = float(np.mean(zs))
    elif reference is None:
        out["warnings"].append("the checkpoint records no training DRR statistics: no range to compare with")
    return out
