"""Ignite handlers for evaluating sampled CTs: DRR consistency with the input X-ray and the metrics report."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.drr_loss import drr_consistency
from common.intensity import get_window
from common.metrics import CONVENTIONS, write_metrics_report


class DRRConsistency:
    """Per case: the generated CT's PA DRR against the input X-ray (common.drr_loss.drr_consistency).

    MONAI has no projection metric, so this small handler collects the values after every iteration.
    """

    def __init__(self, spacing: Sequence[float], geometry, hu_window: str = "xray2ct", view: str = "pa"):
        self.spacing = tuple(float(s) for s in spacing)
        self.geometry = geometry
        self.window = get_window(hu_window)
        self.view = view
        self.values: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.values.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.state.drr_consistency = self

    def __call__(self, engine: Engine) -> None:
        pred = (
            engine.state.output[0]["pred"]
            if isinstance(engine.state.output, list)
            else engine.state.output["pred"]
        )
        xray = (
            engine.state.batch["image"]
            if isinstance(engine.state.batch, dict)
            else engine.state.batch[0]["image"]
        )
        pred = torch.as_tensor(pred).as_subclass(torch.Tensor).float().cpu()
        xray = torch.as_tensor(xray).as_subclass(torch.Tensor).float().cpu()
        pred = pred.reshape(-1, 1, *pred.shape[-3:])
        xray = xray.reshape(-1, 1, *xray.shape[-2:])
        for p, x in zip(pred, xray):
            hu = self.window.from_unit(p)[None]
            self.values.append(drr_consistency(hu, {self.view: x[None]}, self.spacing, self.geometry))

    def summary(self) -> dict[str, float]:
        if not self.values:
            return {}
        return {k: float(np.mean([v[k] for v in self.values])) for k in self.values[0]}


class MetricsReport:
    """On completion write ``metrics_report.json``: ignite metrics, DRR consistency, conventions, sampler."""

    def __init__(self, path: str | os.PathLike, drr: DRRConsistency | None = None, extra: dict | None = None):
        self.path = os.fspath(path)
        self.drr = drr
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = {k: float(v) for k, v in engine.state.metrics.items()}
        if self.drr is not None:
            metrics.update(self.drr.summary())
        conventions = {
            **CONVENTIONS,
            "drr_consistency": "L1 and PSNR (data range 1) between the generated CT's PA DRR (common.drr, dataset "
            "geometry) and the input X-ray in [0, 1]",
        }
        extra = {"n_cases": engine.state.iteration, **self.extra}
        write_metrics_report(self.path, metrics, conventions=conventions, extra=extra)
