"""common.codec: the VQ-GAN as a whole-volume codec (encode, decode, the latent path, loading)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import VQVAE
from numerics import network_atol

from common.checkpoint import CheckpointRecord, build_network
from common.codec import (
    CodecInferer,
    decode_latents,
    encode_volume,
    latent_factor,
    load_vqgan,
    reconstruct_per_window,
    reconstruct_volume,
)
from common.errors import InputError
from common.sliding_window import LatentSlidingWindowInferer

TINY = dict(
    spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 4, 8), num_res_channels=4, num_res_layers=1,
    num_embeddings=16, embedding_dim=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_vqgan() -> VQVAE:
    torch.manual_seed(0)
    return build_network("VQVAE", **TINY).eval()


def windows(roi=(16, 16, 16), overlap=0.25) -> LatentSlidingWindowInferer:
    return LatentSlidingWindowInferer(roi, overlap=overlap)


@pytest.mark.numerics
def test_codec_single_window_matches_network(tiny_vqgan):
    """A volume of one window: encode -> decode equals the network's own forward pass."""
    torch.manual_seed(2)
    volume = torch.rand(1, 1, 16, 16, 16)
    latents = encode_volume(tiny_vqgan, volume, windows())
    assert latent_factor(tiny_vqgan) == 8
    assert latents.indices.shape == (1, 2, 2, 2) and latents.quantized.shape == (1, 4, 2, 2, 2)
    assert latents.indices.dtype == torch.int64 and int(latents.indices.max()) < 16
    with torch.no_grad():
        direct = tiny_vqgan(volume)[0]
        codes = tiny_vqgan.index_quantize(volume)
    torch.testing.assert_close(latents.indices, codes)
    atol = network_atol(tiny_vqgan, direct, torch.float32)  # float32 reorderings (tests/numerics.py)
    torch.testing.assert_close(decode_latents(tiny_vqgan, latents, windows()), direct, rtol=0, atol=atol)
    # the three latent forms decode to the same volume
    from_indices = decode_latents(tiny_vqgan, latents.indices, windows())
    torch.testing.assert_close(from_indices, direct, rtol=0, atol=atol)
    for recon in (reconstruct_volume(tiny_vqgan, volume, windows()), reconstruct_per_window(tiny_vqgan, volume, windows())):
        torch.testing.assert_close(recon, direct, rtol=0, atol=atol)


def test_codec_whole_volume_shapes(tiny_vqgan):
    volume = torch.rand(1, 1, 41, 24, 19)
    latents = encode_volume(tiny_vqgan, volume, windows())
    assert latents.indices.shape == (1, 6, 3, 3) and latents.image_size == (41, 24, 19)
    out = decode_latents(tiny_vqgan, latents, windows())
    assert out.shape == volume.shape and torch.isfinite(out).all()
    assert reconstruct_volume(tiny_vqgan, volume, windows()).shape == volume.shape


def test_codec_rejects_bad_input(tiny_vqgan):
    with pytest.raises(InputError, match="NaN"):
        reconstruct_volume(tiny_vqgan, torch.full((1, 1, 16, 16, 16), float("nan")), windows())
    with pytest.raises(InputError, match="expected"):
        encode_volume(tiny_vqgan, torch.rand(16, 16, 16), windows())
    with pytest.raises(InputError, match="latents"):
        decode_latents(tiny_vqgan, torch.rand(1, 3, 2, 2, 2), windows())


def test_codec_inferer_runs_the_latent_path(tiny_vqgan):
    """With overlapping windows the latent path (one quantisation of the blended latent) is what a latent model
    decodes and what the inferer returns; the per-window path (each window quantised alone) is a comparison."""
    torch.manual_seed(3)
    volume = torch.rand(1, 1, 40, 24, 24)
    inferer = CodecInferer((16, 16, 16), overlap=0.5, clip=None)
    latent_path = inferer(volume, tiny_vqgan)
    expected = decode_latents(tiny_vqgan, encode_volume(tiny_vqgan, volume, inferer), inferer)
    torch.testing.assert_close(latent_path, expected)
    assert latent_path.shape == inferer.per_window(volume, tiny_vqgan).shape == volume.shape
    assert inferer.latents(volume, tiny_vqgan).indices.shape == (1, 5, 3, 3)
    torch.testing.assert_close(inferer.last_latents.indices, inferer.latents(volume, tiny_vqgan).indices)


def test_load_vqgan_from_its_record(tiny_vqgan, tmp_path):
    """A checkpoint with a record rebuilds the codec alone; a contradicting definition is refused."""
    path = tmp_path / "vqgan.pt"
    record = CheckpointRecord("vqgan_3d_patch", network=tiny_vqgan)
    torch.save({"model": tiny_vqgan.state_dict(), "record": record.state_dict()}, path)
    loaded = load_vqgan(path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    volume = torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(reconstruct_volume(loaded, volume, windows()), reconstruct_volume(tiny_vqgan, volume, windows()))
    with pytest.raises(InputError, match="embedding_dim"):
        load_vqgan(path, {"_target_": "VQVAE", **{**TINY, "embedding_dim": 8}})
    bare = tmp_path / "bare.pt"
    torch.save({"model": tiny_vqgan.state_dict()}, bare)
    with pytest.warns(UserWarning, match="no record"):
        load_vqgan(bare, {"_target_": "VQVAE", **TINY})
    with pytest.raises(InputError, match="no record"):
        load_vqgan(bare)
