"""The VQ-GAN as a whole-volume codec: load, encode to latents, decode latents, latent factor.

Used by vqgan_3d_patch (evaluation, inference) and latent_ddpm (latent cache, sampling), so neither bundle
imports the other. The network is MONAI's ``VQVAE`` (or a subclass with the same parameters); the windows
are one :class:`common.sliding_window.LatentSlidingWindowInferer` (default 256x256x128, 25 % overlap,
gaussian blending; ``sw_device`` runs the windows, e.g. on the GPU, ``device`` holds the whole-volume
accumulators, e.g. in host memory for 512x512x600 volumes).

Encoding pads the volume to a multiple of the latent factor ``f`` (8 for three stride-2 levels), snaps the
stride to a multiple of ``f`` and blends the *continuous* encoder outputs on the latent grid; the blended
latent is quantised once, so every latent voxel has exactly one code. Decoding uses the same windows seen
from the latent grid. :func:`reconstruct_volume` is that path (blend -> quantise -> windowed decode): what a
latent model decodes, and what the VQ-GAN is evaluated on. :func:`reconstruct_per_window` (each window
encoded, quantised and decoded on its own, then blended) is only a comparison.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import VQVAE
from monai.utils import convert_to_tensor

from common.checkpoint import build_from_checkpoint, file_sha256, read_record, unwrap
from common.errors import InputError, require_file
from common.sliding_window import LatentSlidingWindowInferer

DEFAULT_ROI = (256, 256, 128)
VQGAN_BUNDLE = "vqgan_3d_patch"


@dataclasses.dataclass
class Latents:
    """A volume's latent: code indices (B, X', Y', Z'), quantised latents (B, D, X', Y', Z'), geometry."""

    indices: torch.Tensor
    quantized: torch.Tensor
    continuous: torch.Tensor  # blended encoder output before quantisation
    factor: int
    image_size: tuple[int, ...]


def latent_factor(network: torch.nn.Module) -> int:
    """Image voxels per latent voxel along each axis (the product of the encoder's strides)."""
    factor = 1
    for block in unwrap(network).encoder.blocks:
        conv = getattr(block, "conv", None)
        stride = getattr(conv, "stride", None) if conv is not None else None
        if stride is not None:
            factor *= int(stride[0] if isinstance(stride, tuple) else stride)
    return factor


def load_vqgan(
    checkpoint: str | os.PathLike,
    network_def: Mapping | torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
    expected_bundle: str | None = VQGAN_BUNDLE,
) -> VQVAE:
    """The trained VQ-GAN, eval mode, gradients off (a codec is never trained by its users).

    Built from the checkpoint's record (:mod:`common.checkpoint`); ``network_def`` (VQVAE arguments with a
    ``_target_``, or a built network) is the fallback for checkpoints without a record and must agree with
    a record when both exist.
    """
    network, _ = build_from_checkpoint(checkpoint, expected_bundle, network_def, device)
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def codec_fingerprint(checkpoint: str | os.PathLike) -> dict:
    """What identifies a VQ-GAN checkpoint in a latent cache: its absolute path, sha256 and record."""

    path = os.path.abspath(require_file(checkpoint))
    return {"checkpoint": path, "sha256": file_sha256(path), "record": read_record(path)}


def _check_volume(volume: torch.Tensor) -> None:
    if volume.ndim != 5:
        raise InputError(None, f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(volume.shape)}")
    if not torch.isfinite(volume).all():
        raise InputError(None, "volume contains NaN or infinite values")


def _reconstruction(network: torch.nn.Module):
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = network(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    return fn


def _inferer(inferer: LatentSlidingWindowInferer | None) -> LatentSlidingWindowInferer:
    return inferer if inferer is not None else LatentSlidingWindowInferer(DEFAULT_ROI)


@torch.no_grad()
def encode_volume(
    network: torch.nn.Module, volume: torch.Tensor, inferer: LatentSlidingWindowInferer | None = None
) -> Latents:
    """Volume (B, 1, X, Y, Z) in the network's intensity scale -> :class:`Latents` of ``ceil(size / f)``."""
    _check_volume(volume)
    vq = unwrap(network)
    factor = latent_factor(vq)
    z = convert_to_tensor(_inferer(inferer).encode(volume, vq.encode, factor), track_meta=False)
    # EMAQuantizer.quantize is the side-effect-free nearest-code lookup (its forward updates the EMA in training)
    indices = vq.quantizer.quantizer.quantize(z.to(next(vq.parameters()).device))[2]
    quantized = vq.quantizer.embed(indices)
    return Latents(indices, quantized.to(z.device), z, factor, tuple(int(s) for s in volume.shape[2:]))


@torch.no_grad()
def decode_latents(
    network: torch.nn.Module,
    latents: Latents | torch.Tensor,
    inferer: LatentSlidingWindowInferer | None = None,
    out_size: Sequence[int] | None = None,
    requantize: bool = False,
) -> torch.Tensor:
    """Latents -> volume (B, 1, X, Y, Z) with the windows of ``inferer`` (in image voxels, as for encoding).

    ``latents``: a :class:`Latents`, integer code indices (B, X', Y', Z'), or float latents (B, D, X', Y', Z')
    (e.g. sampled by a diffusion model; ``requantize`` snaps them to the nearest codes first).
    """
    vq = unwrap(network)
    factor = latent_factor(vq)
    if isinstance(latents, Latents):
        out_size = latents.image_size if out_size is None else out_size
        z = latents.quantized
    elif not torch.is_floating_point(latents):
        z = vq.quantizer.embed(latents.long())
    else:
        z = latents
        if requantize:
            z = vq.quantizer.embed(vq.quantizer.quantizer.quantize(z)[2])
    if z.ndim != 5 or z.shape[1] != vq.embedding_dim:
        raise InputError(
            None, f"expected latents (B, {vq.embedding_dim}, X, Y, Z), got shape {tuple(z.shape)}"
        )
    return _inferer(inferer).decode(z, vq.decode, out_size, factor)


@torch.no_grad()
def reconstruct_volume(
    network: torch.nn.Module, volume: torch.Tensor, inferer: LatentSlidingWindowInferer | None = None
) -> torch.Tensor:
    """The latent path: blended encoding, one quantisation, windowed decoding; (B, 1, X, Y, Z) -> same shape."""
    inferer = _inferer(inferer)
    return decode_latents(network, encode_volume(network, volume, inferer), inferer)


@torch.no_grad()
def reconstruct_per_window(
    network: torch.nn.Module, volume: torch.Tensor, inferer: LatentSlidingWindowInferer | None = None
) -> torch.Tensor:
    """Each window encoded, quantised and decoded on its own, the reconstructions blended (comparison only)."""
    _check_volume(volume)
    return SlidingWindowInferer.__call__(_inferer(inferer), volume, _reconstruction(network))


class CodecInferer(LatentSlidingWindowInferer):
    """MONAI ``Inferer`` for engines: ``inferer(volume, network)`` = :func:`reconstruct_volume`, clipped.

    Same arguments as :class:`LatentSlidingWindowInferer` (the factor is read from the network) plus
    ``clip`` (default (0, 1), the network's intensity range; None keeps the raw decoder output).
    """

    def __init__(self, roi_size: Sequence[int] | int = DEFAULT_ROI, clip: Sequence[float] | None = (0.0, 1.0), **kwargs):
        super().__init__(roi_size, **kwargs)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.last_latents: Latents | None = None  # of the latest call (its indices give codebook statistics)

    def _clip(self, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(*self.clip) if self.clip is not None else out

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        self.last_latents = encode_volume(network, inputs, self)
        return self._clip(decode_latents(network, self.last_latents, self))

    def latents(self, inputs: torch.Tensor, network) -> Latents:
        """The volume's latents with the same windows (its code indices give the codebook statistics)."""
        return encode_volume(network, inputs, self)

    def per_window(self, inputs: torch.Tensor, network) -> torch.Tensor:
        """:func:`reconstruct_per_window` with these windows, clipped."""
        return self._clip(reconstruct_per_window(network, inputs, self))
