"""The VQ-GAN's losses beyond L1: the patch-GAN terms and an optional perceptual loss.

MONAI's ``PatchDiscriminator`` returns its intermediate features and, last, the patch logits;
``PatchAdversarialLoss`` scores the logits: :func:`generator_adversarial_loss` and
:func:`discriminator_loss` are the two halves of one GAN step (any generator). The perceptual loss is MONAI's
``PerceptualLoss`` from a local weights file only (it downloads otherwise).
"""

from __future__ import annotations

import os

import torch
from monai.losses import PatchAdversarialLoss

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

def patch_logits(discriminator: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The discriminator's last output (patch logits), whether it returns a list of features or a tensor."""
    out = discriminator(images.contiguous())
    return out[-1] if isinstance(out, (list, tuple)) else out


def generator_adversarial_loss(
    discriminator: torch.nn.Module, adv_loss: PatchAdversarialLoss, fake: torch.Tensor
) -> torch.Tensor:
    """The generator's term: make the discriminator call ``fake`` real (gradients flow into the generator)."""
    return adv_loss(patch_logits(discriminator, fake), target_is_real=True, for_discriminator=False)


def discriminator_loss(
    discriminator: torch.nn.Module, adv_loss: PatchAdversarialLoss, real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """The discriminator's loss: mean of its real and fake terms (``fake`` is detached here)."""
    loss_fake = adv_loss(
        patch_logits(discriminator, fake.detach()), target_is_real=False, for_discriminator=True
    )
    loss_real = adv_loss(patch_logits(discriminator, real), target_is_real=True, for_discriminator=True)
    return 0.5 * (loss_fake + loss_real)
