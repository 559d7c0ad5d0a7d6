"""The VQ-GAN generator is MONAI's VQVAE; this adds the one variant the bundle tools need.

No ``from __future__ import annotations`` here: TorchScript cannot resolve string annotations.
"""

import torch
from monai.networks.layers.vector_quantizer import EMAQuantizer
from monai.networks.nets import VQVAE


class ScriptableEMAQuantizer(EMAQuantizer):
    """MONAI's ``EMAQuantizer`` whose DDP codebook synchronisation is left out of TorchScript.

    MONAI's docstring says ``distributed_synchronization`` bypasses TorchScript with ``torch.jit.unused``
    but 1.6.1 does not decorate it, so scripting any VQVAE fails on ``torch.distributed``. Same state,
    same eager behaviour (training still synchronises under DDP); a scripted module never trains.
    """

    @torch.jit.unused
    def distributed_synchronization(self, encodings_sum: torch.Tensor, dw: torch.Tensor) -> None:
        super().distributed_synchronization(encodings_sum, dw)


class ReconstructionVQVAE(VQVAE):
    """VQVAE whose ``forward`` returns only the reconstruction, and which TorchScript can compile.

    Same parameters (and state dict) as :class:`monai.networks.nets.VQVAE`, so checkpoints load into
    either (their records name ``VQVAE``; :mod:`common.checkpoint` accepts the subclass). Inference,
    ``verify_net_in_out`` and TorchScript export (``ckpt_export``, script mode) want one tensor out;
    training wants the quantisation loss too and uses the plain VQVAE. Whole volumes go through
    :mod:`common.codec`. ``forward`` calls the encoder, quantizer and decoder directly: MONAI's
    ``encode``/``decode`` (activation checkpointing, of no use without gradients) do not script.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.quantizer.quantizer.__class__ = ScriptableEMAQuantizer  # a subclass without new state

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, 1, X, Y, Z), sides multiples of 8 -> reconstruction of the same shape."""
        _, quantized = self.quantizer(self.encoder(images))
        return self.decoder(quantized)


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
