"""common.sliding_window: no seams, no scale errors, latent windows on the latent grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import reorder_atol

from common.sliding_window import LatentSlidingWindowInferer, aligned_stride, pad_to_windows


def identity(x: torch.Tensor) -> torch.Tensor:
    # a copy: MONAI scales the returned window in place, and a real network never returns a view of its input
    return x.clone()


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize(
    "size,roi,overlap",
    [((45, 37, 29), (16, 16, 16), 0.25), ((33, 20, 17), (16, 16, 8), 0.5), ((10, 7, 5), (16, 16, 16), 0.25)],
)
def test_identity_network_returns_input(mode, size, roi, overlap):
    torch.manual_seed(0)
    volume = torch.rand(1, 1, *size)
    out = LatentSlidingWindowInferer(roi, overlap=overlap, mode=mode)(volume, identity)
    assert out.shape == volume.shape
    # a weighted mean of <= 8 copies of each voxel (<= 2 windows per axis) and the normalisation: float32
    # sums of <= 8 terms of values < 1 (tests/numerics.py)
    torch.testing.assert_close(out, volume, rtol=0, atol=reorder_atol(1.0, 8, 2, torch.float32))


def test_aligned_stride_is_multiple_of_factor():
    assert aligned_stride(128, 0.25, 8) == 96
    assert aligned_stride(256, 0.25, 8) == 192
    assert aligned_stride(32, 0.3, 8) == 16  # 22.4 -> 16
    assert aligned_stride(16, 0.9, 8) == 8  # never below one latent voxel
    with pytest.raises(ValueError):
        aligned_stride(20, 0.25, 8)


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_latent_windows_lie_on_the_latent_grid(mode):
    """A local 'encoder' (8x average pool) and 'decoder' (8x nearest upsample) are exact when windows align."""
    torch.manual_seed(1)
    volume = torch.rand(1, 1, 45, 37, 29)
    padded, size = pad_to_windows(volume, (16, 16, 16), 8)
    assert padded.shape[2:] == (48, 40, 32) and size == (45, 37, 29)
    inferer = LatentSlidingWindowInferer((16, 16, 16), factor=8, overlap=0.25, mode=mode)
    latent = inferer.encode(volume, lambda x: F.avg_pool3d(x, 8))
    # 8^3 = 512-term means of values < 1 (in whichever order the kernel sums), then <= 8 windows blended
    atol = reorder_atol(1.0, 512, 2, torch.float32)
    torch.testing.assert_close(latent, F.avg_pool3d(padded, 8), rtol=0, atol=atol)
    image = inferer.decode(latent, lambda z: F.interpolate(z, scale_factor=8, mode="nearest"), size)
    expected = F.interpolate(F.avg_pool3d(padded, 8), scale_factor=8, mode="nearest")[..., :45, :37, :29]
    torch.testing.assert_close(image, expected, rtol=0, atol=atol)


def test_inferer_factor_is_checked():
    inferer = LatentSlidingWindowInferer((16, 16, 16), factor=8)
    with pytest.raises(ValueError, match="differs"):
        inferer.encode(torch.rand(1, 1, 16, 16, 16), lambda x: F.avg_pool3d(x, 4), factor=4)
    with pytest.raises(ValueError, match="unknown"):
        LatentSlidingWindowInferer((16, 16, 16)).encode(torch.rand(1, 1, 16, 16, 16), lambda x: x)
    with pytest.raises(ValueError, match="multiple"):
        LatentSlidingWindowInferer((20, 16, 16), factor=8).encode(torch.rand(1, 1, 20, 16, 16), lambda x: x)
