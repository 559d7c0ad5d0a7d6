"""Ignite handlers and output transforms that every bundle wires in its configs.

* :class:`MetricsReport` is the one metrics-report handler (modelled on MONAI's ``MetricsSaver``: reset at
  ``EPOCH_STARTED``, collect per iteration, write at ``EPOCH_COMPLETED``). Per case it scores the model and
  the task's trivial baseline (:mod:`common.baselines`) with the same metric objects, in the same
  conventions, and writes ``metrics_report.json``::

      {"bundle", "split", "case_ids", "n_cases", "metrics" (= model means), "model" (means),
       "baseline": {"name", "description", "metrics"}, "difference" (model - baseline), "model_better",
       "difference_ci" (paired bootstrap interval of each difference), "baselines": {name: {"description",
       "metrics", "difference", "model_better", "difference_ci"}} (every baseline, the first one included),
       "bootstrap" (how the intervals are drawn), "same_source", "same_source_note",
       "cases": [{"id", "model": {...}, "baseline": {...}, "baselines": {name: {...}}, "source"}],
       "smoke_test", "training_cases_evaluated", "conventions", "engine_metrics", ...extra}

  ``smoke_test`` is true when evaluated cases are in the training split: such a figure is not a quality
  figure. :func:`write_json` is the one writer (atomic; NaN and infinities are written as ``null``).
  With ``previews`` it also draws, for the first cases, the ground truth beside the model and the baselines
  (``<preview_dir>/<case>_preview.png``, the one writer :func:`common.predictor.write_previews`): the picture of
  the numbers.
* :class:`CTPair` is the output transform of the ignite CT metrics configs wire (``PeakSignalToNoiseRatio``,
  ``IgniteMetricHandler(SSIMMetric)``, ``MeanAbsoluteError``...): network intensities -> [0, 1] in the
  xray2ct window, or HU.
* :class:`StopOnNonFiniteLoss` stops training with an error naming the batch's cases when a loss is NaN or
  infinite (ignite's ``TerminateOnNan`` stops silently and the run exits 0).
* :func:`rank_handlers` keeps, on DDP ranks other than 0, only the handlers that write nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from tqdm import tqdm

from common.atomic import atomic_write_text
from common.baselines import compare
from common.classification_metrics import bootstrap_mean_ci
from common.datalist import batch_case_ids, case_id, split_batch
from common.intensity import XRAY2CT
from common.json_values import jsonable  # noqa: F401  (re-exported)
from common.metrics import CONVENTIONS, network_to_hu
from common.predictor import write_previews
from common.volume import Volume

logger = logging.getLogger(__name__)

NON_FINITE = "NaN and infinite values are written as null"

# Paired percentile bootstrap of every model-minus-baseline difference over the evaluated cases.
BOOTSTRAP = {"n_resamples": 2000, "confidence": 0.95, "seed": 0}
BOOTSTRAP_METHOD = (
    "paired percentile bootstrap over the evaluated cases: resample cases with replacement, mean of the "
    "per-case differences model - baseline; cases without a finite value of a metric are left out of it"
)
SAME_SOURCE_NOTE = (
    "test cases share a source patient with training cases: they share that patient's vessels and textures, "
    "so a model can score by copying them; this figure measures how well the X-rays steer the shape, and a "
    "cross-source figure (other patients, or phantoms) is the one that says the method generalises"
)
CROSS_SOURCE_NOTE = "no evaluated case shares a source patient with the training cases (cross-source)"
NO_SOURCE_NOTE = "the datalist records no source patients (datalist key 'source'): same-source unknown"


# ----------------------------------------------------------------------------------------------- JSON
def write_json(path: str | os.PathLike, data: Mapping) -> str:
    """Write ``data`` as indented JSON atomically (:func:`jsonable` first); returns the path."""
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")
    return os.fspath(path)


# ----------------------------------------------------------------------------------------------- reports
def mean_metrics(cases: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of every metric over the cases that have it (a NaN case makes the mean NaN: nothing is hidden)."""
    names = list(dict.fromkeys(k for c in cases for k in c))
    return {k: float(np.mean([float(c[k]) for c in cases if k in c])) for k in names}


