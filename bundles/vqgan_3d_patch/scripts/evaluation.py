"""Evaluation pieces of the VQ-GAN: codebook health metrics, the report's conventions, the volume writer.

Codebook health: the fraction of codes in use and the perplexity of the code distribution. A VQ-GAN whose
codebook collapses to a few codes still reconstructs blurry volumes, so both numbers are logged in training
and evaluation. Perplexity = exp(entropy of the code histogram): 1 when one code is used,
``num_embeddings`` when all codes are equally frequent. MONAI's VectorQuantizer keeps a per-batch
perplexity only; :class:`CodebookMetric` accumulates over a whole epoch / set of volumes (own code: MONAI
has no such metric).

:class:`ReconstructionWriter` writes each reconstructed volume as NIfTI in HU (input's affine) plus PNG/GIF
previews: an ignite handler rather than MONAI's SaveImaged so the project's one writer is used
(:func:`common.predictor.write_prediction`: atomic writes, geometry checks, one naming scheme; the RAS affine
carried by the input MetaTensor; see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from common.datalist import case_id
from common.intensity import get_window
from common.predictor import Prediction, write_prediction
from common.volume import Volume


def code_histogram(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Counts of each code index (float64, length ``num_embeddings``)."""
    flat = indices.detach().reshape(-1).long().cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_embeddings):
        raise ValueError(f"code indices outside [0, {num_embeddings})")
    return torch.bincount(flat, minlength=num_embeddings).double()


def usage_from_histogram(counts: torch.Tensor) -> float:
    """Fraction of codes used at least once."""
    return float((counts > 0).sum()) / counts.numel()


def perplexity_from_histogram(counts: torch.Tensor) -> float:
    """exp(entropy) of the normalised histogram (0 when nothing was counted)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def codebook_stats(indices: torch.Tensor, num_embeddings: int) -> dict[str, float]:
    """``{"codebook_usage": ..., "perplexity": ...}`` for a tensor of code indices."""
    counts = code_histogram(indices, num_embeddings)
    return {"codebook_usage": usage_from_histogram(counts), "perplexity": perplexity_from_histogram(counts)}


class CodebookMetric(Metric):
    """Ignite metric accumulating the code histogram; ``statistic`` is ``"usage"`` or ``"perplexity"``.

    ``output_transform`` must return the tensor of code indices of the iteration.
    """

    def __init__(
        self,
        num_embeddings: int,
        statistic: str = "usage",
        output_transform: Callable = lambda x: x["indices"],
        device: str | torch.device = "cpu",
    ):
        if statistic not in ("usage", "perplexity"):
            raise ValueError(f"statistic must be 'usage' or 'perplexity', got {statistic!r}")
        self.num_embeddings = int(num_embeddings)
        self.statistic = statistic
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._counts = torch.zeros(self.num_embeddings, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: torch.Tensor) -> None:
        self._counts += code_histogram(output, self.num_embeddings).to(self._device)

    @sync_all_reduce("_counts")
    def compute(self) -> float:
        if self.statistic == "usage":
            return usage_from_histogram(self._counts)
        return perplexity_from_histogram(self._counts)


CODEBOOK_CONVENTIONS = {
    "codebook_usage": "fraction of the codebook's codes used at least once over all evaluated volumes "
    "(each latent voxel counted once: indices of the sliding-window-blended latent)",
    "perplexity": "exp(entropy) of the code histogram over all evaluated volumes; 1 = one code, "
    "num_embeddings = uniform use",
    "reconstruction": "whole volumes by the latent path (common.codec.reconstruct_volume): blended encoding, one "
    "quantisation of the blended latent, windowed decoding, clipped to [0, 1]; what latent_ddpm decodes. "
    "*_per_window metrics (each window quantised and decoded on its own) appear only when that path differs",
}


def item_affine(meta_tensor, index: int) -> np.ndarray:
    """The 4x4 RAS affine of batch item ``index`` (identity when the input carries none)."""
    affine = getattr(meta_tensor, "affine", None)
    if affine is None:
        return np.eye(4)
    affine = torch.as_tensor(affine).detach().cpu().double().numpy()
    return affine[index] if affine.ndim == 3 else affine


class ReconstructionWriter:
    """Per iteration: ``<output_dir>/<case>_ct.nii.gz`` (HU), ``<case>_preview.png`` (the input beside the
    reconstruction) and ``<case>_axial.gif``: :func:`common.predictor.write_prediction`'s names.

    ``<case>`` is :func:`common.datalist.case_id` of the input file (``<case>/ct.nii.gz`` -> ``<case>``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        window: str = "xray2ct",
        preview_window: str = "lung",
        previews: bool = True,
        image_key: str = "image",
        pred_key: str = "pred",
        pred_is_hu: bool = False,
    ):
        """``pred_is_hu``: the postprocessing already mapped ``pred`` back to HU (inference.json does, so
        MONAI Label, which runs only pre/postprocessing, gets HU); otherwise ``pred`` is in window units."""
        self.output_dir = os.fspath(output_dir)
        self.pred_is_hu = bool(pred_is_hu)
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
                name = self._case(image if batched else img_b, b, engine)
                affine = item_affine(image if batched else img_b, b)
                self.write(name, img_b[0], pred_b[0], affine)

    @staticmethod
    def _case(image, index: int, engine: Engine) -> str:
        names = (getattr(image, "meta", {}) or {}).get("filename_or_obj")
        name = names[index] if isinstance(names, (list, tuple)) else names
        return case_id({"image": name}) if name else f"case_{engine.state.iteration:04d}_{index}"

    def write(self, name: str, image: torch.Tensor, pred: torch.Tensor, affine: np.ndarray) -> str:
        """Save one reconstruction (C dropped) and its previews; returns the NIfTI path."""
        to_hu = lambda t: self.window.from_unit(torch.as_tensor(t).detach().cpu().float().numpy())  # noqa: E731
        hu = torch.as_tensor(pred).detach().cpu().float().numpy() if self.pred_is_hu else to_hu(pred)
        recon = Volume(hu.astype(np.float32), affine)
        truth = Volume(to_hu(image).astype(np.float32), affine) if self.previews else None
        files = write_prediction(Prediction({"reconstruction": recon}, None, ()), self.output_dir, name,
                                 previews=self.previews, reference=truth, window=self.preview_window,
                                 reference_name="input")  # fmt: skip
        self.written.append(files["ct"])
        return files["ct"]
