"""The trivial predictors of common.baselines, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.baselines import box_down_up, compare, lower_is_better, mean_training_ct, resize_volume
from common.errors import InputError
from common.io import save_volume
from common.volume import Volume


def test_box_down_up_hand_computed_ramp():
    # along X: [0, 1, 2, 3] -> pooled [0.5, 2.5] -> trilinear (align_corners=False) at -0.25, 0.25, 0.75, 1.25
    ramp = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2).contiguous()
    out = box_down_up(ramp, 2)
    assert torch.allclose(out[0, 0, :, 0, 0], torch.tensor([0.5, 1.0, 2.0, 2.5]))


def test_box_down_up_constant_and_odd_sizes():
    vol = torch.full((2, 1, 9, 10, 7), 3.5)
    out = box_down_up(vol, 4)
    assert out.shape == vol.shape
    assert torch.allclose(out, vol)
    assert torch.equal(box_down_up(vol, 1), vol)
    with pytest.raises(InputError):
        box_down_up(vol[0], 2)


def test_mean_training_ct(tmp_path):
    paths = []
    for i, value in enumerate((-1000.0, 0.0, 400.0)):
        paths.append(
            save_volume(
                Volume.from_spacing(np.full((4, 5, 6), value, np.float32), (2, 2, 2)),
                tmp_path / f"c{i}.nii.gz",
            )
        )
    mean = mean_training_ct(paths, shape=(4, 5, 6))
    assert mean.shape == (4, 5, 6) and np.allclose(mean, -200.0)
    other = save_volume(
        Volume.from_spacing(np.zeros((4, 5, 7), np.float32), (2, 2, 2)), tmp_path / "o.nii.gz"
    )
    with pytest.raises(InputError, match="o.nii.gz"):
        mean_training_ct([paths[0], other])
    with pytest.raises(InputError):
        mean_training_ct([])


def test_resize_and_compare_directions():
    vol = torch.rand(1, 1, 8, 8, 8)
    assert resize_volume(vol, (8, 8, 8)) is vol
    assert resize_volume(vol, (4, 4, 4)).shape == (1, 1, 4, 4, 4)
    assert lower_is_better("mae_hu") and lower_is_better("drr_l1_pa") and not lower_is_better("psnr_xray2ct")
    out = compare({"psnr_xray2ct": 25.0, "mae_hu": 80.0, "id": "x"}, {"psnr_xray2ct": 23.5, "mae_hu": 90.0})
    assert out["difference"] == {"psnr_xray2ct": 1.5, "mae_hu": -10.0}
    assert out["model_better"] == {"psnr_xray2ct": True, "mae_hu": True}
