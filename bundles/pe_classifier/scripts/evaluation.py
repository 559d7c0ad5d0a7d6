"""The PE evaluation report: AUC with a bootstrap CI, a validation-chosen operating point, ROC PNG, CSV.

Protocol (the same for real CTPA, generated CTPA, X-ray and fusion, so their numbers compare):
the threshold is chosen by Youden's J on the *validation* predictions and applied unchanged to the test
predictions; CIs are seeded percentile bootstraps over test cases (:mod:`common.classification_metrics`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os

import numpy as np

from bundles.pe_classifier.scripts.collect import PredictionCollector
from bundles.pe_classifier.scripts.roc_plot import save_roc_png
from common.atomic import atomic_write_text
from common.classification_metrics import bootstrap_ci, metrics_at_threshold, roc_curve, youden_threshold
from common.errors import InputError

FALLBACK_THRESHOLD = 0.5
SOURCE_NAMES = {
    "real": "real CTPA",
    "generated": "generated CTPA",
    "xray": "X-ray",
    "fusion": "X-ray + CTPA",
    "fusion_generated": "X-ray + generated CTPA",
}
logger = logging.getLogger(__name__)


def source_name(modality: str, generated_dir: str | None = None) -> str:
    """The report's ``source`` key: what the classifier looked at."""
    if modality == "xray":
        return "xray"
    if modality == "fusion":
        return "fusion_generated" if generated_dir else "fusion"
    return "generated" if generated_dir else "real"


def threshold_from_report(report_path: str | None, default: float = FALLBACK_THRESHOLD) -> float:
    """The operating threshold stored in a ``metrics_report.json`` (``default`` when no path is given)."""
    if not report_path:
        return default
    if os.path.isdir(report_path):
        report_path = os.path.join(report_path, "metrics_report.json")
    if not os.path.isfile(report_path):
        raise InputError(report_path, "metrics report not found")
    with open(report_path) as f:
        return float(json.load(f)["threshold"]["value"])


def choose_threshold(validation: PredictionCollector | None) -> dict:
    """Youden's J on validation predictions; 0.5 (stated) when validation lacks a class or is missing."""
    if validation is not None and validation.has_labels:
        _, y, p = validation.arrays()
        if 0 < y.sum() < y.size:
            return {
                "value": youden_threshold(y, p),
                "method": "youden_j_on_validation",
                "n_validation": int(y.size),
            }
    n = 0 if validation is None else len(validation.ids)
    return {"value": FALLBACK_THRESHOLD, "method": "fixed_0.5 (validation lacks a class)", "n_validation": n}


def write_pe_report(
    test: PredictionCollector,
    validation: PredictionCollector | None,
    output_dir: str,
    source: str = "real",
    modality: str = "ct",
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    checkpoint: str | None = None,
) -> dict:
    """Write ``metrics_report.json``, ``predictions.csv`` and ``roc_curve.png`` under ``output_dir``."""
    ids, y, p = test.arrays()
    if not ids:
        raise InputError(output_dir, "evaluation produced no predictions")
    if not test.has_labels:
        raise InputError(output_dir, "evaluation cases need 0/1 labels")
    os.makedirs(output_dir, exist_ok=True)
    threshold = choose_threshold(validation)
    at = metrics_at_threshold(y, p, threshold["value"])
    both_classes = 0 < y.sum() < y.size
    report: dict = {
        "task": "pulmonary embolism classification (PE present vs absent), per case",
        "source": SOURCE_NAMES.get(source, source),
        "modality": modality,
        "n_cases": int(y.size),
        "n_positive": int(y.sum()),
        "checkpoint": checkpoint,
        "threshold": threshold,
        "confusion": {k: at[k] for k in ("tp", "fp", "tn", "fn")},
        "ppv": at["ppv"],
        "npv": at["npv"],
        "conventions": {
            "auc": "Mann-Whitney (ties count 1/2), probability = sigmoid(logit)",
            "ci": f"{confidence:.0%} percentile bootstrap over test cases, {n_resamples} resamples, seed {seed}; "
            "resamples with one class are skipped for AUC (n_valid)",
            "threshold": "positive when probability >= threshold; threshold by Youden's J "
            "(sensitivity + specificity - 1) on the validation split, applied unchanged to the test split",
        },
    }
    if both_classes:
        cis = bootstrap_ci(y, p, threshold["value"], n_resamples, confidence, seed)
        report.update({k: v.as_dict() for k, v in cis.items()})
        fpr, tpr, _ = roc_curve(y, p)
        op = (1.0 - at["specificity"], at["sensitivity"])
        title = f"PE, {report['source']}: AUC {cis['auc'].estimate:.3f} [{cis['auc'].low:.3f}, {cis['auc'].high:.3f}]"
        save_roc_png(fpr, tpr, os.path.join(output_dir, "roc_curve.png"), title, operating_point=op)
    else:
        logger.warning("test split has a single class: no AUC, no ROC curve")
        report.update(
            auc={"estimate": float("nan")},
            **{k: {"estimate": at[k]} for k in ("accuracy", "sensitivity", "specificity")},
        )
    report["files"] = {
        "predictions": "predictions.csv",
        "roc_curve": "roc_curve.png" if both_classes else None,
    }
    _write_predictions(os.path.join(output_dir, "predictions.csv"), ids, y, p, threshold["value"])
    atomic_write_text(
        os.path.join(output_dir, "metrics_report.json"), json.dumps(_jsonable(report), indent=2)
    )
    logger.info(
        "PE report (%s): AUC %.3f, threshold %.3f",
        report["source"],
        report["auc"]["estimate"],
        at["threshold"],
    )
    return report


def write_predictions(
    collector: PredictionCollector, path: str, threshold: float = FALLBACK_THRESHOLD
) -> str:
    """Inference output: ``id, probability, predicted`` (plus ``label`` when known) as CSV."""
    ids, y, p = collector.arrays()
    if not ids:
        raise InputError(path, "inference produced no predictions")
    _write_predictions(path, ids, y if collector.has_labels else None, p, threshold)
    return path


def _write_predictions(path: str, ids, labels, probs, threshold: float) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "probability", "predicted", *(["label"] if labels is not None else [])])
    for i, case in enumerate(ids):
        row = [case, f"{probs[i]:.6f}", int(probs[i] >= threshold)]
        writer.writerow(row + ([int(labels[i])] if labels is not None else []))
    atomic_write_text(path, buf.getvalue())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
