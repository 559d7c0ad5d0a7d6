"""The adversarial terms of a patch-GAN, kept generic (any generator, any MONAI PatchDiscriminator).

MONAI's ``PatchDiscriminator`` returns its intermediate features and, last, the patch logits;
``PatchAdversarialLoss`` scores the logits. These helpers are the two halves of one GAN step.
"""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss


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
