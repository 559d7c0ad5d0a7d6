"""Whole-volume evaluation: MONAI's SupervisedEvaluator plus the code indices of each volume.

The reconstruction comes from the evaluator's inferer (sliding windows over the whole volume). Codebook
usage and perplexity must count each latent voxel once, so the indices come from the volume's blended
latent (:func:`codec.encode_volume`, same windows) rather than from the overlapping reconstruction windows.
"""

from __future__ import annotations

import torch
from monai.engines import SupervisedEvaluator

from common.codec import VQGANSlidingWindowInferer


class VQGANEvaluator(SupervisedEvaluator):
    """SupervisedEvaluator whose output also holds ``indices`` (B, X', Y', Z') for codebook metrics."""

    def _iteration(self, engine: VQGANEvaluator, batchdata: dict) -> dict:
        output = super()._iteration(engine, batchdata)
        if not isinstance(engine.inferer, VQGANSlidingWindowInferer):
            raise TypeError(
                "VQGANEvaluator needs a VQGANSlidingWindowInferer (its windows define the latent)"
            )
        with torch.no_grad():
            output["indices"] = engine.inferer.encode(output["image"], engine.network).indices
        return output
