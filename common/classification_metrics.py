"""Binary classification metrics with honest uncertainty: ROC AUC, a seeded bootstrap CI, Youden threshold.

Why here and not MONAI: MONAI's ``compute_roc_auc`` gives the point estimate only. Reporting a diagnostic
comparison (e.g. PE from real vs generated CTPA vs X-ray) needs confidence intervals and an operating point
chosen on validation data, applied unchanged to the test data.

Conventions
- ``labels`` are 0/1 (1 = positive), ``scores`` are any real numbers, higher = more likely positive.
- AUC is the Mann-Whitney statistic: P(score_pos > score_neg) + 0.5 P(tie) (same as scikit-learn's).
- A case is called positive when ``score >= threshold``.
- Bootstrap: ``n_resamples`` resamples of the cases with replacement (seeded ``numpy`` Generator), percentile
  interval. Resamples that contain a single class have no AUC and are skipped (``n_valid`` says how many
  remained). The vectorised version and :func:`bootstrap_auc_naive` draw the same resamples for the same seed.
- :func:`bootstrap_mean_ci` is the same resampling (:func:`bootstrap_counts`) for the mean of per-case values;
  given per-case differences ``model - baseline`` it is the paired bootstrap of the reports' differences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from common.errors import InputError


@dataclasses.dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate with a bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    n_valid: int
    seed: int
    method: str = "percentile bootstrap"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_binary(labels, scores, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(labels int64, scores float64)`` 1D arrays; raise :class:`InputError` if bad."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise InputError(source, f"{y.size} labels but {s.size} scores")
    if y.size == 0:
        raise InputError(source, "no cases")
    if not np.all(np.isfinite(s)):
        raise InputError(source, f"{int(np.sum(~np.isfinite(s)))} scores are NaN or infinite")
    if not np.all(np.isin(y, (0, 1))):
        raise InputError(source, f"labels must be 0 or 1, got values {sorted(set(np.unique(y).tolist()))}")
    return y.astype(np.int64), s


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    y, s = check_binary(labels, scores)
    counts = np.ones((1, y.size))
    return float(_weighted_auc(counts, y, _group_index(s))[0])


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` with thresholds descending; the first threshold is +inf (nothing positive)."""
    y, s = check_binary(labels, scores)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(None, f"ROC needs both classes (positives={n_pos}, negatives={n_neg})")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s_sorted))[0], y.size - 1]
    tps = np.cumsum(y_sorted)[last_of_group]
    fps = (last_of_group + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thresholds = np.r_[np.inf, s_sorted[last_of_group]]
    return fpr, tpr, thresholds


def youden_threshold(labels, scores) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1 (highest one on ties)."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # skip +inf: it calls nothing positive
    return float(thresholds[best])


def metrics_at_threshold(labels, scores, threshold: float) -> dict:
    """Confusion counts, accuracy, sensitivity, specificity, PPV and NPV when ``score >= threshold`` is positive."""
    y, s = check_binary(labels, scores)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": (tp + tn) / y.size,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def bootstrap_ci(
    labels,
    scores,
    threshold: float | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk_size: int = 512,
) -> dict[str, ConfidenceInterval]:
    """Percentile bootstrap CIs of AUC (and accuracy/sensitivity/specificity when ``threshold`` is given).

    Vectorised: each resample is a row of case multiplicities; AUC of a weighted sample is computed from
    per-score-group positive/negative weights with one cumulative sum, so there is no per-resample sort.
    """
    y, s = check_binary(labels, scores)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    group = _group_index(s)
    pred = None if threshold is None else (s >= threshold)
    parts: dict[str, list[np.ndarray]] = {"auc": []}
    if pred is not None:
        parts.update(accuracy=[], sensitivity=[], specificity=[])
    for counts in bootstrap_counts(y.size, n_resamples, seed, chunk_size):
        parts["auc"].append(_weighted_auc(counts, y, group))
        if pred is not None:
            pos, neg = counts[:, y == 1].sum(1), counts[:, y == 0].sum(1)
            tp, tn = counts[:, (y == 1) & pred].sum(1), counts[:, (y == 0) & ~pred].sum(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                parts["accuracy"].append((tp + tn) / y.size)
                parts["sensitivity"].append(np.where(pos > 0, tp / pos, np.nan))
                parts["specificity"].append(np.where(neg > 0, tn / neg, np.nan))
    estimates = {"auc": roc_auc(y, s)}
    if pred is not None:
        at = metrics_at_threshold(y, s, threshold)
        estimates.update({k: at[k] for k in ("accuracy", "sensitivity", "specificity")})
    return {
        k: _percentile_ci(estimates[k], np.concatenate(v), confidence, n_resamples, seed)
        for k, v in parts.items()
    }


def bootstrap_auc_ci(labels, scores, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Percentile bootstrap CI of the AUC (vectorised); see :func:`bootstrap_ci`."""
    return bootstrap_ci(labels, scores, None, n_resamples, confidence, seed)["auc"]


def bootstrap_auc_naive(
    labels, scores, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> ConfidenceInterval:
    """The textbook loop (resample, recompute AUC) with the same random draws; a reference and a baseline."""
    y, s = check_binary(labels, scores)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_resamples):
        idx = rng.integers(0, y.size, size=y.size)
        yb, sb = y[idx], s[idx]
        pos, neg = sb[yb == 1], sb[yb == 0]
        if pos.size == 0 or neg.size == 0:
            aucs.append(np.nan)
            continue
        wins = sum(float(np.sum(p > neg)) + 0.5 * float(np.sum(p == neg)) for p in pos)
        aucs.append(wins / (pos.size * neg.size))
    return _percentile_ci(roc_auc(y, s), np.asarray(aucs), confidence, n_resamples, seed)


def bootstrap_mean_ci(
    values, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0, chunk_size: int = 512
) -> ConfidenceInterval:
    """Percentile bootstrap CI of the mean of per-case ``values`` (resampling cases with replacement).

    Paired use: ``values = model_i - baseline_i`` per case, so each resample keeps a case's two scores
    together. Non-finite values are dropped first (``n_valid`` of the result counts resamples, as above);
    no finite value gives NaN bounds.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if v.size == 0:
        return _percentile_ci(float("nan"), np.empty(0), confidence, n_resamples, seed)
    means = [counts @ v / v.size for counts in bootstrap_counts(v.size, n_resamples, seed, chunk_size)]
    return _percentile_ci(float(v.mean()), np.concatenate(means), confidence, n_resamples, seed)


def bootstrap_counts(n: int, n_resamples: int, seed: int, chunk_size: int = 512) -> Iterator[np.ndarray]:
    """Yield ``(chunk, n)`` float arrays of case multiplicities, one row per resample (seeded, chunked)."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        b = min(chunk_size, n_resamples - done)
        # one row at a time keeps the random stream identical to the naive loop's draws
        idx = np.stack([rng.integers(0, n, size=n) for _ in range(b)])
        flat = (np.arange(b)[:, None] * n + idx).reshape(-1)
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def _group_index(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, starts)``: the ascending sort of the cases and where each run of tied scores begins."""
    order = np.argsort(scores, kind="mergesort")
    starts = np.r_[0, np.nonzero(np.diff(scores[order]))[0] + 1]
    return order, starts


def _weighted_auc(counts: np.ndarray, labels: np.ndarray, group: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """AUC per row of case weights ``counts`` (B, n); NaN where a row lacks a class."""
    order, starts = group
    w = counts[:, order]
    y = labels[order]
    pos_w = np.add.reduceat(w * (y == 1), starts, axis=1)  # (B, groups): weight per tied score, ascending
    neg_w = np.add.reduceat(w * (y == 0), starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    wins = np.sum(pos_w * (neg_below + 0.5 * neg_w), axis=1)
    denom = pos_w.sum(1) * neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, wins / denom, np.nan)


def _percentile_ci(
    estimate: float, samples: np.ndarray, confidence: float, n_resamples: int, seed: int
) -> ConfidenceInterval:
    valid = samples[np.isfinite(samples)]
    if valid.size == 0:
        low = high = float("nan")
    else:
        alpha = (1.0 - confidence) / 2.0
        low, high = (float(v) for v in np.quantile(valid, [alpha, 1.0 - alpha]))
    return ConfidenceInterval(float(estimate), low, high, confidence, n_resamples, int(valid.size), seed)


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")
