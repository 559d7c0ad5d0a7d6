"""The PE evaluation: prediction collection, the report (AUC with a bootstrap CI, a validation-chosen operating
point, the prevalence baseline), ROC PNG and per-case CSV.

Protocol (the same for real CTPA, generated CTPA, X-ray and fusion, so their numbers compare):
the threshold is chosen by Youden's J on the *validation* predictions and applied unchanged to the test
predictions; CIs are seeded percentile bootstraps over test cases (:mod:`common.classification_metrics`).
The report has the layout of every ``metrics_report.json`` (:func:`common.handlers.build_report`): the
baseline is the prevalence classifier (the training split's PE rate as every case's probability; AUC 0.5,
decisions = the training majority class), and with ``xray_report`` (the report of an X-ray-only model on
the same test cases) an ``xray_only`` comparison. :class:`PredictionCollector` keeps ids, labels and
probabilities together (MONAI's ``ClassificationSaver`` writes predictions keyed by file name only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image, ImageDraw

from common.atomic import atomic_path, atomic_write_text
from common.baselines import compare
from common.classification_metrics import (
    bootstrap_ci,
    metrics_at_threshold,
    roc_auc,
    roc_curve,
    youden_threshold,
)
from common.datalist import case_id, split_batch
from common.errors import InputError
from common.handlers import build_report, write_json
from common.tables import csv_text

FALLBACK_THRESHOLD = 0.5
PREVALENCE = "prevalence"
SOURCE_NAMES = {
    "real": "real CTPA",
    "generated": "generated CTPA",
    "xray": "X-ray",
    "fusion": "X-ray + CTPA",
    "fusion_generated": "X-ray + generated CTPA",
}
logger = logging.getLogger(__name__)


class PredictionCollector:
    """Collect ``(id, label, probability)`` per case; reset at every epoch start (one pass = one set)."""

    def __init__(self, id_key: str = "id", pred_key: str = "pred", label_key: str = "label"):
        self.id_key, self.pred_key, self.label_key = id_key, pred_key, label_key
        self.reset()

    def reset(self, engine: Engine | None = None) -> None:
        self.ids: list[str] = []
        self.labels: list[int | None] = []
        self.probabilities: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)

    def collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # decollate=False: one dict of batched tensors
            batch, output = split_batch(batch), split_batch(output)
        for item, out in zip(batch, output):
            self.ids.append(case_id(item, len(self.ids)) if self.id_key == "id" else str(item.get(self.id_key)))
            self.probabilities.append(float(torch.as_tensor(out[self.pred_key]).reshape(-1)[0]))
            label = out.get(self.label_key)
            self.labels.append(
                None if label is None else int(round(float(torch.as_tensor(label).reshape(-1)[0])))
            )

    @property
    def has_labels(self) -> bool:
        return bool(self.labels) and all(v is not None for v in self.labels)

    def arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(ids, labels int, probabilities float)``; labels are -1 where unknown."""
        labels = np.asarray([-1 if v is None else v for v in self.labels], dtype=np.int64)
        return list(self.ids), labels, np.asarray(self.probabilities, dtype=np.float64)


