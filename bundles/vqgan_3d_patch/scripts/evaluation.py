"""Writes each reconstructed volume as NIfTI in HU (input's affine) plus PNG/GIF previews.

An ignite handler rather than MONAI's SaveImaged so the project's writer is used: atomic writes,
geometry checks and the RAS affine carried by the input MetaTensor (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.intensity import get_window
from common.io import save_volume
from common.preview import save_montage_png, save_slice_gif
from common.volume import Volume


def case_name(meta_tensor, index: int, fallback: str) -> str:
    """The input file's name without extensions (e.g. ``ct`` -> parent folder name for ``<case>/ct.nii.gz``)."""
    meta = getattr(meta_tensor, "meta", {}) or {}
    names = meta.get("filename_or_obj")
    name = names[index] if isinstance(names, (list, tuple)) else names
    if not name:
        return fallback
    base = os.path.basename(str(name)).split(".")[0]
    parent = os.path.basename(os.path.dirname(str(name)))
    return f"{parent}_{base}" if parent and base in ("ct", "image", "avg", "phase0") else base


def item_affine(meta_tensor, index: int) -> np.ndarray:
    """The 4x4 RAS affine of batch item ``index`` (identity when the input carries none)."""
    affine = getattr(meta_tensor, "affine", None)
    if affine is None:
        return np.eye(4)
    affine = torch.as_tensor(affine).detach().cpu().double().numpy()
    return affine[index] if affine.ndim == 3 else affine


class ReconstructionWriter:
    """Per iteration: ``<output_dir>/<case>_recon.nii.gz`` (HU) and ``<case>_preview.png`` / ``.gif``."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        window: str = "xray2ct",
        preview_window: str = "lung",
        previews: bool = True,
        image_key: str = "image",
        pred_key: str = "pred",
    ):
        self.output_dir = os.fspath(output_dir)
        self.window = get_window(window)
        self.preview_window = preview_window
        self.previews = previews
        self.image_key = image_key
        self.pred_key = pred_key
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for item in items:
            image, pred = item[self.image_key], item[self.pred_key]
            batched = pred.ndim == 5
            for b in range(pred.shape[0] if batched else 1):
                img_b, pred_b = (image[b], pred[b]) if batched else (image, pred)
                name = case_name(image if batched else img_b, b, f"case_{engine.state.iteration:04d}_{b}")
                affine = item_affine(image if batched else img_b, b)
                self.write(name, img_b[0], pred_b[0], affine)

    def write(self, name: str, image: torch.Tensor, pred: torch.Tensor, affine: np.ndarray) -> str:
        """Save one reconstruction (C dropped) and its previews; returns the NIfTI path."""
        to_hu = lambda t: self.window.from_unit(torch.as_tensor(t).detach().cpu().float().numpy())  # noqa: E731
        recon = Volume(to_hu(pred).astype(np.float32), affine)
        path = save_volume(recon, os.path.join(self.output_dir, f"{name}_recon.nii.gz"))
        self.written.append(path)
        if self.previews:
            truth = Volume(to_hu(image).astype(np.float32), affine)
            vols = {"input": truth, "reconstruction": recon}
            save_montage_png(
                os.path.join(self.output_dir, f"{name}_preview.png"), vols, window=self.preview_window
            )
            save_slice_gif(
                os.path.join(self.output_dir, f"{name}_axial.gif"),
                recon,
                compare=truth,
                window=self.preview_window,
            )
        return path
