"""Evaluation pieces for the PerX2CT engines: output clamping, metric handlers, the metrics report.

Metrics come from :mod:`common.metrics` in both conventions (ours, XRAY2CT window; and X2CT-GAN/PerX2CT's,
including their per-axis 2D PSNR), computed on HU after undoing the network's window.
"""

from __future__ import annotations

import os

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from monai.transforms import Compose, Lambdad
from tqdm import tqdm

from common.metrics import compute_ct_metrics, ct_metric_handlers, network_to_hu, write_metrics_report

KEY_METRIC = "psnr_xray2ct"


def clamp_prediction() -> Compose:
    """Post-processing: the decoder is linear, so clip its output to the [0, 1] window."""
    return Compose([Lambdad(keys="pred", func=lambda x: x.clamp(0.0, 1.0))])


def key_metric(window: str = "xray2ct") -> dict:
    """``{"psnr_xray2ct": handler}`` for ``key_val_metric`` (best checkpoint = highest PSNR, our convention)."""
    handlers = ct_metric_handlers(from_engine(["pred", "label"]), window=window, include_x2ctgan=False)
    return {KEY_METRIC: handlers[KEY_METRIC]}


def additional_metrics(window: str = "xray2ct", include_x2ctgan: bool = True) -> dict:
    """SSIM and MAE (HU) in our convention, plus X2CT-GAN PSNR/SSIM, for ``additional_metrics``."""
    handlers = ct_metric_handlers(
        from_engine(["pred", "label"]), window=window, include_x2ctgan=include_x2ctgan
    )
    handlers.pop(KEY_METRIC)
    return handlers


def preview_batch(batch) -> tuple:
    """(image, label) of a batch for ``TensorBoardImageHandler`` (the stacked views, the CT)."""
    if isinstance(batch, (list, tuple)):  # decollated by the evaluator's postprocessing
        return tuple(torch.stack([torch.as_tensor(b[k]) for b in batch]) for k in ("image", "ct"))
    return batch["image"], batch["ct"]


def preview_output(output) -> torch.Tensor:
    """Predictions of a (decollated) evaluator output as a (B, 1, X, Y, Z) batch."""
    if isinstance(output, (list, tuple)):
        return torch.stack([torch.as_tensor(o["pred"]) for o in output])
    return output["pred"]


class MetricsReport:
    """Ignite handler: every metric of ``common.metrics.compute_ct_metrics`` per case -> ``metrics_report.json``.

    The engine's own metrics give running means; this report adds the per-axis X2CT-GAN PSNR/SSIM and
    per-case values, names the conventions (``common.metrics.CONVENTIONS``) and is written atomically.
    """

    def __init__(self, path: str, window: str = "xray2ct", extra: dict | None = None, progress: bool = True):
        self.path = os.fspath(path)
        self.to_hu = network_to_hu(window)
        self.extra = dict(extra or {})
        self.progress = progress
        self.cases: list[dict] = []
        self._bar = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.cases = []
        if self.progress:
            self._bar = tqdm(total=engine.state.epoch_length, desc="evaluate", unit="case")

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, (list, tuple)) else [output]
        batch = engine.state.batch
        ids = batch.get("id") if isinstance(batch, dict) else None
        for i, item in enumerate(items):
            pred = self.to_hu(item["pred"]).detach().cpu()
            label = self.to_hu(item["label"]).detach().cpu()
            case_id = ids[i] if ids is not None and i < len(ids) else str(len(self.cases))
            case = {"id": os.path.basename(os.path.normpath(str(case_id)))}
            case.update(compute_ct_metrics(pred, label))
            self.cases.append(case)
        if self._bar is not None:
            self._bar.update(1)

    def _write(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
        keys = [k for k in self.cases[0] if k != "id"] if self.cases else []
        mean = {k: float(sum(c[k] for c in self.cases) / len(self.cases)) for k in keys}
        extra = {
            "n_cases": len(self.cases),
            "cases": self.cases,
            "engine_metrics": dict(engine.state.metrics),
        }
        extra.update(self.extra)
        write_metrics_report(self.path, mean, extra=extra)