def build_report(
    bundle: str,
    split: str,
    cases: Sequence[Mapping],
    model: Mapping[str, float] | None = None,
    baseline: Mapping | None = None,
    conventions: Mapping | None = None,
    training_cases: Sequence[str] | None = None,
    extra: Mapping | None = None,
    baselines: Sequence[Mapping] | None = None,
    training_sources: Sequence[str] | None = None,
    bootstrap: Mapping | None = None,
) -> dict:
    """The ``metrics_report.json`` layout (module docstring) from per-case values.

    ``cases``: ``[{"id", "model": {...}, "baseline": {...}, "baselines": {name: {...}}, "source"}]``;
    ``model``: the model's summary (default: the mean of the per-case values); ``baseline``: ``{"name",
    "description", "metrics"}`` (metrics default to the per-case means); ``baselines``: every baseline's
    ``{"name", "description"}`` (default: ``baseline`` alone), scored from ``case["baselines"][name]`` (the
    first one also from ``case["baseline"]``), each with :func:`difference_intervals` (``bootstrap``:
    :data:`BOOTSTRAP` overrides). ``training_sources``: the training split's ``source`` values, for the
    same-source flag.
    """
    ids = [str(c["id"]) for c in cases]
    model = dict(model) if model is not None else mean_metrics([c.get("model", {}) for c in cases])
    report: dict = {"bundle": bundle, "split": split, "case_ids": ids, "n_cases": len(ids), "metrics": model}
    report["model"] = model
    if baseline is not None:
        base = dict(baseline)
        if base.get("metrics") is None:
            base["metrics"] = mean_metrics([c.get("baseline", {}) for c in cases if c.get("baseline")])
        report["baseline"] = base
        report.update(compare(model, base["metrics"]))
    report.update(_baseline_blocks(cases, model, baseline, baselines, bootstrap))
    report.update(same_source(cases, training_sources))
    seen = sorted(set(ids) & {str(t) for t in (training_cases or ())})
    report["smoke_test"] = bool(seen)
    report["training_cases_evaluated"] = seen
    if seen:
        logger.warning(
            "%s: %d evaluated case(s) are in the training split (%s): a smoke test, not a quality figure",
            bundle,
            len(seen),
            ", ".join(seen[:5]),
        )
    report["cases"] = [dict(c) for c in cases]
    report["conventions"] = {**dict(conventions or {}), "json": NON_FINITE}
    clash = set(report) & set(extra or {})
    if clash:
        raise ValueError(f"extra may not reuse the report's keys {sorted(clash)}")
    report.update(extra or {})
    return report


def difference_intervals(
    cases: Sequence[Mapping],
    name: str | None = None,
    primary: bool = True,
    bootstrap: Mapping | None = None,
    keys: Sequence[str] | None = None,
) -> dict[str, dict]:
    """{metric: paired bootstrap CI (dict) of model - baseline ``name``} over ``cases`` (:data:`BOOTSTRAP`).

    ``keys``: only these metrics (the report's summary differences; per-case values such as a PE
    probability are not a difference the report states).
    """
    settings = {**BOOTSTRAP, **dict(bootstrap or {})}
    rows = [(c.get("model", {}), _baseline_values(c, name, primary)) for c in cases]
    names = list(dict.fromkeys(k for m, b in rows for k in m if k in b and (keys is None or k in keys)))
    out = {}
    for key in names:
        diffs = [_float(m[key]) - _float(b[key]) for m, b in rows if key in m and key in b]
        ci = bootstrap_mean_ci(diffs, **settings).as_dict()
        ci["n_cases"] = int(np.sum(np.isfinite(diffs)))
        out[key] = ci
    return out


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _baseline_values(case: Mapping, name: str | None, primary: bool) -> Mapping:
    values = (case.get("baselines") or {}).get(name) if name is not None else None
    if values is None and primary:
        values = case.get("baseline")
    return values or {}


