"""Evaluation pieces of the bundle: the writer of translated volumes (NIfTI + previews).

MONAI's ``SaveImaged`` writes NIfTI too, but the project writes CTs and previews through its one writer,
:func:`common.predictor.write_prediction` (``common.io``: atomic, validated, sform and qform both set; one
naming scheme), so this handler does. The
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
from common.io import load_volume
from common.predictor import Prediction, write_prediction
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
    """After each iteration, write ``<case>_ct.nii.gz`` (the predicted phase 0, HU, float32), and its previews
    ``<case>_preview.png`` (the average CT input above the prediction) and ``<case>_axial.gif`` (beside the
    input): :func:`common.predictor.write_prediction`'s names."""

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        input_key: str = "avg",
        window: str | None = "xray2ct",
        previews: bool = True,
    ) -> None:
        self.output_dir, self.pred_key, self.input_key = output_dir, pred_key, input_key
        self.window, self.previews = window, previews
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        outputs = _as_list(engine.state.output)
        batches = _as_list(engine.state.batch)
        for out, item in zip(outputs, batches):
            name = case_id(item, len(self.written), key=self.input_key)
            vol = to_hu_volume(out[self.pred_key], self.window)
            source = None
            if self.previews:
                path = getattr(item.get(self.input_key), "meta", {}).get("filename_or_obj")
                source = load_volume(path) if path and os.path.exists(str(path)) else None
            files = write_prediction(Prediction({"phase 0 (predicted)": vol}, None, ()), self.output_dir, name,
                                     previews=self.previews, reference=source,
                                     reference_name="average CT (input)")  # fmt: skip
            self.written.append(files["ct"])
            logger.info("wrote %s", files["ct"])


def _as_list(x) -> Sequence:
    return x if isinstance(x, (list, tuple)) else [x]
