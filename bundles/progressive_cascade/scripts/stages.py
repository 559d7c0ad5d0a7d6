"""Stage switching: load the previous stage's best checkpoint, freeze earlier stages, name checkpoints."""

from __future__ import annotations

import logging
import os

import torch

from bundles.progressive_cascade.scripts.networks import ProgressiveCascade
from common.errors import InputError

logger = logging.getLogger(__name__)


def best_checkpoint(ckpt_dir: str, stage: int) -> str:
    """``<ckpt_dir>/stage<k>_model.pt`` (best by the validation key metric)."""
    return os.path.join(ckpt_dir, f"stage{stage}_model.pt")


def final_checkpoint(ckpt_dir: str, stage: int) -> str:
    return os.path.join(ckpt_dir, f"stage{stage}_final.pt")


def find_stage_checkpoint(ckpt_dir: str, stage: int) -> str:
    """Best checkpoint of ``stage``, else its final one; :class:`InputError` when neither exists."""
    for path in (best_checkpoint(ckpt_dir, stage), final_checkpoint(ckpt_dir, stage)):
        if os.path.isfile(path):
            return path
    raise InputError(
        best_checkpoint(ckpt_dir, stage), f"no checkpoint of stage {stage}: train stage {stage} first"
    )


def load_weights(network: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load ``{"model": state_dict}`` (or a bare state dict) into ``network`` (DDP-wrapped or not)."""
    if not os.path.isfile(path):
        raise InputError(path, "checkpoint not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    target = network.module if hasattr(network, "module") else network
    target.load_state_dict(state)
    return network


def prepare_stage(
    network: ProgressiveCascade, stage: int, ckpt_dir: str, previous_checkpoint: str | None = None
) -> ProgressiveCascade:
    """Activate ``stage``: for stage > 1 load the previous stage's checkpoint, then freeze earlier stages."""
    stage = int(stage)
    if stage > 1:
        path = previous_checkpoint or find_stage_checkpoint(ckpt_dir, stage - 1)
        load_weights(network, path)
        logger.info("stage %d: loaded stage %d weights from %s", stage, stage - 1, path)
    return network.set_stage(stage)


def trainable_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the active stage (the optimizer must not see frozen ones)."""
    return [p for p in network.parameters() if p.requires_grad]
