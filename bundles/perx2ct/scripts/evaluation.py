"""Evaluation pieces for the PerX2CT engines: TensorBoard previews of the views and the CT.

Metrics (both conventions, :mod:`common.metrics`), the metrics report with its baseline
(:class:`common.handlers.MetricsReport`, the mean training CT) and the clamping post-processing are wired
in ``configs/train.json`` and ``configs/evaluate.json``.
"""

from __future__ import annotations

import torch


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
