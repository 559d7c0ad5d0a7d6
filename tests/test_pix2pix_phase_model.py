"""pix2pix_phase networks, slice dataset and conditional-GAN trainer (a tiny generator must learn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundles.pix2pix_phase.scripts.data import PairBatch, VolumeSliceDataset, pad_slices_collate
from bundles.pix2pix_phase.scripts.engines import ConditionalGanTrainer
from bundles.pix2pix_phase.scripts.networks import (
    PhaseGenerator,
    conditional_patch_discriminator,
    count_downsamplings,
    unet_channels,
)
from common.errors import InputError
from common.intensity import XRAY2CT
from common.io import save_volume
from common.metrics import psnr
from common.volume import Volume


@pytest.mark.parametrize(
    "size, expected", [(64, 5), (96, 5), (128, 6), (192, 6), (256, 7), (512, 8), ((256, 128), 6), (1024, 8)]
)
def test_depth_follows_slice_size(size, expected):
    assert count_downsamplings(size) == expected


def test_depth_rejects_sizes_that_cannot_be_halved():
    with pytest.raises(InputError, match="cannot be downsampled"):
        count_downsamplings(33)


def test_channel_ladder_is_pix2pix():
    assert unet_channels(7, 64) == (64, 128, 256, 512, 512, 512, 512, 512)


def test_generator_shape_range_and_torchscript():
    gen = PhaseGenerator((64, 32), base_channels=4).eval()
    assert gen.n_down == 4
    x = torch.randn(3, 1, 64, 32)
    y = gen(x)
    assert y.shape == (3, 1, 64, 32) and y.abs().max() <= 1.0
    scripted = torch.jit.script(gen)
    torch.testing.assert_close(scripted(x), y)
    # fully convolutional: a deeper-native slice (128 = 2 x 64) still works with the 64-sized depth
    assert gen(torch.randn(1, 1, 128, 64)).shape == (1, 1, 128, 64)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    "height, width",
    [(270, 14), (13, 14), (64, 32)],  # a CTPA crop's 270 failed at the 13/14 skip before padding
)
def test_generator_takes_any_slice_size(height, width, residual):
    """Sides that are not a multiple of 2**n_down are padded with air (-1) and cropped back: same grid out,
    within [-1, 1], the same under TorchScript; a 13-pixel side is padded to 32 (a 2x2 bottleneck at depth 4)."""
    torch.manual_seed(0)
    gen = PhaseGenerator((64, 32), base_channels=4, residual=residual).eval()
    assert gen.multiple == 16
    x = torch.rand(2, 1, height, width) * 2 - 1
    with torch.no_grad():
        y = gen(x)
        assert y.shape == x.shape and y.abs().max() <= 1.0 and torch.isfinite(y).all()
        torch.testing.assert_close(torch.jit.script(gen)(x), y)
    if residual:  # the zero-initialised last layer: the untrained residual generator copies its input
        torch.testing.assert_close(y, x)


def test_slices_of_different_sizes_collate_padded_with_air():
    """Training batches mix volumes of any in-plane size: padded to the largest with -1 (air), centred."""
    small = {"avg": torch.zeros(1, 13, 20), "phase0": torch.ones(1, 13, 20), "case": "a", "slice": 0}
    large = {"avg": torch.zeros(1, 16, 16), "phase0": torch.ones(1, 16, 16), "case": "b", "slice": 3}
    batch = pad_slices_collate([small, large])
    assert batch["avg"].shape == batch["phase0"].shape == (2, 1, 16, 20)
    assert batch["case"] == ["a", "b"] and batch["slice"].tolist() == [0, 3]
    # 13 -> 16 rows: 1 above, 2 below; 16 -> 20 columns: 2 each side
    torch.testing.assert_close(batch["phase0"][0, 0, 1:14], torch.ones(13, 20))
    assert (batch["phase0"][0, 0, [0, 14, 15]] == -1).all()
    assert (batch["phase0"][1, 0, :, [0, 1, 18, 19]] == -1).all()
    torch.testing.assert_close(batch["phase0"][1, 0, :, 2:18], torch.ones(16, 16))


def test_discriminator_is_conditional_patchgan():
    disc = conditional_patch_discriminator(channels=4, num_layers=3)
    assert disc.initial_conv.conv.in_channels == 2  # input slice + real/generated slice
    logits = disc(torch.randn(2, 2, 64, 64))[-1]
    assert logits.shape == (2, 1, 6, 6)  # a grid of patch decisions, not one score


def test_pair_batch_picks_keys():
    x, y = PairBatch()({"avg": torch.zeros(1, 1, 4, 4), "phase0": torch.ones(1, 1, 4, 4)})
    assert x.sum() == 0 and y.sum() == 16
    assert PairBatch(target_key=None)({"avg": torch.zeros(1)})[1] is None


def volume_transforms(resize_to=None):
    """The bundle's own transform chain (configs/train.json ``preprocessing``)."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / "pix2pix_phase" / "configs" / "train.json"))
    parser["resize_to"] = resize_to
    return parser.get_parsed_content("preprocessing")


