"""Evaluation pieces for MONAI engines: an all-stages inferer and the three-stage previews (written by the one
writer, :func:`common.predictor.write_previews`: ``<output_dir>/previews/<case>_preview_stages.png``).

Per-stage metrics (``_target_`` lists in the configs), the DRR consistency (:class:`common.drr_loss.DRRConsistency`)
and the report with its baseline (:class:`common.handlers.MetricsReport`, the mean training CT resized to each
stage) are wired in ``configs/evaluate.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer

from common.checkpoint import unwrap
from common.datalist import case_id, split_batch
from common.intensity import XRAY2CT


class CascadeInferer(Inferer):
    """Runs every stage: returns ``{"stage1": ..., "stage2": ..., ...}`` (each at its own size)."""

    def __call__(
        self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs
    ) -> dict[str, torch.Tensor]:
        outputs = unwrap(network).forward_all(inputs)
        return {f"stage{k + 1}": out.clamp(0.0, 1.0) for k, out in enumerate(outputs)}


class StagePreviews:
    """Handler: montage PNG (the ground truth, every stage, the input X-rays) of the first ``n_cases`` cases,
    ``<output_dir>/previews/<case>_preview_stages.png``."""

    KIND = "stages"

    def __init__(self, output_dir: str, fov_mm: Sequence[float], n_cases: int = 2, window: str = "lung"):
        self.output_dir, self.fov_mm, self.n_cases, self.window = (
            output_dir,
            tuple(fov_mm),
            int(n_cases),
            window,
        )
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        batch = engine.state.batch
        for i in range(output["image"].shape[0]):
            if len(self.written) >= self.n_cases:
                return
            case = case_id(split_batch(batch)[i] if batch is not None else None, len(self.written))
            folder = os.path.join(self.output_dir, "previews")
            self.written.append(
                save_stage_montage(
                    folder, case, output["pred"], output["label"], output["image"], i, self.fov_mm, self.window
                )
            )


def save_stage_montage(
    folder, case: str, preds: dict, labels: dict | None, xrays: torch.Tensor, i: int, fov_mm, window="lung"
) -> str:
    """Batch item ``i``: the ground truth, one row per stage (HU, physical size from ``fov_mm``) and the X-ray
    pair, through :func:`common.predictor.write_previews` (kind ``stages``); returns the PNG's path."""
    from common.predictor import write_previews
    from common.volume import Volume

    def volume(unit: torch.Tensor) -> Volume:
        arr = XRAY2CT.from_unit(unit.detach().float().cpu().numpy())
        return Volume.from_spacing(arr, tuple(f / n for f, n in zip(fov_mm, arr.shape)))

    names = sorted(preds)
    volumes = {name: volume(preds[name][i, 0]) for name in names}
    truth = None
    if labels is not None:
        truth = volume((labels[names[-1]] if isinstance(labels, dict) else labels)[i, 0])
    views = xrays[i, :2].detach().float().cpu().numpy()
    files = write_previews(volumes, views, ("pa", "lateral"), folder, case, truth, kind=StagePreviews.KIND,
                           gif=False, window=window)  # fmt: skip
    return files["preview"]
