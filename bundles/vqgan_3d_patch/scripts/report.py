"""Writes the evaluator's metrics to ``metrics_report.json`` (conventions named) when it completes."""

from __future__ import annotations

import os

from ignite.engine import Engine, Events

from common.metrics import CONVENTIONS, write_metrics_report

CODEBOOK_CONVENTIONS = {
    "codebook_usage": "fraction of the codebook's codes used at least once over all evaluated volumes "
    "(each latent voxel counted once: indices of the sliding-window-blended latent)",
    "perplexity": "exp(entropy) of the code histogram over all evaluated volumes; 1 = one code, "
    "num_embeddings = uniform use",
    "reconstruction": "whole volumes rebuilt by overlapping windows (MONAI SlidingWindowInferer)",
}


class MetricsReportHandler:
    """Attach to an evaluator: at COMPLETED write ``engine.state.metrics`` and ``extra`` to ``path``."""

    def __init__(self, path: str | os.PathLike, extra: dict | None = None):
        self.path = os.fspath(path)
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        conventions = {**CONVENTIONS, **CODEBOOK_CONVENTIONS}
        extra = {**self.extra, "n_volumes": int(engine.state.iteration)}
        write_metrics_report(self.path, dict(engine.state.metrics), conventions=conventions, extra=extra)
