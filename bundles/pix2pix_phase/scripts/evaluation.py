"""Ignite handlers of the bundle: write translated volumes (NIfTI + previews) and the metrics report.

MONAI's ``SaveImaged`` writes NIfTI too, but the project writes volumes through ``common.io`` (atomic,
validated, sform and qform both set) and previews through ``common.preview``, so this handler does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.intensity import get_window
from common.io import load_volume, save_volume
from common.metrics import compute_ct_metrics, write_metrics_report
from common.preview import save_montage_png, save_slice_gif
from common.volume import Volume

logger = logging.getLogger(__name__)


def case_name(item: dict, key: str = "avg") -> str:
    """Case id from the datalist (``id``) or the input file name without its NIfTI suffix."""
    if item.get("id") is not None:
        return str(item["id"])
    src = getattr(item.get(key), "meta", {}).get("filename_or_obj", "case")
    base = os.path.basename(str(src))
    for suffix in (".nii.gz", ".nii"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def to_hu_volume(pred: torch.Tensor, window: str = "xray2ct") -> Volume:
    """A (1, X, Y, Z) [-1, 1] MetaTensor -> HU :class:`Volume` with the tensor's affine."""
    affine = np.asarray(torch.as_tensor(pred.affine).cpu(), dtype=np.float64)
    hu = get_window(window).from_symmetric(torch.as_tensor(pred).as_subclass(torch.Tensor).float().cpu())
    return Volume(hu[0].numpy().astype(np.float32), affine)


class SavePhaseVolumes:
    """After each iteration, write ``<case>_phase0.nii.gz`` (HU, float32) and its previews."""

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        input_key: str = "avg",
        window: str = "xray2ct",
        postfix: str = "phase0",
        previews: bool = True,
    ) -> None:
        self.output_dir, self.pred_key, self.input_key = output_dir, pred_key, input_key
        self.window, self.postfix, self.previews = window, postfix, previews
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        outputs = _as_list(engine.state.output)
        batches = _as_list(engine.state.batch)
        for out, item in zip(outputs, batches):
            name = case_name(item, self.input_key)
            vol = to_hu_volume(out[self.pred_key], self.window)
            path = save_volume(vol, os.path.join(self.output_dir, f"{name}_{self.postfix}.nii.gz"))
            self.written.append(path)
            if self.previews:
                source = getattr(item.get(self.input_key), "meta", {}).get("filename_or_obj")
                self._save_previews(vol, os.path.join(self.output_dir, f"{name}_{self.postfix}"), source)
            logger.info("wrote %s", path)

    @staticmethod
    def _save_previews(vol: Volume, stem: str, source: str | None) -> None:
        """Middle-slice montage (input above prediction) and an axial GIF of prediction beside input."""
        volumes = {"phase 0 (predicted)": vol}
        source_vol = load_volume(source) if source and os.path.exists(str(source)) else None
        if source_vol is not None:
            volumes = {"average CT (input)": source_vol, **volumes}
        save_montage_png(stem + ".png", volumes)
        save_slice_gif(stem + ".gif", vol, compare=source_vol)


class PerVolumeMetricsReport:
    """Collect :func:`common.metrics.compute_ct_metrics` per volume; at the end write ``metrics_report.json``
    with the per-volume values, their mean and the engine's ignite metrics, naming the conventions."""

    def __init__(
        self,
        report_path: str,
        pred_key: str = "pred",
        label_key: str = "label",
        input_key: str = "avg",
        window: str = "xray2ct",
        extra: dict | None = None,
    ) -> None:
        self.report_path, self.pred_key, self.label_key, self.input_key = (
            report_path,
            pred_key,
            label_key,
            input_key,
        )
        self.window, self.extra = window, dict(extra or {})
        self.per_volume: dict[str, dict] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.per_volume.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        for out, item in zip(_as_list(engine.state.output), _as_list(engine.state.batch)):
            pred = to_hu_volume(out[self.pred_key], self.window).array
            label = to_hu_volume(out[self.label_key], self.window).array
            self.per_volume[case_name(item, self.input_key)] = compute_ct_metrics(pred, label)

    def mean(self) -> dict[str, float]:
        names = sorted({k for m in self.per_volume.values() for k in m})
        return {k: float(np.mean([m[k] for m in self.per_volume.values() if k in m])) for k in names}

    def write(self, engine: Engine) -> str:
        extra = {"per_volume": self.per_volume, "engine_metrics": dict(engine.state.metrics), **self.extra}
        extra["n_volumes"] = len(self.per_volume)
        return write_metrics_report(self.report_path, self.mean(), extra=extra)


def _as_list(x) -> Sequence:
    return x if isinstance(x, (list, tuple)) else [x]
