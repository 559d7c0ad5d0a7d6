"""Evaluation pieces for MONAI engines: an all-stages inferer, per-stage metrics, DRR consistency,
the metrics report and the three-stage previews."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.inferers import Inferer

from common.drr_loss import drr_consistency
from common.intensity import XRAY2CT
from common.metrics import CONVENTIONS, ct_metric_handlers, write_metrics_report

DRR_CONVENTION = {
    "drr_consistency": {
        "definition": "PA and lateral DRRs of the predicted CT (HU, common.drr.render_drr with the dataset's "
        "geometry at the input pixel count) against the input X-rays: mean L1 and PSNR (data range 1)",
        "keys": ["drr_l1", "drr_psnr"],
    }
}


class CascadeInferer(Inferer):
    """Runs every stage: returns ``{"stage1": ..., "stage2": ..., ...}`` (each at its own size)."""

    def __call__(
        self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs
    ) -> dict[str, torch.Tensor]:
        net = network.module if hasattr(network, "module") else network
        outputs = net.forward_all(inputs)
        return {f"stage{k + 1}": out.clamp(0.0, 1.0) for k, out in enumerate(outputs)}


def stage_pair(stage: int):
    """Output transform -> (pred, label) of one stage from an all-stages engine output (no decollation)."""
    key = f"stage{stage}"

    def transform(output):
        return output["pred"][key], output["label"][key]

    return transform


def stage_metrics(num_stages: int, final_x2ctgan: bool = True) -> tuple[dict, dict]:
    """(key metric, additional metrics): ``psnr_xray2ct`` of the last stage is the key; every stage gets
    ``psnr/ssim_xray2ct_stage<k>`` and ``mae_hu_stage<k>``; the last stage also the X2CT-GAN convention."""
    additional: dict = {}
    for k in range(1, num_stages + 1):
        handlers = ct_metric_handlers(stage_pair(k), include_x2ctgan=final_x2ctgan and k == num_stages)
        for name, handler in handlers.items():
            additional[f"{name}_stage{k}"] = handler
    key = {"psnr_xray2ct": additional.pop(f"psnr_xray2ct_stage{num_stages}")}
    return key, additional


def single_stage_metrics() -> tuple[dict, dict]:
    """Key metric (PSNR) and SSIM/MAE for the validation of the stage being trained (pred, label tensors)."""
    handlers = ct_metric_handlers(include_x2ctgan=False)
    return {"psnr_xray2ct": handlers.pop("psnr_xray2ct")}, handlers


class DRRConsistency(Metric):
    """Mean over cases of :func:`common.drr_loss.drr_consistency` (both views averaged) of the last stage."""

    def __init__(self, geometry, fov_mm: Sequence[float], key: str = "drr_l1", device="cpu"):
        self.geometry, self.fov_mm, self.key = geometry, tuple(float(f) for f in fov_mm), key
        super().__init__(output_transform=_last_stage_and_xrays, device=device)

    def reset(self) -> None:
        self._values: list[float] = []

    def update(self, output) -> None:
        last, xrays = output
        spacing = tuple(f / n for f, n in zip(self.fov_mm, last.shape[2:]))
        for i in range(last.shape[0]):
            views = {"pa": xrays[i : i + 1, :1], "lateral": xrays[i : i + 1, 1:2]}
            values = drr_consistency(
                XRAY2CT.from_unit(last[i : i + 1].float()), views, spacing, self.geometry
            )
            self._values.append(float(np.mean([values[f"{self.key}_{v}"] for v in views])))

    def compute(self) -> float:
        return float(np.mean(self._values)) if self._values else float("nan")


def _last_stage_and_xrays(output) -> tuple[torch.Tensor, torch.Tensor]:
    pred = output["pred"]
    return (pred[sorted(pred)[-1]] if isinstance(pred, dict) else pred), output["image"]


class MetricsReport:
    """Handler: at the end of an evaluation write ``metrics_report.json`` naming the conventions."""

    def __init__(self, path: str, extra: dict | None = None):
        self.path, self.extra = path, dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        conventions = {**CONVENTIONS, **DRR_CONVENTION}
        extra = {"cases": len(engine.data_loader.dataset), **self.extra}
        write_metrics_report(self.path, dict(engine.state.metrics), conventions=conventions, extra=extra)


class StagePreviews:
    """Handler: montage PNG (every stage beside the ground truth and the input X-rays) for the first cases."""

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
            case = _case_id(batch, i, len(self.written))
            path = os.path.join(self.output_dir, "previews", f"{case}_stages.png")
            self.written.append(
                save_stage_montage(
                    path, output["pred"], output["label"], output["image"], i, self.fov_mm, self.window
                )
            )


def _case_id(batch, i: int, fallback: int) -> str:
    ids = batch.get("id") if isinstance(batch, dict) else None
    # load_decathlon_datalist turns ids naming a case folder into absolute paths: keep the name
    return os.path.basename(str(ids[i])) if ids is not None and len(ids) > i else f"case{fallback:03d}"


def save_stage_montage(
    path, preds: dict, labels: dict | None, xrays: torch.Tensor, i: int, fov_mm, window="lung"
) -> str:
    """One PNG row per stage (HU, physical size from ``fov_mm``), the ground truth, and the X-ray pair."""
    from common.preview import save_montage_png
    from common.volume import Volume

    volumes = {}
    last = sorted(preds)[-1]
    for name in sorted(preds):
        arr = XRAY2CT.from_unit(preds[name][i, 0].detach().float().cpu().numpy())
        volumes[name] = Volume.from_spacing(arr, tuple(f / n for f, n in zip(fov_mm, arr.shape)))
    if labels is not None:
        gt = labels[last] if isinstance(labels, dict) else labels
        arr = XRAY2CT.from_unit(gt[i, 0].detach().float().cpu().numpy())
        volumes["ground truth"] = Volume.from_spacing(arr, tuple(f / n for f, n in zip(fov_mm, arr.shape)))
    images = {
        "PA": xrays[i, 0].detach().float().cpu().numpy(),
        "lateral": xrays[i, 1].detach().float().cpu().numpy(),
    }
    return save_montage_png(path, volumes, images, window=window)
