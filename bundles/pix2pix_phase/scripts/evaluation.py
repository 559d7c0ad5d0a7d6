"""Evaluation pieces of the bundle: the writer of translated volumes (NIfTI + previews).

MONAI's ``SaveImaged`` writes NIfTI too, but the project writes volumes through ``common.io`` (atomic,
validated, sform and qform both set) and previews through ``common.preview``, so this handler does. The
metrics report (model vs the input copied as the prediction) is :class:`common.handlers.MetricsReport`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.datalist import case_id
from common.intensity import get_window
from common.io import load_volume, save_volume
from common.preview import save_montage_png, save_slice_gif
from common.volume import Volume

logger = logging.getLogger(__name__)


def to_hu_volume(pred: torch.Tensor, window: str | None = "xray2ct") -> Volume:
    """A (1, X, Y, Z) [-1, 1] MetaTensor -> HU :class:`Volume` with the tensor's affine; ``window=None``:
    ``pred`` is already in HU (inference.json's postprocessing maps it back, for MONAI Label)."""
    affine = np.asarray(torch.as_tensor(pred.affine).cpu(), dtype=np.float64)
    hu = torch.as_tensor(pred).as_subclass(torch.Tensor).float().cpu()
    if window is not None:
        hu = get_window(window).from_symmetric(hu)
    return Volume(hu[0].numpy().astype(np.float32), affine)


class SavePhaseVolumes:
    """After each iteration, write ``<case>_phase0.nii.gz`` (HU, float32) and its previews."""

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        input_key: str = "avg",
        window: str | None = "xray2ct",
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
            name = case_id(item, len(self.written), key=self.input_key)
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


def _as_list(x) -> Sequence:
    return x if isinstance(x, (list, tuple)) else [x]
