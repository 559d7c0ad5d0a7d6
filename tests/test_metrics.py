"""common.metrics: hand-computed PSNR/SSIM/MAE in both conventions (engine metrics and reports: test_handlers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import InputError
from common.intensity import XRAY2CT
from common.metrics import (
    CONVENTIONS,
    compute_ct_metrics,
    mae_hu,
    psnr,
    psnr_perx2ct,
    ssim2d_skimage,
    ssim3d,
    ssim3d_skimage,
    ssim_perx2ct,
    x2ctgan_psnr,
)


def _integer_volume(shape=(8, 9, 10), lo=-900, hi=1000, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, size=shape).astype(np.float32)


def _luminance_ssim(a: float, b: float, data_range: float = 1.0) -> float:
    """SSIM of two constant images: only the luminance term is left (variances are 0)."""
    c1 = (0.01 * data_range) ** 2
    return (2 * a * b + c1) / (a * a + b * b + c1)


def test_constant_offset_gives_known_psnr_in_both_conventions():
    target = _integer_volume()
    m = compute_ct_metrics(target + 50.0, target)
    assert m["psnr_xray2ct"] == pytest.approx(20 * math.log10(3072 / 50), abs=1e-4)
    # X2CT-GAN: peak 4095 on the [0, 2500] scale, every slice has the same MSE
    expected = 20 * math.log10(4095 / 50)
    for key in ("psnr_x2ctgan", "psnr_axial_x2ctgan", "psnr_coronal_x2ctgan", "psnr_sagittal_x2ctgan"):
        assert m[key] == pytest.approx(expected, abs=1e-4), key
    assert m["psnr_2d_x2ctgan"] == pytest.approx(expected, abs=1e-4)
    assert m["mae_hu"] == pytest.approx(50.0, abs=1e-4)
    assert m["mae_x2ctgan"] == pytest.approx(50.0, abs=1e-4)
    assert set(m) == {k for conv in CONVENTIONS.values() for k in conv["keys"]}


def test_identical_volumes():
    target = _integer_volume(seed=1)
    m = compute_ct_metrics(target, target)
    assert m["ssim_xray2ct"] == pytest.approx(1.0, abs=1e-6)
    assert m["ssim_x2ctgan"] == pytest.approx(1.0, abs=1e-9)
    assert m["mae_hu"] == 0.0 and m["mae_x2ctgan"] == 0.0
    assert math.isinf(m["psnr_xray2ct"])
    assert m["psnr_x2ctgan"] == 100.0  # X2CT-GAN's value for a zero MSE
    assert m["psnr_2d_x2ctgan"] == 100.0


def test_window_clipping_matters():
    # 1500 and 1800 HU are both above X2CT-GAN's 1476 ceiling but inside our 2048 ceiling.
    pred, target = np.full((8, 8, 8), 1500.0), np.full((8, 8, 8), 1800.0)
    m = compute_ct_metrics(pred, target)
    assert m["mae_hu"] == pytest.approx(300.0)
    assert m["psnr_xray2ct"] == pytest.approx(20 * math.log10(3072 / 300), abs=1e-6)
    assert m["mae_x2ctgan"] == 0.0 and m["psnr_x2ctgan"] == 100.0
    # Air below -1024 is clipped in both: -3000 vs -1024 is no error at all.
    assert mae_hu(np.full((4, 4, 4), -3000.0), np.full((4, 4, 4), -1024.0)) == 0.0
    assert mae_hu(np.full((4, 4, 4), -3000.0), np.full((4, 4, 4), -1024.0), window=None) == 1976.0


def test_constant_volumes_ssim_is_the_luminance_term():
    pred, target = np.zeros((8, 8, 8)), np.full((8, 8, 8), -512.0)
    m = compute_ct_metrics(pred, target)
    # MONAI computes SSIM in float32: agreement to ~1e-4 only.
    assert m["ssim_xray2ct"] == pytest.approx(_luminance_ssim(1024 / 3072, 512 / 3072), abs=2e-4)
    assert m["ssim_x2ctgan"] == pytest.approx(_luminance_ssim(1024 / 2500, 512 / 2500), abs=1e-9)


def test_per_axis_psnr_follows_ras_axes():
    target = _integer_volume(shape=(8, 8, 8), seed=2)
    pred = target.copy()
    pred[:, :, 0] += 100.0  # one axial slice (fixed Z) is wrong
    m = x2ctgan_psnr(pred, target)
    bad_slice = 20 * math.log10(4095 / 100)
    assert m["psnr_axial_x2ctgan"] == pytest.approx((bad_slice + 7 * 100.0) / 8, abs=1e-6)
    spread = 20 * math.log10(4095 / math.sqrt(100**2 / 8))  # 1/8 of every coronal/sagittal slice
    assert m["psnr_coronal_x2ctgan"] == pytest.approx(spread, abs=1e-6)
    assert m["psnr_sagittal_x2ctgan"] == pytest.approx(spread, abs=1e-6)
    assert m["psnr_x2ctgan"] == pytest.approx(spread, abs=1e-6)


def test_x2ctgan_psnr_truncates_to_integer_levels():
    # 0.9 HU apart but on the same integer level after int32 truncation of HU + 1024.
    target = np.full((4, 4, 4), 10.05)
    assert x2ctgan_psnr(target + 0.9, target)["psnr_x2ctgan"] == 100.0


def _naive_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, win: int = 7) -> float:
    """Window-by-window SSIM, 2D or 3D, as skimage defines it: every ``win``^d window fully inside, sample
    statistics (ddof=1), constants (0.01 and 0.03 times ``data_range``) squared."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for corner in np.ndindex(*(n - win + 1 for n in x.shape)):
        window = tuple(slice(c, c + win) for c in corner)
        a, b = x[window].ravel(), y[window].ravel()
        cov = np.cov(a, b, ddof=1)
        ma, mb = a.mean(), b.mean()
        values.append(
            ((2 * ma * mb + c1) * (2 * cov[0, 1] + c2))
            / ((ma**2 + mb**2 + c1) * (cov[0, 0] + cov[1, 1] + c2))
        )
    return float(np.mean(values))


