"""common.classification_metrics: hand-computed AUC/ROC/Youden/confusion values and the bootstrap CI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.classification_metrics import (
    bootstrap_auc_ci,
    bootstrap_auc_naive,
    bootstrap_ci,
    metrics_at_threshold,
    roc_auc,
    roc_curve,
    youden_threshold,
)
from common.errors import InputError

LABELS = [0, 0, 1, 1, 0, 1]
SCORES = [0.1, 0.4, 0.35, 0.8, 0.5, 0.5]


def test_auc_hand_computed_with_tie():
    # positives 0.35, 0.8, 0.5 against negatives 0.1, 0.4, 0.5: wins 1 + 3 + 2 and one tie (0.5) -> 6.5 / 9
    assert roc_auc(LABELS, SCORES) == pytest.approx(6.5 / 9)


def test_roc_curve_hand_computed():
    fpr, tpr, thr = roc_curve(LABELS, SCORES)
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.5, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 2 / 3, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(6.5 / 9)  # the curve's area is the rank AUC


def test_youden_threshold_and_metrics_at_it():
    y = [0, 0, 0, 0, 1, 1]
    s = [0.1, 0.2, 0.3, 0.6, 0.5, 0.9]
    # J: 0.9 -> 0.5, 0.6 -> 0.25, 0.5 -> 0.75 (best), 0.3 -> 0.5
    assert youden_threshold(y, s) == pytest.approx(0.5)
    m = metrics_at_threshold(y, s, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 3, 0)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == 1.0


def test_bootstrap_matches_hand_loop_and_naive_version():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 25)
    s = np.round(rng.normal(size=25) + y, 1)  # rounding makes ties
    n_resamples, seed = 300, 11
    draws = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_resamples):
        idx = draws.integers(0, y.size, size=y.size)
        if 0 < y[idx].sum() < y.size:
            aucs.append(roc_auc(y[idx], s[idx]))
    low, high = np.quantile(aucs, [0.025, 0.975])
    fast = bootstrap_auc_ci(y, s, n_resamples, 0.95, seed)
    naive = bootstrap_auc_naive(y, s, n_resamples, 0.95, seed)
    for ci in (fast, naive):
        assert ci.low == pytest.approx(low) and ci.high == pytest.approx(high)
        assert ci.n_valid == len(aucs) and ci.estimate == pytest.approx(roc_auc(y, s))
    assert fast.low < fast.estimate < fast.high


def test_bootstrap_threshold_metrics_and_seeding():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = rng.normal(size=60) + 1.5 * y
    a = bootstrap_ci(y, s, threshold=0.7, n_resamples=200, seed=5)
    b = bootstrap_ci(y, s, threshold=0.7, n_resamples=200, seed=5)
    c = bootstrap_ci(y, s, threshold=0.7, n_resamples=200, seed=6)
    assert a == b and a["auc"] != c["auc"]
    at = metrics_at_threshold(y, s, 0.7)
    for key in ("accuracy", "sensitivity", "specificity"):
        assert a[key].estimate == pytest.approx(at[key])
        assert a[key].low <= a[key].estimate <= a[key].high


def test_perfect_inverted_and_random_scorers():
    y = np.r_[np.zeros(200), np.ones(200)].astype(int)
    assert roc_auc(y, y * 2.0 + 1.0) == 1.0
    assert roc_auc(y, -y) == 0.0
    random_scores = np.random.default_rng(42).random(y.size)
    # Hanley-McNeil null standard deviation of the AUC for 200 vs 200 cases: ~0.029; allow 3 sigma
    sd = math.sqrt((200 + 200 + 1) / (12 * 200 * 200))
    assert abs(roc_auc(y, random_scores) - 0.5) < 3 * sd
    ci = bootstrap_auc_ci(y, random_scores, 500, seed=1)
    assert ci.low < 0.5 < ci.high


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(InputError, match="labels but"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(InputError, match="0 or 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(InputError, match="both classes"):
        roc_curve([1, 1], [0.1, 0.2])
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))