def _baseline_blocks(cases, model, baseline, baselines, bootstrap) -> dict:
    """``difference_ci`` (first baseline), ``baselines`` (every one) and ``bootstrap`` of the report."""
    entries = list(baselines) if baselines else ([baseline] if baseline is not None else [])
    if not entries:
        return {}
    blocks = {}
    for k, entry in enumerate(entries):
        name = str(entry.get("name", f"baseline_{k}"))
        metrics = entry.get("metrics")
        if metrics is None:
            values = [_baseline_values(c, name, k == 0) for c in cases]
            metrics = mean_metrics([v for v in values if v])
        block = {"description": entry.get("description", ""), "metrics": dict(metrics), **compare(model, metrics)}
        block["difference_ci"] = difference_intervals(cases, name, k == 0, bootstrap, list(block["difference"]))
        blocks[name] = block
    first = next(iter(blocks.values()))
    settings = {**BOOTSTRAP, **dict(bootstrap or {})}
    return {"difference_ci": first["difference_ci"], "baselines": blocks, "bootstrap": {**settings, "method": BOOTSTRAP_METHOD}}


def same_source(cases: Sequence[Mapping], training_sources: Sequence[str] | None) -> dict:
    """``{"same_source": True/False/None, "same_source_note", "shared_sources"}`` from the cases' ``source``."""
    evaluated = {str(c["source"]) for c in cases if c.get("source")}
    train = {str(s) for s in (training_sources or ()) if s}
    if not evaluated or not train:
        return {"same_source": None, "same_source_note": NO_SOURCE_NOTE, "shared_sources": []}
    shared = sorted(evaluated & train)
    return {
        "same_source": bool(shared),
        "same_source_note": SAME_SOURCE_NOTE if shared else CROSS_SOURCE_NOTE,
        "shared_sources": shared,
    }


def _hu(to_hu: Callable, x) -> torch.Tensor:
    t = torch.as_tensor(x).as_subclass(torch.Tensor).detach().float().cpu()
    return to_hu(t)