def _perx2ct_pair(seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Two HU volumes of soft-tissue-like contrast (so SSIM's constants matter), a few values clipped."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(-300, 300, (9, 10, 8))
    target[0, 0, :] = -1100.0  # outside the X2CTGAN window: clipped to 0
    return target + rng.normal(0, 100, target.shape), target


def test_ssim_perx2ct_is_one_3d_ssim_with_data_range_two():
    pred, target = _perx2ct_pair()
    unit = lambda hu: np.clip((hu + 1024) / 2500, 0, 1)  # noqa: E731 - PerX2CT's [0, 1] CT scale
    expected = _naive_ssim(unit(pred), unit(target), data_range=2.0)
    assert ssim_perx2ct(pred, target) == pytest.approx(expected, abs=1e-10)
    # the data range matters: with 1.0 the constants shrink 4x and the score drops
    assert _naive_ssim(unit(pred), unit(target), data_range=1.0) < expected - 0.01
    got = ssim3d_skimage(
        torch.from_numpy(unit(pred))[None, None], torch.from_numpy(unit(target))[None, None], 2.0
    )
    assert float(got[0]) == pytest.approx(expected, abs=1e-10)
    assert ssim_perx2ct(target, target) == pytest.approx(1.0, abs=1e-12)
    assert compute_ct_metrics(pred, target)["ssim_perx2ct"] == pytest.approx(expected, abs=1e-10)


def test_ssim_perx2ct_matches_skimage_called_as_in_perx2ct():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    pred, target = _perx2ct_pair(seed=5)
    unit = lambda hu: np.clip((hu + 1024) / 2500, 0, 1)  # noqa: E731
    # PerX2CT: structural_similarity(gt[None], pred[None], data_range=None, channel_axis=False) with
    # scikit-image 0.19.1, where data_range=None on float64 means 2.0; newer releases want it given.
    reference = skimage_metrics.structural_similarity(
        unit(target)[None], unit(pred)[None], data_range=2.0, channel_axis=False
    )
    assert ssim_perx2ct(pred, target) == pytest.approx(float(reference), abs=1e-10)


def test_ssim2d_matches_window_by_window_definition():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (10, 11))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    got = ssim2d_skimage(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None])
    assert float(got[0]) == pytest.approx(_naive_ssim(x, y), abs=1e-10)


def test_functions_accept_numpy_torch_and_batches():
    target = _integer_volume(shape=(8, 8, 8), seed=4)
    unit_t = XRAY2CT.to_unit(target)
    unit_p = XRAY2CT.to_unit(target + 30.72)  # 0.01 in unit scale
    assert psnr(unit_p, unit_t) == pytest.approx(40.0, abs=1e-3)
    assert psnr(torch.from_numpy(unit_p), torch.from_numpy(unit_t)) == pytest.approx(40.0, abs=1e-3)
    batch_t = np.stack([target, target])[:, None]
    batch_p = np.stack([target + 10.0, target + 100.0])[:, None]
    m = compute_ct_metrics(batch_p, batch_t)
    assert m["mae_hu"] == pytest.approx(55.0, abs=1e-4)
    expected = (20 * math.log10(4095 / 10) + 20 * math.log10(4095 / 100)) / 2  # mean of per-volume PSNR
    assert m["psnr_x2ctgan"] == pytest.approx(expected, abs=1e-4)
    assert 0.0 < ssim3d(unit_p, unit_t) < 1.0


