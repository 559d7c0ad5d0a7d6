"""The VQ-GAN generator is MONAI's VQVAE; this adds the one variant the bundle tools need."""

from __future__ import annotations

import torch
from monai.networks.nets import VQVAE


class ReconstructionVQVAE(VQVAE):
    """VQVAE whose ``forward`` returns only the reconstruction.

    Same parameters (and state dict) as :class:`monai.networks.nets.VQVAE`, so checkpoints load into
    either. Inference, sliding windows, ``verify_net_in_out`` and TorchScript export want one tensor
    out; training wants the quantisation loss too and uses the plain VQVAE.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        quantizations, _ = self.quantize(self.encode(images))
        return self.decode(quantizations)


def downsampling_factor(net: VQVAE) -> int:
    """How many image voxels one latent voxel covers per axis (product of the encoder strides)."""
    factor = 1
    for block in net.encoder.blocks:
        conv = getattr(block, "conv", None)
        stride = getattr(conv, "stride", None) if conv is not None else None
        if stride is not None:
            factor *= int(stride[0] if isinstance(stride, tuple) else stride)
    return factor


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