class MetricsReport:
    """Per case: the model's and the baseline's metrics; at epoch end ``metrics_report.json`` (module doc).

    Args:
        path: the report file.
        bundle, split: recorded in the report (the split the evaluator reads).
        metrics: per-case metric objects, called ``metric(pred_hu, target_hu, context) -> {name: value}``
            with (C, X, Y, Z) HU tensors and ``context = {"image": the network input, "item": batch item}``
            (e.g. :class:`common.metrics.CTMetrics`, :class:`common.drr_loss.DRRConsistency`); an object's
            ``conventions`` dict is merged into the report's.
        baseline: a :mod:`common.baselines` predictor, ``baseline(label, output, item)`` -> a prediction like
            ``label`` in network intensities; scored by the same ``metrics``.
        baselines: further predictors like ``baseline`` (e.g. :class:`common.baselines.ExtentScaledMeanCT`),
            scored the same way; every baseline gets paired bootstrap intervals (``bootstrap``).
        training_sources: the training split's ``source`` values (:func:`common.datalist.split_sources`);
            with the evaluated items' ``source`` they set the report's ``same_source`` flag.
        window, symmetric: the network's intensity convention (``[0, 1]`` or ``[-1, 1]`` of an HU window).
        pred_key, label_key, image_key: keys of the engine output. A ``pred``/``label`` dict (one entry per
            cascade stage) gives metrics ``<name>_<entry>``; its last entry is also reported unsuffixed.
        extra_predictions: ``{suffix: output key}`` of further predictions scored against the same label
            (no baseline), e.g. ``{"_per_window": "pred_per_window"}``.
        set_metrics: engine metrics over the whole set (e.g. codebook usage) copied into the model's metrics.
        training_cases: ids of the training split (evaluated training cases make the report a smoke test).
        conventions, extra: merged into the report (conventions default to :data:`common.metrics.CONVENTIONS`).
        previews, preview_dir, preview_window: montages (:func:`preview_volumes`, written by
            :func:`common.predictor.write_previews` as ``<case>_preview.png``) of the first ``previews`` cases in
            ``preview_dir`` (default ``<report folder>/previews``), display window ``preview_window``; their paths
            are listed in the report (``previews``). ``spacing`` (mm) sizes them when the case's datalist item
            has no ``spacing`` (default 1 mm).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        bundle: str,
        split: str,
        metrics: Sequence[Callable],
        baseline: Callable | None = None,
        window: str = "xray2ct",
        symmetric: bool = False,
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        extra_predictions: Mapping[str, str] | None = None,
        set_metrics: Sequence[str] = (),
        training_cases: Sequence[str] | None = None,
        conventions: Mapping | None = None,
        extra: Mapping | None = None,
        progress: bool = True,
        previews: int = 0,
        preview_dir: str | os.PathLike | None = None,
        preview_window: str = "lung",
        spacing: Sequence[float] | None = None,
        baselines: Sequence[Callable] | None = None,
        training_sources: Sequence[str] | None = None,
        bootstrap: Mapping | None = None,
    ):
        self.path = os.fspath(path)
        self.bundle, self.split = bundle, split
        self.metrics = list(metrics)
        if not self.metrics:
            raise ValueError("MetricsReport needs at least one metric")
        self.baseline = baseline
        self.extra_baselines = list(baselines or [])
        if len(set(self.baseline_names)) != len(self.baseline_names):
            raise ValueError(f"baselines need distinct names, got {self.baseline_names}")
        self.training_sources = list(training_sources or [])
        self.bootstrap = dict(bootstrap or {})
        self.to_hu = network_to_hu(window, symmetric)
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.extra_predictions = dict(extra_predictions or {})
        self.set_metrics = list(set_metrics)
        self.training_cases = list(training_cases or [])
        self.conventions = dict(CONVENTIONS if conventions is None else conventions)
        for metric in self.metrics:
            self.conventions.update(getattr(metric, "conventions", {}) or {})
        self.extra = dict(extra or {})
        self.progress = progress
        self.previews = int(previews)
        self.preview_dir = os.fspath(preview_dir) if preview_dir else os.path.join(os.path.dirname(self.path), "previews")
        self.preview_window = preview_window
        self.spacing = None if spacing is None else [float(v) for v in spacing]
        self.written: list[str] = []
        self.cases: list[dict] = []
        self.report: dict | None = None
        self._bar = None

    @property
    def all_baselines(self) -> list[Callable]:
        """``baseline`` (when given) first, then ``baselines``."""
        return [b for b in [self.baseline, *self.extra_baselines] if b is not None]

    @property
    def baseline_names(self) -> list[str]:
        return [getattr(b, "name", type(b).__name__) for b in self.all_baselines]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self.cases, self.written = [], []
        if self.progress:
            self._bar = tqdm(total=engine.state.epoch_length, desc=f"evaluate {self.bundle}", unit="batch")

    def _streams(self, out: Mapping) -> tuple[dict, str | None]:
        pred, label = out[self.pred_key], out[self.label_key]
        if isinstance(pred, Mapping):
            names = list(pred)
            streams = {f"_{n}": (pred[n], label[n] if isinstance(label, Mapping) else label) for n in names}
            return streams, f"_{names[-1]}"
        return {"": (pred, label)}, None

    def _score(self, pred, label, context: dict, suffix: str) -> dict[str, float]:
        pred_hu, label_hu = _hu(self.to_hu, pred), _hu(self.to_hu, label)
        values: dict[str, float] = {}
        for metric in self.metrics:
            for name, value in metric(pred_hu, label_hu, context).items():
                values[f"{name}{suffix}"] = float(value)
        return values

    def score_case(self, out: Mapping, item: Mapping, index: int) -> dict:
        """``{"id", "model", "baseline"}`` of one decollated output item."""
        context = {"image": out.get(self.image_key), "item": item}
        streams, primary = self._streams(out)
        model: dict[str, float] = {}
        names = self.baseline_names
        guessed: dict[str, dict[str, float]] = {name: {} for name in names}
        shown: dict = {}
        for suffix, (pred, label) in streams.items():
            model.update(self._score(pred, label, context, suffix))
            guesses = {}
            for name, predictor in zip(names, self.all_baselines):
                guesses[name] = predictor(label, out, item)
                guessed[name].update(self._score(guesses[name], label, context, suffix))
            if suffix == (primary or ""):
                shown = {"pred": pred, "label": label, "baselines": guesses}
        if primary is not None:
            for values in (model, *guessed.values()):
                values.update({k[: -len(primary)]: v for k, v in list(values.items()) if k.endswith(primary)})
        baseline = guessed[names[0]] if self.baseline is not None else {}
        for suffix, key in self.extra_predictions.items():
            if out.get(key) is not None:
                model.update(self._score(out[key], out[self.label_key], context, suffix))
        case = {"id": case_id(item, index) if item else case_id(out, index), "model": model}
        if self.baseline is not None:
            case["baseline"] = baseline
        if self.all_baselines:
            case["baselines"] = guessed
        source = (item or {}).get("source")
        if isinstance(source, (list, tuple)) and len(source) == 1:
            source = source[0]
        if isinstance(source, str) and source:
            case["source"] = source
        if len(self.written) < self.previews and shown:
            self.written.append(self._preview(case["id"], shown, out.get(self.image_key), item))
        return case

    def _preview(self, case: str, shown: Mapping, image, item: Mapping) -> str:
        spacing = (item or {}).get("spacing", self.spacing)
        volumes = {"model": _hu(self.to_hu, shown["pred"])}
        for name, guess in shown["baselines"].items():
            volumes[f"baseline ({name})"] = _hu(self.to_hu, guess)
        truth = preview_volumes({"truth": _hu(self.to_hu, shown["label"])}, spacing)["truth"]
        views, view_names = xray_views(image)
        files = write_previews(preview_volumes(volumes, spacing), views, view_names, self.preview_dir, case, truth,
                               gif=False, window=self.preview_window)  # fmt: skip
        return files["preview"]

    def _collect(self, engine: Engine) -> None:
        outputs = split_batch(engine.state.output)
        items = split_batch(engine.state.batch)
        for i, out in enumerate(outputs):
            item = items[i] if i < len(items) and isinstance(items[i], Mapping) else {}
            self.cases.append(self.score_case(out, item, len(self.cases)))
        if self._bar is not None:
            self._bar.update(1)

    def __call__(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        model = mean_metrics([c["model"] for c in self.cases])
        engine_metrics = {k: v for k, v in engine.state.metrics.items() if np.isscalar(v) or torch.is_tensor(v)}
        for name in self.set_metrics:
            if name in engine.state.metrics:
                model[name] = float(engine.state.metrics[name])
        entries = [
            {"name": name, "description": getattr(b, "description", ""), "metrics": None}
            for name, b in zip(self.baseline_names, self.all_baselines)
        ]
        baseline = entries[0] if self.baseline is not None else None
        extra = {"engine_metrics": engine_metrics, **self.extra}
        if self.previews:
            extra["previews"] = list(self.written)
        self.report = build_report(
            self.bundle, self.split, self.cases, model, baseline, self.conventions, self.training_cases, extra,
            baselines=entries or None, training_sources=self.training_sources, bootstrap=self.bootstrap,
        )
        write_json(self.path, self.report)
        logger.info("metrics report: %s", self.path)


def preview_volumes(volumes: Mapping[str, torch.Tensor], spacing: Sequence[float] | None = None) -> dict:
    """HU tensors (C, X, Y, Z) or (X, Y, Z) -> ``{name: Volume}`` (first channel, ``spacing`` mm, default 1 mm)
    for :func:`common.predictor.write_previews`."""

    sp = [float(v) for v in np.asarray(spacing, dtype=float).reshape(-1)[:3]] if spacing is not None else None
    sp = tuple(sp) if sp and len(sp) == 3 else (1.0, 1.0, 1.0)
    out = {}
    for name, x in volumes.items():
        t = torch.as_tensor(x)
        out[name] = Volume.from_spacing(t.reshape(-1, *t.shape[-3:])[0].numpy(), sp)
    return out


def xray_views(image) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """The network input as model-domain X-rays ``((V, H, W), view names)`` when it is a stack of one or two 2D
    images (PA, or PA + lateral); ``(None, ())`` for a CT input."""
    if image is None:
        return None, ()
    img = torch.as_tensor(image).as_subclass(torch.Tensor).detach().float().cpu()
    if img.ndim == 3 and img.shape[0] in (1, 2):
        return img.numpy(), ("pa", "lateral")[: img.shape[0]]
    return None, ()


# ----------------------------------------------------------------------------------------------- ignite metrics
class CTPair:
    """Output transform ``output -> (pred, label)`` for ignite CT metrics, converted from network intensities.

    ``scale``: ``"unit"`` (the xray2ct window scaled to [0, 1], data range 1 = 3072 HU), ``"hu"`` (HU, clipped
    to the network's window) or ``"clipped_hu"`` (HU clipped to the xray2ct window, for MAE in HU).
    ``window``/``symmetric``: the network's intensity convention. ``stage``: the entry of a ``pred``/``label``
    dict (cascade stages). Works on batched and decollated outputs.
    """

    def __init__(
        self,
        scale: str = "unit",
        window: str = "xray2ct",
        symmetric: bool = False,
        stage: str | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
    ):
        if scale not in ("unit", "hu", "clipped_hu"):
            raise ValueError(f"scale must be 'unit', 'hu' or 'clipped_hu', got {scale!r}")
        self.scale, self.stage = scale, stage
        self.to_hu = network_to_hu(window, symmetric)
        self.pred_key, self.label_key = pred_key, label_key

    def _convert(self, x) -> torch.Tensor:
        if self.stage is not None and isinstance(x, Mapping):
            x = x[self.stage]
        hu = self.to_hu(x)
        if self.scale == "unit":
            return XRAY2CT.to_unit(hu)
        if self.scale == "clipped_hu":
            return hu.clamp(XRAY2CT.lo, XRAY2CT.hi)
        return hu

    def __call__(self, output):
        if isinstance(output, (list, tuple)):
            return (
                [self._convert(o[self.pred_key]) for o in output],
                [self._convert(o[self.label_key]) for o in output],
            )
        return self._convert(output[self.pred_key]), self._convert(output[self.label_key])


# ----------------------------------------------------------------------------------------------- training
class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the message names the batch's cases."""


def _scalar_losses(output, keys: Sequence[str] | None) -> dict[str, float]:
    found: dict[str, float] = {}
    for item in output if isinstance(output, (list, tuple)) else [output]:
        if isinstance(item, Mapping):
            for key, value in item.items():
                wanted = key in keys if keys is not None else "loss" in str(key)
                if wanted and (isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)):
                    found[str(key)] = float(value.detach() if torch.is_tensor(value) else value)
        elif isinstance(item, (int, float)) or (torch.is_tensor(item) and item.numel() == 1):
            found["loss"] = float(item.detach() if torch.is_tensor(item) else item)
    return found


