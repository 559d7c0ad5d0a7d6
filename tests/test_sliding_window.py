"""Sliding-window geometry of the VQ-GAN codec: no seams, no scale errors, latent windows on the latent grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bundles.vqgan_3d_patch.scripts.networks import ReconstructionVQVAE, downsampling_factor
from common.codec import decode_latents, encode_volume, reconstruct_volume
from common.errors import InputError
from common.sliding_window import (
    aligned_stride,
    pad_to_windows,
    sliding_window_decode,
    sliding_window_encode,
    sliding_window_same_size,
)


def identity(x: torch.Tensor) -> torch.Tensor:
    # a copy: MONAI scales the returned window in place, and a real network never returns a view of its input
    return x.clone()


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize(
    "size,roi,overlap",
    [((45, 37, 29), (16, 16, 16), 0.25), ((33, 20, 17), (16, 16, 8), 0.5), ((10, 7, 5), (16, 16, 16), 0.25)],
)
def test_identity_network_returns_input(mode, size, roi, overlap):
    torch.manual_seed(0)
    volume = torch.rand(1, 1, *size)
    out = sliding_window_same_size(identity, volume, roi, overlap, mode)
    assert out.shape == volume.shape
    torch.testing.assert_close(out, volume, rtol=0, atol=2e-6)


def test_aligned_stride_is_multiple_of_factor():
    assert aligned_stride(128, 0.25, 8) == 96
    assert aligned_stride(256, 0.25, 8) == 192
    assert aligned_stride(32, 0.3, 8) == 16  # 22.4 -> 16
    assert aligned_stride(16, 0.9, 8) == 8  # never below one latent voxel
    with pytest.raises(ValueError):
        aligned_stride(20, 0.25, 8)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_latent_windows_lie_on_the_latent_grid(mode):
    """A local 'encoder' (8x average pool) and 'decoder' (8x nearest upsample) are exact when windows align."""
    torch.manual_seed(1)
    volume = torch.rand(1, 1, 45, 37, 29)
    padded, size = pad_to_windows(volume, (16, 16, 16), 8)
    assert padded.shape[2:] == (48, 40, 32) and size == (45, 37, 29)
    latent = sliding_window_encode(lambda x: F.avg_pool3d(x, 8), volume, (16, 16, 16), 8, 0.25, mode)
    torch.testing.assert_close(latent, F.avg_pool3d(padded, 8), rtol=0, atol=1e-6)
    image = sliding_window_decode(
        lambda z: F.interpolate(z, scale_factor=8, mode="nearest"), latent, (16, 16, 16), 8, 0.25, mode, size
    )
    expected = F.interpolate(F.avg_pool3d(padded, 8), scale_factor=8, mode="nearest")[..., :45, :37, :29]
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_vqgan() -> ReconstructionVQVAE:
    torch.manual_seed(0)
    net = ReconstructionVQVAE(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(4, 4, 8),
        num_res_channels=4,
        num_res_layers=1,
        num_embeddings=16,
        embedding_dim=4,
    )
    return net.eval()


def test_codec_single_window_matches_network(tiny_vqgan):
    """A volume of one window: encode -> decode equals the network's own forward pass."""
    torch.manual_seed(2)
    volume = torch.rand(1, 1, 16, 16, 16)
    latents = encode_volume(tiny_vqgan, volume, roi=(16, 16, 16))
    assert downsampling_factor(tiny_vqgan) == 8
    assert latents.indices.shape == (1, 2, 2, 2) and latents.quantized.shape == (1, 4, 2, 2, 2)
    assert latents.indices.dtype == torch.int64 and int(latents.indices.max()) < 16
    with torch.no_grad():
        direct = tiny_vqgan(volume)
        codes = tiny_vqgan.index_quantize(volume)
    torch.testing.assert_close(latents.indices, codes)
    torch.testing.assert_close(
        decode_latents(tiny_vqgan, latents, roi=(16, 16, 16)), direct, rtol=0, atol=1e-5
    )
    # the three latent forms decode to the same volume
    from_indices = decode_latents(tiny_vqgan, latents.indices, roi=(16, 16, 16))
    torch.testing.assert_close(from_indices, direct, rtol=0, atol=1e-5)
    recon = reconstruct_volume(tiny_vqgan, volume, roi=(16, 16, 16))
    torch.testing.assert_close(recon, direct, rtol=0, atol=1e-5)


def test_codec_whole_volume_shapes(tiny_vqgan):
    volume = torch.rand(1, 1, 41, 24, 19)
    latents = encode_volume(tiny_vqgan, volume, roi=(16, 16, 16), overlap=0.25)
    assert latents.indices.shape == (1, 6, 3, 3) and latents.image_size == (41, 24, 19)
    out = decode_latents(tiny_vqgan, latents, roi=(16, 16, 16), overlap=0.25)
    assert out.shape == volume.shape and torch.isfinite(out).all()
    assert reconstruct_volume(tiny_vqgan, volume, roi=(16, 16, 16)).shape == volume.shape


def test_codec_rejects_bad_input(tiny_vqgan):
    with pytest.raises(InputError, match="NaN"):
        reconstruct_volume(tiny_vqgan, torch.full((1, 1, 16, 16, 16), float("nan")), roi=(16, 16, 16))
    with pytest.raises(InputError, match="expected"):
        encode_volume(tiny_vqgan, torch.rand(16, 16, 16), roi=(16, 16, 16))
    with pytest.raises(InputError, match="latents"):
        decode_latents(tiny_vqgan, torch.rand(1, 3, 2, 2, 2), roi=(16, 16, 16))