def _write_pair(folder, avg: Volume, phase0: Volume) -> dict:
    return {
        "id": "c",
        "avg": save_volume(avg, folder / "avg.nii.gz"),
        "phase0": save_volume(phase0, folder / "p0.nii.gz"),
    }


def test_slice_dataset_counts_windows_and_reorients(tmp_path):
    hu = np.linspace(-2000, 3000, 8 * 6 * 5, dtype=np.float32).reshape(8, 6, 5)
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])  # L, P, S: the dataset must flip x and y back to R, A
    item = _write_pair(tmp_path, Volume(hu, lps), Volume(hu + 100, lps))
    ds = VolumeSliceDataset([item, dict(item, id="d")], volume_transforms())
    assert len(ds) == 10  # 5 axial slices per pair
    s = ds[2]
    assert s["avg"].shape == (1, 8, 6) and s["slice"] == 2 and s["case"] == "c"
    expected = XRAY2CT.to_symmetric(hu[::-1, ::-1, 2].copy())
    np.testing.assert_allclose(s["avg"][0].numpy(), expected, atol=1e-5)
    assert s["avg"].min() >= -1 and s["avg"].max() <= 1
    resized = VolumeSliceDataset([item], transform=volume_transforms(resize_to=4))
    assert len(resized) == 5 and resized[0]["phase0"].shape == (1, 4, 4)


def test_slice_dataset_rejects_mismatched_pair(tmp_path):
    item = _write_pair(tmp_path, Volume.from_spacing(np.zeros((4, 4, 3), np.float32)),
                       Volume.from_spacing(np.zeros((4, 4, 2), np.float32)))  # fmt: skip
    with pytest.raises(InputError, match="pair shapes differ"):
        VolumeSliceDataset([item], volume_transforms())


def test_tiny_generator_overfits_a_phantom_phase_pair():
    """200 steps on one 32x32x8 breathing phantom: PSNR (xray2ct convention) must beat copying the average."""
    from ignite.engine import Events
    from monai.data import DataLoader

    from data_prep.phantom import make_4dct

    torch.manual_seed(0)
    phases, avg = make_4dct((32, 32, 8), n_phases=4, seed=0)
    a = torch.from_numpy(XRAY2CT.to_symmetric(avg.array)).permute(2, 0, 1)[:, None]
    b = torch.from_numpy(XRAY2CT.to_symmetric(phases[0].array)).permute(2, 0, 1)[:, None]
    loader = DataLoader([{"avg": a[i], "phase0": b[i]} for i in range(len(a))], batch_size=8, shuffle=True)
    gen = PhaseGenerator(32, base_channels=8)
    disc = conditional_patch_discriminator(channels=8, num_layers=2)
    g_opt = torch.optim.Adam(gen.parameters(), 5e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(disc.parameters(), 2e-4, betas=(0.5, 0.999))
    trainer = ConditionalGanTrainer("cpu", 200, loader, gen, g_opt, disc, d_opt, lambda_recon=100.0)
    recon = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: recon.append(e.state.output["g_recon"]))

    def volume_psnr(pred):
        return psnr((pred[:, 0] + 1) / 2, (b[:, 0] + 1) / 2)

    copy_psnr = volume_psnr(a)  # 26.6 dB: the average is already close to phase 0
    trainer.run()
    gen.eval()
    with torch.no_grad():
        learned = volume_psnr(gen(a))
    assert np.mean(recon[-10:]) < 0.2 * np.mean(recon[:10])
    assert learned > 29.0 and learned > copy_psnr + 2.0, (learned, copy_psnr)