class StopOnNonFiniteLoss:
    """Raise :class:`NonFiniteLossError` naming epoch, iteration and the batch's cases on a NaN/inf loss.

    ``keys``: the output entries to check (default: every scalar entry whose name contains ``loss``).
    """

    def __init__(self, keys: Sequence[str] | None = None):
        self.keys = list(keys) if keys is not None else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        losses = _scalar_losses(engine.state.output, self.keys)
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if not bad:
            return
        try:
            cases = batch_case_ids(engine.state.batch)
        except Exception:  # the batch cannot be split: the error must still name what is known
            cases = []
        raise NonFiniteLossError(
            f"non-finite training loss {bad} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; "
            f"batch cases: {cases or 'unknown'}. Check these cases for NaN/inf values (the datalist check "
            "reads every file when check_values is on) or lower the learning rate."
        )


def rank_handlers(handlers: Sequence | None, rank: int | None = None) -> list:
    """``handlers`` for one DDP rank: all of them on rank 0; elsewhere none that writes files or logs."""
    from monai.handlers import (
        CheckpointSaver,
        MetricsSaver,
        StatsHandler,
        TensorBoardImageHandler,
        TensorBoardStatsHandler,
    )

    handlers = [h for h in (handlers or []) if h is not None]
    if rank is None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        return handlers
    writers = (CheckpointSaver, MetricsSaver, StatsHandler, TensorBoardStatsHandler, TensorBoardImageHandler)
    return [h for h in handlers if not isinstance(h, (*writers, MetricsReport))]
