"""Whole-volume API of the VQ-GAN: reconstruct, encode to latents, decode latents (used by latent diffusion).

Every path runs the network on overlapping windows (MONAI ``SlidingWindowInferer``, default 256x256x128
with 25% overlap, gaussian or constant blending; ``sw_device`` runs the windows, e.g. on the GPU, while
``device`` holds the whole-volume accumulators, e.g. in host memory for 512x512x600 volumes).

Latent-space windows (see :mod:`common.sliding_window`): encoding pads the volume (replicate, far end) to
a multiple of the downsampling factor ``f`` (8 for three levels), snaps the stride to a multiple of ``f``
and blends the *continuous* encoder outputs of the windows on the latent grid; the blended latent is then
quantised once, so every latent voxel has exactly one code. Decoding uses the same windows seen from the
latent grid (window ``roi / f``, stride ``stride / f``) and blends the decoded image windows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch
from monai.inferers import Inferer
from monai.networks.nets import VQVAE
from monai.utils import convert_to_tensor

from bundles.vqgan_3d_patch.scripts.networks import ReconstructionVQVAE, downsampling_factor
from common.errors import InputError, require_file
from common.sliding_window import sliding_window_decode, sliding_window_encode, sliding_window_same_size

DEFAULT_ROI = (256, 256, 128)


@dataclasses.dataclass
class Latents:
    """A volume's latent: code indices (B, X', Y', Z'), quantised latents (B, D, X', Y', Z'), geometry."""

    indices: torch.Tensor
    quantized: torch.Tensor
    continuous: torch.Tensor  # blended encoder output before quantisation
    factor: int
    image_size: tuple[int, ...]


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The network inside DistributedDataParallel / DataParallel wrappers."""
    return getattr(net, "module", net)


def load_vqgan(
    checkpoint: str | os.PathLike,
    network_def: torch.nn.Module | Mapping | str | os.PathLike,
    device: str | torch.device = "cpu",
) -> VQVAE:
    """Build the network and load a ``{"model": state_dict}`` (or bare state dict) checkpoint; eval mode.

    ``network_def``: a module, VQVAE keyword arguments, or a bundle config file with a ``network_def``.
    """
    if isinstance(network_def, torch.nn.Module):
        net = network_def
    elif isinstance(network_def, Mapping):
        net = ReconstructionVQVAE(**{k: v for k, v in network_def.items() if k != "_target_"})
    else:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(require_file(network_def))
        net = parser.get_parsed_content("network_def")
    state = torch.load(require_file(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "model" in state:
        state = state["model"]
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(checkpoint, f"checkpoint does not match the network definition ({e})") from e
    return net.to(device).eval()


def _check_volume(volume: torch.Tensor) -> None:
    if volume.ndim != 5:
        raise InputError(None, f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(volume.shape)}")
    if not torch.isfinite(volume).all():
        raise InputError(None, "volume contains NaN or infinite values")


def _reconstruction_fn(net: torch.nn.Module):
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    return fn


@torch.no_grad()
def reconstruct_volume(
    net: torch.nn.Module,
    volume: torch.Tensor,
    roi: Sequence[int] = DEFAULT_ROI,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Encode, quantise and decode each window, blend the windows: (B, 1, X, Y, Z) -> same shape."""
    _check_volume(volume)
    return sliding_window_same_size(
        _reconstruction_fn(net), volume, roi, overlap, mode, sw_batch_size, sw_device, device, progress
    )


@torch.no_grad()
def encode_volume(
    net: torch.nn.Module,
    volume: torch.Tensor,
    roi: Sequence[int] = DEFAULT_ROI,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Latents:
    """Volume (B, 1, X, Y, Z) in the network's intensity scale -> :class:`Latents` of ``ceil(size / f)``."""
    _check_volume(volume)
    vq = unwrap(net)
    factor = downsampling_factor(vq)
    z = sliding_window_encode(
        vq.encode, volume, roi, factor, overlap, mode, sw_batch_size, sw_device, device, progress
    )
    z = convert_to_tensor(z, track_meta=False)
    # EMAQuantizer.quantize is the side-effect-free nearest-code lookup (its forward updates the EMA in training)
    indices = vq.quantizer.quantizer.quantize(z.to(next(vq.parameters()).device))[2]
    quantized = vq.quantizer.embed(indices)
    return Latents(indices, quantized.to(z.device), z, factor, tuple(int(s) for s in volume.shape[2:]))


@torch.no_grad()
def decode_latents(
    net: torch.nn.Module,
    latents: Latents | torch.Tensor,
    roi: Sequence[int] = DEFAULT_ROI,
    overlap: float = 0.25,
    mode: str = "gaussian",
    out_size: Sequence[int] | None = None,
    requantize: bool = False,
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Latents -> volume (B, 1, X, Y, Z). ``roi`` is in image voxels, as for :func:`encode_volume`.

    ``latents``: a :class:`Latents`, integer code indices (B, X', Y', Z'), or float latents (B, D, X', Y', Z')
    (e.g. sampled by a diffusion model; ``requantize`` snaps them to the nearest codes first).
    """
    vq = unwrap(net)
    factor = downsampling_factor(vq)
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
    return sliding_window_decode(
        vq.decode, z, roi, factor, overlap, mode, out_size, sw_batch_size, sw_device, device, progress
    )


class VQGANSlidingWindowInferer(Inferer):
    """MONAI ``Inferer`` for engines: whole-volume reconstruction by windows, clipped to ``clip`` (or not)."""

    def __init__(
        self,
        roi_size: Sequence[int] = DEFAULT_ROI,
        overlap: float = 0.25,
        mode: str = "gaussian",
        sw_batch_size: int = 1,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        clip: tuple[float, float] | None = (0.0, 1.0),
        progress: bool = False,
    ):
        super().__init__()
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = overlap
        self.mode = mode
        self.sw_batch_size = sw_batch_size
        self.sw_device = sw_device
        self.device = device
        self.clip = clip
        self.progress = progress

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        out = reconstruct_volume(
            network,
            inputs,
            self.roi_size,
            self.overlap,
            self.mode,
            self.sw_batch_size,
            self.sw_device,
            self.device,
            self.progress,
        )
        return out.clamp(*self.clip) if self.clip is not None else out

    def encode(self, inputs: torch.Tensor, network) -> Latents:
        """The volume's latents with the same windows (used for codebook statistics)."""
        return encode_volume(
            network,
            inputs,
            self.roi_size,
            self.overlap,
            self.mode,
            self.sw_batch_size,
            self.sw_device,
            self.device,
        )