def save_roc_png(
    fpr: Sequence[float],
    tpr: Sequence[float],
    path: str | os.PathLike,
    title: str = "ROC",
    operating_point: tuple[float, float] | None = None,
    size: int = 420,
) -> str:
    """ROC curve (1 - specificity on x, sensitivity on y), the chance diagonal and an optional operating
    point (fpr, tpr) marked with a circle; written atomically."""
    margin = 50
    side = size - 2 * margin
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def xy(f: float, t: float) -> tuple[float, float]:
        return margin + f * side, size - margin - t * side

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for tick in np.linspace(0, 1, 6):
        x, y = xy(tick, 0)
        draw.line([x, y, x, y + 4], fill="black")
        draw.text((x - 8, y + 6), f"{tick:.1f}", fill="black")
        x, y = xy(0, tick)
        draw.line([x - 4, y, x, y], fill="black")
        draw.text((x - 28, y - 5), f"{tick:.1f}", fill="black")
    for k in range(0, 20, 2):  # dashed chance line
        draw.line([xy(k / 20, k / 20), xy((k + 1) / 20, (k + 1) / 20)], fill="gray")
    draw.line([xy(float(f), float(t)) for f, t in zip(fpr, tpr)], fill=(200, 30, 30), width=3)
    if operating_point is not None:
        x, y = xy(*operating_point)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=(20, 60, 200), width=2)
    draw.text((margin, 15), title, fill="black")
    draw.text((size // 2 - 60, size - 22), "1 - specificity (FPR)", fill="black")
    draw.text((5, margin - 30), "sensitivity (TPR)", fill="black")
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


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


def _at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    at = metrics_at_threshold(y, p, threshold)
    both = 0 < y.sum() < y.size
    out = {"auc": roc_auc(y, p) if both else float("nan")}
    out.update({k: float(at[k]) for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv")})
    return out


def prevalence_baseline(train_labels: Sequence[int] | None, y: np.ndarray) -> tuple[float, dict]:
    """The prevalence classifier: probability = the training PE rate for every case, decisions = its majority class."""
    labels = np.asarray(list(train_labels or []), dtype=np.int64)
    if labels.size == 0:
        raise InputError(None, "the prevalence baseline needs the training split's labels (none given)")
    rate = float(labels.mean())
    return rate, _at(y, np.full(y.shape, rate), 0.5)


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
    split: str = "test",
    train_labels: Sequence[int] | None = None,
    training_cases: Sequence[str] | None = None,
    xray_report: str | None = None,
    report_file: str = "metrics_report.json",
) -> dict:
    """Write ``report_file`` (the config's ``metrics_report``), ``predictions.csv`` and ``roc_curve.png`` under
    ``output_dir``."""
    ids, y, p = test.arrays()
    if not ids:
        raise InputError(output_dir, "evaluation produced no predictions")
    if not test.has_labels:
        raise InputError(output_dir, "evaluation cases need 0/1 labels")
    os.makedirs(output_dir, exist_ok=True)
    threshold = choose_threshold(validation)
    at = metrics_at_threshold(y, p, threshold["value"])
    model = _at(y, p, threshold["value"])
    rate, base = prevalence_baseline(train_labels, y)
    both_classes = 0 < y.sum() < y.size
    cases = [
        {"id": i, "label": int(y[k]), "model": {"probability": float(p[k])}, "baseline": {"probability": rate}}
        for k, i in enumerate(ids)
    ]
    conventions = {
        "auc": "Mann-Whitney (ties count 1/2), probability = sigmoid(logit)",
        "ci": f"{confidence:.0%} percentile bootstrap over test cases, {n_resamples} resamples, seed {seed}; "
        "resamples with one class are skipped for AUC (n_valid)",
        "threshold": "positive when probability >= threshold; threshold by Youden's J "
        "(sensitivity + specificity - 1) on the validation split, applied unchanged to the test split",
        PREVALENCE: f"probability {rate:.4f} (the training split's PE rate) for every case; positive when >= 0.5",
    }
    extra: dict = {
        "task": "pulmonary embolism classification (PE present vs absent), per case",
        "source": SOURCE_NAMES.get(source, source),
        "modality": modality,
        "n_positive": int(y.sum()),
        "checkpoint": checkpoint,
        "threshold": threshold,
        "confusion": {k: at[k] for k in ("tp", "fp", "tn", "fn")},
        "ppv": at["ppv"],
        "npv": at["npv"],
    }
    if both_classes:
        cis = bootstrap_ci(y, p, threshold["value"], n_resamples, confidence, seed)
        extra.update({k: v.as_dict() for k, v in cis.items()})
        fpr, tpr, _ = roc_curve(y, p)
        op = (1.0 - at["specificity"], at["sensitivity"])
        title = f"PE, {extra['source']}: AUC {cis['auc'].estimate:.3f} [{cis['auc'].low:.3f}, {cis['auc'].high:.3f}]"
        save_roc_png(fpr, tpr, os.path.join(output_dir, "roc_curve.png"), title, operating_point=op)
    else:
        logger.warning("test split has a single class: no AUC, no ROC curve")
        extra.update(
            auc={"estimate": float("nan")},
            **{k: {"estimate": at[k]} for k in ("accuracy", "sensitivity", "specificity")},
        )
    if xray_report:
        extra["comparisons"] = {"xray_only": _xray_comparison(xray_report, ids, split, model)}
    extra["files"] = {"predictions": "predictions.csv", "roc_curve": "roc_curve.png" if both_classes else None}
    baseline = {"name": PREVALENCE, "description": conventions[PREVALENCE], "metrics": base}
    report = build_report("pe_classifier", split, cases, model, baseline, conventions, training_cases, extra)
    _write_predictions(os.path.join(output_dir, "predictions.csv"), ids, y, p, threshold["value"])
    write_json(os.path.join(output_dir, report_file), report)
    logger.info("PE report (%s): AUC %.3f, threshold %.3f", extra["source"], model["auc"], at["threshold"])
    return report


def _xray_comparison(path: str, ids: Sequence[str], split: str, model: dict) -> dict:
    """This model against an X-ray-only model's report on the same cases (refused when the cases differ)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics_report.json")
    if not os.path.isfile(path):
        raise InputError(path, "X-ray model report not found")
    with open(path) as f:
        other = json.load(f)
    if other.get("split") != split or sorted(other.get("case_ids", [])) != sorted(ids):
        raise InputError(path, f"the X-ray model was evaluated on other cases (split {other.get('split')!r}); "
                               "compare models on the same test cases")
    metrics = {k: v for k, v in (other.get("metrics") or {}).items() if v is not None}
    return {"report": os.path.abspath(path), "source": other.get("source"), "metrics": metrics, **compare(model, metrics)}


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
    rows = []
    for i, case in enumerate(ids):
        row = [case, f"{probs[i]:.6f}", int(probs[i] >= threshold)]
        rows.append(row + ([int(labels[i])] if labels is not None else []))
    fields = ["id", "probability", "predicted", *(["label"] if labels is not None else [])]
    atomic_write_text(path, csv_text(rows, fields, lineterminator="\n"))  # ids made spreadsheet-safe