@pytest.mark.parametrize(
    "pred, target, problem",
    [
        (np.zeros((2, 8, 8, 8)), np.zeros((2, 8, 8, 8)), "expected"),
        (np.zeros((8, 8, 8)), np.zeros((8, 8, 9)), "does not match"),
        (np.full((8, 8, 8), np.nan), np.zeros((8, 8, 8)), "NaN"),
        (np.zeros((4, 8, 8)), np.zeros((4, 8, 8)), ">= 7"),
    ],
)
def test_bad_input_raises(pred, target, problem):
    with pytest.raises(InputError, match=problem):
        compute_ct_metrics(pred, target)


def _perx2ct_psnr_2d(target_unit: np.ndarray, output_unit: np.ndarray) -> float:
    """PerX2CT utils/metrics.py Peak_Signal_to_Noise_Rate_2D(target[None], output[None], 0, 2500,
    use_real_max=True), re-implemented in numpy from reading: un-min-max, int32 truncation, squared error
    averaged over axes 1 and 2 of the (1, N, H, W) stack, 100 dB for a zero MSE, mean over the last axis."""
    arr1 = (target_unit[None] * 2500.0).astype(np.int32).astype(np.float64)
    arr2 = (output_unit[None] * 2500.0).astype(np.int32).astype(np.float64)
    se = (arr1 - arr2) ** 2
    mse = se.mean(axis=1, keepdims=True).mean(axis=2, keepdims=True).squeeze(2).squeeze(1)
    zero = np.where(mse == 0)
    mse[zero] = 1e-10
    value = 20 * np.log10(4095 / np.sqrt(mse))
    value[zero] = 100
    return float(value.mean(1)[0])


def _perx2ct_test_script_psnr(target_unit: np.ndarray, output_unit: np.ndarray) -> float:
    """PerX2CT main_test.py run_test/calculate_metric_per_patient on one case: the axial, coronal and sagittal
    stacks written by data_preprocessing/4_ct_dataset_prepare.py (ct[i], ct[:, i], ct[..., i]), each scored by
    Peak_Signal_to_Noise_Rate_2D, averaged over the three."""
    stacks = [
        lambda v: np.stack([v[i] for i in range(v.shape[0])]),
        lambda v: np.stack([v[:, i] for i in range(v.shape[1])]),
        lambda v: np.stack([v[..., i] for i in range(v.shape[2])]),
    ]
    return sum(_perx2ct_psnr_2d(s(target_unit), s(output_unit)) for s in stacks) / 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_perx2ct_is_their_test_script_not_the_three_axis_mean(seed):
    rng = np.random.default_rng(seed)
    # the original's array layout (D0, D1, D2), values on their [0, 1] scale half-way between two integer
    # levels (so both sides' truncation to an integer level is exact whatever the float rounding); an error
    # that grows along D0 (superior -> inferior), the axis their script never slices across
    shape = (12, 10, 11)
    target_levels = rng.integers(0, 2500, shape)
    noise = rng.normal(0, 1, shape) * np.linspace(5, 200, shape[0])[:, None, None]
    output_levels = np.clip(target_levels + np.rint(noise), 0, 2499)
    target_unit, output_unit = (target_levels + 0.5) / 2500.0, (output_levels + 0.5) / 2500.0
    reference = _perx2ct_test_script_psnr(target_unit, output_unit)

    ras = lambda unit: np.flip(unit * 2500.0 - 1024.0, (0, 1, 2)).swapaxes(0, 2)  # noqa: E731 - (D0,D1,D2) -> RAS HU
    got = psnr_perx2ct(ras(output_unit), ras(target_unit))
    # float64 logs of O(100) dB: equal to rounding
    assert got == pytest.approx(reference, abs=1e-9)
    m = compute_ct_metrics(ras(output_unit), ras(target_unit))
    assert m["psnr_perx2ct"] == got
    assert got == pytest.approx((2 * m["psnr_sagittal_x2ctgan"] + m["psnr_coronal_x2ctgan"]) / 3, abs=1e-9)
    # the three-axis mean the module used to claim is off by a large fraction of a dB
    assert abs(m["psnr_2d_x2ctgan"] - got) > 0.3


def test_psnr_perx2ct_on_a_random_pair_differs_from_the_three_axis_mean():
    """The kind of gap quoted in issue 24 (34.82 vs 35.70 dB): an error that varies from slice to slice
    along the superior axis (RAS axis 2), which only the three-axis mean slices across."""
    rng = np.random.default_rng(24)
    target = rng.uniform(-1024.0, 1476.0, (16, 16, 16))
    pred = target + rng.normal(0.0, 60.0, target.shape) * np.linspace(0.2, 2.0, 16)[None, None, :]
    m = compute_ct_metrics(pred, target)
    assert m["psnr_perx2ct"] == pytest.approx(
        (2 * m["psnr_sagittal_x2ctgan"] + m["psnr_coronal_x2ctgan"]) / 3, abs=1e-9
    )
    assert abs(m["psnr_perx2ct"] - m["psnr_2d_x2ctgan"]) > 0.3
    assert psnr_perx2ct(target, target) == 100.0
