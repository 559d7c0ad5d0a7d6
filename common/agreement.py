"""Agreement of a generated CT with its radiographs scored against a fixed reference (issue 22, item 5).

DRR consistency against the *prepared* inputs changes whenever the preparation does (histogram matching
alone moves its L1 and PSNR). Here the reference is fixed: the radiograph after geometric alignment only
(:func:`common.radiograph.prepare_view`'s scale and centring; no intensity matching), and the measure is
Spearman's rank correlation between the CT's DRR and it, which no strictly monotone intensity map of either
image changes (a film's detector processing, window or LUT; our quantile matching). The mean training CT,
which ignores the radiographs, is scored the same way beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MEASURE = "spearman_rank_correlation"
CONVENTION = (
    "agreement: Spearman rank correlation in [-1, 1] between each view's DRR of the generated CT and the "
    "radiograph after geometric alignment only (scale, crop, centring; no intensity matching): invariant to any "
    "strictly monotone intensity map, so it does not move with the intensity preparation; 'mean_ct' scores the "
    "mean training CT (which ignores the radiographs) the same way"
)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two same-shape images (average ranks for ties); nan when either is constant."""
    from scipy.stats import rankdata

    x = rankdata(np.asarray(a, dtype=np.float64).ravel())
    y = rankdata(np.asarray(b, dtype=np.float64).ravel())
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {np.shape(a)} vs {np.shape(b)}")
    x, y = x - x.mean(), y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def agreement_scores(drrs: Mapping[str, np.ndarray], aligned: np.ndarray, views: Sequence[str]) -> dict:
    """``{view: rho, "mean": mean over views}`` of DRRs (view -> (S, S)) against aligned views (V, S, S)."""
    out = {view: rank_correlation(drrs[view], aligned[i]) for i, view in enumerate(views) if view in drrs}
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out
