"""PerX2CT's training loss: L1 on the decoded slices, plus an optional perceptual term.

The paper trains with the VQGAN loss with its discriminator and codebook weights set to 0, i.e.
L1 + LPIPS. LPIPS needs pretrained weights; we never download at run time, so the perceptual term is
MONAI's ``PerceptualLoss`` loaded from a local file (``pretrained_path``) and is off by default.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from monai.losses import PerceptualLoss

from common.errors import InputError


class ReconstructionLoss(nn.Module):
    """``L1(pred, target) + perceptual_weight * Perceptual(pred, target)`` on (B, K, H, W) slices."""

    def __init__(
        self,
        perceptual_weight: float = 0.0,
        network_type: str = "resnet50",
        pretrained_path: str | None = None,
    ):
        super().__init__()
        self.l1 = nn.L1Loss()
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual = None
        if self.perceptual_weight > 0:
            if not pretrained_path or not os.path.exists(pretrained_path):
                raise InputError(pretrained_path, "perceptual loss needs a local pretrained weights file")
            self.perceptual = PerceptualLoss(
                spatial_dims=2, network_type=network_type, pretrained=True, pretrained_path=pretrained_path
            )
            self.perceptual.requires_grad_(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.l1(pred, target)
        if self.perceptual is not None:
            flat = (pred.reshape(-1, 1, *pred.shape[-2:]), target.reshape(-1, 1, *target.shape[-2:]))
            loss = loss + self.perceptual_weight * self.perceptual(*flat)
        return loss
