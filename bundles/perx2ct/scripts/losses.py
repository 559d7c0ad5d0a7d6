"""PerX2CT's training loss: L1 on the decoded slices, plus optional squared-error and perceptual terms.

The paper trains with the VQGAN loss with its discriminator and codebook weights set to 0, i.e.
L1 + LPIPS. LPIPS needs pretrained weights; we never download at run time, so the perceptual term is
MONAI's ``PerceptualLoss`` loaded from a local file (``pretrained_path``) and is off by default.

``l2_weight`` (not in the paper, 0 by default) adds the mean squared error. Why: started from the mean-CT
prior, L1's gradient is ``sign(error)`` per voxel, so the many voxels the prior already gets nearly right
(texture noise of a few HU) push as hard as the few it gets wrong by hundreds of HU (the body outline, lung
edges); squared error weights each voxel by its error, which is what PSNR (a squared-error figure) scores.
``configs/cpu_64.json`` uses it (docs/LEARNING.md, "The 64^3 cohort").
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from monai.losses import PerceptualLoss

from common.errors import InputError


class ReconstructionLoss(nn.Module):
    """``l1_weight * L1 + l2_weight * MSE + perceptual_weight * Perceptual`` on (B, K, H, W) slices in [0, 1]."""

    def __init__(
        self,
        perceptual_weight: float = 0.0,
        network_type: str = "resnet50",
        pretrained_path: str | None = None,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
    ):
        super().__init__()
        self.l1 = nn.L1Loss()
        self.l1_weight, self.l2_weight = float(l1_weight), float(l2_weight)
        if self.l1_weight < 0 or self.l2_weight < 0 or self.l1_weight + self.l2_weight <= 0:
            raise ValueError(f"l1_weight {l1_weight} and l2_weight {l2_weight} must be >= 0, not both 0")
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
        loss = self.l1_weight * self.l1(pred, target) if self.l1_weight else pred.new_zeros(())
        if self.l2_weight:
            loss = loss + self.l2_weight * torch.mean((pred - target) ** 2)
        if self.perceptual is not None:
            flat = (pred.reshape(-1, 1, *pred.shape[-2:]), target.reshape(-1, 1, *target.shape[-2:]))
            loss = loss + self.perceptual_weight * self.perceptual(*flat)
        return loss
