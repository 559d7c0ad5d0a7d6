"""Optional perceptual loss, only from a local weights file (MONAI's PerceptualLoss downloads otherwise)."""

from __future__ import annotations

import os

import torch

from common.errors import InputError, require_file


def local_perceptual_loss(weights_path: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """MONAI ``PerceptualLoss`` (torchvision ResNet-50, 2.5D over the three axes) from local weights.

    MONAI loads a weights *file* only for ``network_type="resnet50"``; every other type goes to a hub.
    Needs torchvision (not a dependency of this project: install it pinned to the torch version to use this).
    """
    if not weights_path:
        raise InputError(
            None, "perceptual loss needs a local weights file (perceptual_weights_path); none given"
        )
    path = require_file(weights_path)
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        raise InputError(
            path, "the resnet50 perceptual loss needs torchvision, which is not installed"
        ) from e
    from monai.losses import PerceptualLoss

    loss = PerceptualLoss(
        spatial_dims=3,
        network_type="resnet50",
        is_fake_3d=True,
        fake_3d_ratio=0.25,
        pretrained=True,
        pretrained_path=path,
    )
    return loss.to(device).eval()
