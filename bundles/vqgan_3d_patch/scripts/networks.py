"""The VQ-GAN generator is MONAI's VQVAE; this adds the one variant the bundle tools need."""

from __future__ import annotations

import torch
from monai.networks.nets import VQVAE


class ReconstructionVQVAE(VQVAE):
    """VQVAE whose ``forward`` returns only the reconstruction.

    Same parameters (and state dict) as :class:`monai.networks.nets.VQVAE`, so checkpoints load into
    either (their records name ``VQVAE``; :mod:`common.checkpoint` accepts the subclass). Inference,
    ``verify_net_in_out`` and TorchScript export want one tensor out; training wants the quantisation loss
    too and uses the plain VQVAE. Whole volumes go through :mod:`common.codec`.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        quantizations, _ = self.quantize(self.encode(images))
        return self.decode(quantizations)


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
