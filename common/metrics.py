"""CT image-quality metrics that always say which convention they use.

Our convention and the papers' are reported side by side because papers disagree on them and numbers
from one are not comparable with another:

``xray2ct`` (ours)
    HU clipped to the :data:`common.intensity.XRAY2CT` window [-1024, 2048] and scaled to [0, 1];
    PSNR and SSIM with data range 1.0 (= 3072 HU). PSNR per volume (MONAI ``PSNRMetric``), SSIM in
    3D (MONAI ``SSIMMetric``, Gaussian window ``win_size`` 7, sigma 1.5, K1 0.01, K2 0.03).
``x2ctgan`` (X2CT-GAN, Ying et al. CVPR 2019)
    Source: github.com/kylekma/X2CT ``3DGAN/test.py`` + ``lib/utils/metrics_np.py``. The CT is
    ``clip(HU + 1024, 0, 2500) / 2500`` (:data:`common.intensity.X2CTGAN`).

    * PSNR: values are scaled back to [0, 2500], truncated to integers (their ``astype(int32)``)
      and compared with a **peak of 4095**, not 2500: ``20 log10(4095 / RMSE)``. This inflates
      PSNR by 20 log10(4095/2500) = 4.29 dB compared with the window's true range. A zero MSE
      scores 100 dB. ``psnr_x2ctgan`` is their "psnr-3d" (whole volume); the per-axis values are
      their "PSNR-1/2/3": PSNR of every 2D slice perpendicular to the axis, averaged over slices;
      ``psnr_2d_x2ctgan`` is their "PSNR-avg" (mean of the three axes).
    * SSIM: ``skimage.metrics.structural_similarity`` on the (clipped) [0, 1] values, data range
      1.0, i.e. 2D SSIM with a 7x7 uniform window, sample covariance (N/(N-1)), K1 0.01, K2 0.03,
      border of 3 pixels excluded, per slice, averaged over slices; ``ssim_x2ctgan`` is their
      "SSIM-avg" over the axial, coronal and sagittal stacks.
    * MAE: mean absolute difference of the integer [0, 2500] values (their "MAE"), i.e. HU.
``perx2ct`` (PerX2CT, Kyung et al. ICASSP 2023): X2CT-GAN's per-slice PSNR on other slices, and **not** its SSIM
    Source: github.com/dek924/PerX2CT ``main_test.py`` (``calculate_metric_per_axis_2D``) and
    ``utils/metrics.py``, with scikit-image 0.19.1 (their ``requirement.txt``). Same [0, 1] scale.

    * PSNR, ``psnr_perx2ct``: ``Peak_Signal_to_Noise_Rate_2D(..., use_real_max=True)``
      (``utils/metrics.py`` l. 32-49): integer [0, 2500] levels, peak 4095, 100 dB for a zero MSE, but
      the squared error is averaged over array axes 1 and 2 of the (1, N, H, W) stack, so each "slice"
      is perpendicular to the stack's **last** axis, not to the slicing axis N. ``run_test`` feeds it
      the three stacks of ``4_ct_dataset_prepare.py`` (l. 57 ``ct[i]``, l. 70 ``ct[:, i]``, l. 83
      ``ct[..., i]``): (D0, D1, D2), (D1, D0, D2) and (D2, D0, D1), and averages the three
      (``main_test.py`` l. 145-192). That is (2 x PSNR perpendicular to D2 + PSNR perpendicular to D1) / 3;
      D2 is the sagittal axis and D1 the coronal one (:func:`bundles.perx2ct.scripts.geometry.perx2ct_to_ras`),
      so ``psnr_perx2ct = (2 psnr_sagittal_x2ctgan + psnr_coronal_x2ctgan) / 3``; it is **not**
      ``psnr_2d_x2ctgan`` (the three-axis mean), from which it differs by ~1 dB on a random pair. (Their
      axial-only branch, l. 146-154, would give the three-axis mean; their test list holds all three
      stacks of every case, ``dataset_list/LIDC_CTslice/test_sorted.txt``, so the branch at l. 155 runs.)
    * SSIM, ``ssim_perx2ct``: ``structural_similarity(gt[None], pred[None], data_range=None,
      channel_axis=False)`` on the (N, H, W) stack as a (1, N, H, W) array. ``channel_axis=False`` is
      not None, so skimage loops over axis ``False == 0`` (one "channel") and computes **one 3D SSIM**
      of the whole volume: 7x7x7 uniform window, sample covariance (343/342), K1 0.01, K2 0.03,
      3 voxels excluded at every face, and ``data_range=None`` on float64 input means the dtype range
      [-1, 1], i.e. **data range 2.0** although the values lie in [0, 1] (so C1, C2 are 4x larger than
      with data range 1 and the score is higher). The three axis stacks they average are permutations
      of one volume, which a cubic window scores identically; they decode the volume once per axis and
      average the three scores, we score the one volume we have.

``mae_hu`` is the mean absolute error in HU after clipping both volumes to the XRAY2CT window, so
it equals 3072 x the MAE of the network's [0, 1] outputs.

This module is the maths only. Engines use it through :class:`common.handlers.CTPair` (ignite metrics) and
:class:`CTMetrics` (per-case values of :class:`common.handlers.MetricsReport`, which writes the report).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric
from monai.metrics.regression import RegressionMetric

from common.errors import InputError
from common.intensity import X2CTGAN, XRAY2CT, HUWindow, get_window

X2CTGAN_PSNR_PEAK = 4095.0  # X2CT-GAN/PerX2CT PIXEL_MAX (use_real_max=True), although values span [0, 2500]
X2CTGAN_ZERO_MSE_PSNR = 100.0  # their value for identical volumes or slices
X2CTGAN_SSIM_WIN = 7  # skimage structural_similarity default
PERX2CT_SSIM_DATA_RANGE = 2.0  # skimage 0.19 data_range=None on float64: the dtype range [-1, 1]
DEFAULT_SSIM_WIN = 7

# Array axes of a canonical RAS volume (X=R, Y=A, Z=S): the slice stack perpendicular to each axis.
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}

CONVENTIONS: dict[str, dict] = {
    "xray2ct": {
        "window": XRAY2CT.as_dict(),
        "scale": "clip(HU, -1024, 2048) mapped linearly to [0, 1]",
        "data_range": 1.0,
        "data_range_hu": XRAY2CT.width,
        "psnr": "MONAI PSNRMetric per volume, max_val 1.0",
        "ssim": f"MONAI SSIMMetric 3D, gaussian window {DEFAULT_SSIM_WIN}, sigma 1.5, k1 0.01, k2 0.03",
        "keys": ["psnr_xray2ct", "ssim_xray2ct"],
    },
    "x2ctgan": {
        "window": X2CTGAN.as_dict(),
        "scale": "clip(HU + 1024, 0, 2500) / 2500 (PSNR and MAE on int(value * 2500))",
        "data_range": 1.0,
        "psnr_peak": X2CTGAN_PSNR_PEAK,
        "psnr": "20 log10(4095 / RMSE) on integer [0, 2500] values; 100 dB when MSE is 0; "
        "3D = whole volume, per-axis = mean over 2D slices, 2d = mean of the three axes",
        "ssim": "skimage structural_similarity per 2D slice on [0, 1] (7x7 uniform window, sample covariance), "
        "mean over slices, then over axial/coronal/sagittal",
        "source": "github.com/kylekma/X2CT 3DGAN/test.py, lib/utils/metrics_np.py (PSNR also "
        "github.com/dek924/PerX2CT utils/metrics.py, use_real_max=True)",
        "keys": [
            "psnr_x2ctgan",
            "psnr_2d_x2ctgan",
            "psnr_axial_x2ctgan",
            "psnr_coronal_x2ctgan",
            "psnr_sagittal_x2ctgan",
            "ssim_x2ctgan",
            "ssim_axial_x2ctgan",
            "ssim_coronal_x2ctgan",
            "ssim_sagittal_x2ctgan",
            "mae_x2ctgan",
        ],
    },
    "perx2ct": {
        "window": X2CTGAN.as_dict(),
        "scale": "clip(HU + 1024, 0, 2500) / 2500 (float, not truncated)",
        "data_range": PERX2CT_SSIM_DATA_RANGE,
        "psnr": "Peak_Signal_to_Noise_Rate_2D on their three stacks: (2 x PSNR of the 2D slices perpendicular to "
        "the sagittal axis + PSNR of those perpendicular to the coronal axis) / 3, on integer [0, 2500] levels, "
        "peak 4095, 100 dB for a zero MSE (not the three-axis mean psnr_2d_x2ctgan)",
        "ssim": "skimage 0.19.1 structural_similarity(channel_axis=False, data_range=None) on a (1, N, H, W) "
        "float64 array: one 3D SSIM, 7x7x7 uniform window, sample covariance, k1 0.01, k2 0.03, "
        "3-voxel border excluded, data range 2.0 (float64 dtype range)",
        "source": "github.com/dek924/PerX2CT main_test.py calculate_metric_per_axis_2D and run_test, utils/metrics.py "
        "Peak_Signal_to_Noise_Rate_2D and Structural_Similarity_slice, data_preprocessing/4_ct_dataset_prepare.py; "
        "scikit-image==0.19.1",
        "keys": ["psnr_perx2ct", "ssim_perx2ct"],
    },
    "mae_hu": {
        "window": XRAY2CT.as_dict(),
        "definition": "mean |pred - target| in HU after clipping both to the xray2ct window",
        "keys": ["mae_hu"],
    },
}


# ----------------------------------------------------------------------------------------------- inputs
def as_batch(x, name: str = "volume") -> torch.Tensor:
    """(X,Y,Z), (1,X,Y,Z) or (B,1,X,Y,Z) numpy/torch -> float64 tensor (B,1,X,Y,Z); rejects NaN."""
    t = torch.as_tensor(np.ascontiguousarray(x) if not isinstance(x, torch.Tensor) else x.detach()).cpu()
    t = t.as_subclass(torch.Tensor).to(torch.float64)
    if t.ndim == 3:
        t = t[None, None]
    elif t.ndim == 4 and t.shape[0] == 1:
        t = t[None]
    elif t.ndim != 5 or t.shape[1] != 1:
        raise InputError(name, f"expected (X,Y,Z), (1,X,Y,Z) or (B,1,X,Y,Z), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise InputError(name, f"empty volume of shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(name, "contains NaN or infinite values")
    return t


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = as_batch(pred, "prediction"), as_batch(target, "target")
    if p.shape != t.shape:
        raise InputError("prediction", f"shape {tuple(p.shape)} does not match target shape {tuple(t.shape)}")
    return p, t


def _need_window(t: torch.Tensor, win: int, what: str) -> None:
    if min(t.shape[2:]) < win:
        raise InputError("prediction", f"{what} needs every spatial size >= {win}, got {tuple(t.shape[2:])}")


# ----------------------------------------------------------------------------------------------- basic metrics
def psnr(pred, target, data_range: float = 1.0) -> float:
    """Volume PSNR (dB, mean over the batch) with peak ``data_range``; inf for identical inputs."""
    p, t = _pair(pred, target)
    return float(PSNRMetric(max_val=data_range, reduction="mean")(p, t).mean())


def ssim3d(pred, target, data_range: float = 1.0, win_size: int = DEFAULT_SSIM_WIN) -> float:
    """3D SSIM (MONAI, Gaussian window, sigma 1.5), mean over the batch.

    MONAI computes in float32, which leaves ~1e-3 of variance noise on perfectly flat regions.
    """
    p, t = _pair(pred, target)
    _need_window(p, win_size, "3D SSIM")
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win_size)
    return float(metric(p, t).mean())


def mae_hu(pred_hu, target_hu, window: str | HUWindow | None = XRAY2CT) -> float:
    """Mean absolute error in HU; both volumes are clipped to ``window`` first (None: no clipping)."""
    p, t = _pair(pred_hu, target_hu)
    if window is not None:
        w = get_window(window)
        p, t = p.clamp(w.lo, w.hi), t.clamp(w.lo, w.hi)
    return float(MAEMetric(reduction="mean")(p, t).mean())


# ----------------------------------------------------------------------------------------------- X2CT-GAN
def x2ctgan_levels(hu: torch.Tensor) -> torch.Tensor:
    """HU -> their integer [0, 2500] scale: ``int32(clip(HU + 1024, 0, 2500))`` (truncation as in X2CT-GAN)."""
    return torch.floor((hu - X2CTGAN.lo).clamp(0.0, X2CTGAN.width))


def _slices(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(B,1,X,Y,Z) -> (B*n, 1, h, w): the 2D slices perpendicular to spatial ``axis``."""
    moved = torch.movedim(t[:, 0], axis + 1, 1)  # (B, n, h, w)
    return moved.reshape(-1, 1, *moved.shape[2:])


def _x2ctgan_psnr_values(p_levels: torch.Tensor, t_levels: torch.Tensor) -> torch.Tensor:
    """Per-item PSNR with peak 4095 (MONAI PSNRMetric), with X2CT-GAN's 100 dB for a zero MSE."""
    values = PSNRMetric(max_val=X2CTGAN_PSNR_PEAK, reduction="none")(p_levels, t_levels).flatten()
    return torch.where(torch.isinf(values), torch.full_like(values, X2CTGAN_ZERO_MSE_PSNR), values)


def x2ctgan_psnr(pred_hu, target_hu) -> dict[str, float]:
    """PSNR in the X2CT-GAN/PerX2CT convention: 3D, per axis (mean over slices) and the axes' mean."""
    p, t = _pair(pred_hu, target_hu)
    pl, tl = x2ctgan_levels(p), x2ctgan_levels(t)
    out = {"psnr_x2ctgan": float(_x2ctgan_psnr_values(pl, tl).mean())}
    batch = p.shape[0]
    per_axis = []
    for name, axis in SLICE_AXES.items():
        per_slice = _x2ctgan_psnr_values(_slices(pl, axis), _slices(tl, axis)).reshape(batch, -1)
        per_volume = per_slice.mean(dim=1)  # their psnr_d/h/w: mean over slices, per volume
        per_axis.append(per_volume)
        out[f"psnr_{name}_x2ctgan"] = float(per_volume.mean())
    out["psnr_2d_x2ctgan"] = float(torch.stack(per_axis).mean(dim=0).mean())
    return dict(sorted(out.items()))


def ssim2d_skimage(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win_size: int = 7
) -> torch.Tensor:
    """Per-image 2D SSIM equal to skimage's ``structural_similarity`` defaults, for (N,1,H,W) tensors.

    Written here because MONAI's SSIM uses the population covariance while skimage (and therefore
    X2CT-GAN and PerX2CT) uses the sample covariance (N/(N-1)); the uniform filter's valid region is
    exactly skimage's crop of (win_size-1)/2 border pixels.
    """
    return _ssim_uniform(pred, target, data_range, win_size, F.avg_pool2d)


def ssim3d_skimage(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win_size: int = 7
) -> torch.Tensor:
    """Per-volume 3D SSIM equal to skimage's ``structural_similarity`` on 3D arrays, for (B,1,X,Y,Z) tensors.

    Same definition as :func:`ssim2d_skimage` with a ``win_size``^3 uniform window (sample covariance,
    K1 0.01, K2 0.03, (win_size-1)/2 voxels excluded at every face).
    """
    return _ssim_uniform(pred, target, data_range, win_size, F.avg_pool3d)


def _ssim_uniform(pred, target, data_range: float, win_size: int, pool: Callable) -> torch.Tensor:
    """skimage's SSIM with a uniform window: ``pool`` is avg_pool2d or avg_pool3d (stride 1, valid region)."""
    n = win_size ** (pred.ndim - 2)
    cov_norm = n / (n - 1.0)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def mean_filter(x: torch.Tensor) -> torch.Tensor:
        return pool(x, kernel_size=win_size, stride=1)

    ux, uy = mean_filter(pred), mean_filter(target)
    vx = cov_norm * (mean_filter(pred * pred) - ux * ux)
    vy = cov_norm * (mean_filter(target * target) - uy * uy)
    vxy = cov_norm * (mean_filter(pred * target) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def x2ctgan_ssim(pred_hu, target_hu) -> dict[str, float]:
    """SSIM in the X2CT-GAN convention: 2D SSIM per slice on the [0, 1] X2CTGAN window (not PerX2CT's)."""
    p, t = _pair(pred_hu, target_hu)
    _need_window(p, X2CTGAN_SSIM_WIN, "X2CT-GAN SSIM")
    pu, tu = X2CTGAN.to_unit(p), X2CTGAN.to_unit(t)
    batch = p.shape[0]
    out, per_axis = {}, []
    for name, axis in SLICE_AXES.items():
        per_slice = ssim2d_skimage(_slices(pu, axis), _slices(tu, axis), 1.0, X2CTGAN_SSIM_WIN).reshape(
            batch, -1
        )
        per_volume = per_slice.mean(dim=1)
        per_axis.append(per_volume)
        out[f"ssim_{name}_x2ctgan"] = float(per_volume.mean())
    out["ssim_x2ctgan"] = float(torch.stack(per_axis).mean(dim=0).mean())
    return dict(sorted(out.items()))


def psnr_perx2ct(pred_hu, target_hu) -> float:
    """PSNR (dB, mean over the batch) as PerX2CT's test script computes it (see the module docstring):
    ``(2 * PSNR_sagittal + PSNR_coronal) / 3`` of the X2CT-GAN per-slice PSNRs (integer [0, 2500]
    levels, peak 4095, 100 dB for a zero-MSE slice), for HU volumes (X,Y,Z) or (B,1,X,Y,Z) in RAS."""
    p, t = _pair(pred_hu, target_hu)
    pl, tl = x2ctgan_levels(p), x2ctgan_levels(t)
    batch = p.shape[0]

    def per_axis(axis: int) -> torch.Tensor:
        return _x2ctgan_psnr_values(_slices(pl, axis), _slices(tl, axis)).reshape(batch, -1).mean(dim=1)

    # their axial (D0, D1, D2) and coronal (D1, D0, D2) stacks are both scored per D2 = sagittal index,
    # their sagittal stack (D2, D0, D1) per D1 = coronal index
    values = (2.0 * per_axis(SLICE_AXES["sagittal"]) + per_axis(SLICE_AXES["coronal"])) / 3.0
    return float(values.mean())


def ssim_perx2ct(pred_hu, target_hu) -> float:
    """SSIM in PerX2CT's convention (mean over the batch): one 3D SSIM on the [0, 1] X2CTGAN window,
    7x7x7 uniform window, sample covariance, **data range 2.0** (see the module docstring)."""
    p, t = _pair(pred_hu, target_hu)
    _need_window(p, X2CTGAN_SSIM_WIN, "PerX2CT SSIM")
    values = ssim3d_skimage(X2CTGAN.to_unit(p), X2CTGAN.to_unit(t), PERX2CT_SSIM_DATA_RANGE, X2CTGAN_SSIM_WIN)
    return float(values.mean())


# ----------------------------------------------------------------------------------------------- all at once
def compute_ct_metrics(pred_hu, target_hu, win_size: int = DEFAULT_SSIM_WIN) -> dict[str, float]:
    """Every metric of :data:`CONVENTIONS` for HU volumes (X,Y,Z) or (B,1,X,Y,Z), averaged over the batch."""
    p, t = _pair(pred_hu, target_hu)
    pu, tu = XRAY2CT.to_unit(p), XRAY2CT.to_unit(t)
    out = {
        "psnr_xray2ct": psnr(pu, tu, data_range=1.0),
        "ssim_xray2ct": ssim3d(pu, tu, data_range=1.0, win_size=win_size),
        "mae_hu": mae_hu(p, t, window=XRAY2CT),
        "mae_x2ctgan": float((x2ctgan_levels(p) - x2ctgan_levels(t)).abs().mean()),
    }
    out.update(x2ctgan_psnr(p, t))
    out.update(x2ctgan_ssim(p, t))
    out["psnr_perx2ct"] = psnr_perx2ct(p, t)
    out["ssim_perx2ct"] = ssim_perx2ct(p, t)
    return out


# ----------------------------------------------------------------------------------------------- metric objects
class X2CTGANPSNRMetric(RegressionMetric):
    """Per-volume X2CT-GAN PSNR (peak 4095 on integer [0, 2500] levels) for MONAI/ignite; inputs in HU."""

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p, t = x2ctgan_levels(y_pred.double()), x2ctgan_levels(y.double())
        return _x2ctgan_psnr_values(p, t).reshape(-1, 1)


class X2CTGANSSIMMetric(RegressionMetric):
    """Per-volume X2CT-GAN SSIM (mean of axial/coronal/sagittal 2D slice SSIM) for MONAI/ignite; inputs in HU."""

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values = [
            x2ctgan_ssim(y_pred[i : i + 1], y[i : i + 1])["ssim_x2ctgan"] for i in range(y_pred.shape[0])
        ]
        return torch.tensor(values, dtype=torch.float64).reshape(-1, 1)


def network_to_hu(window: str | HUWindow = "xray2ct", symmetric: bool = False) -> Callable:
    """The function mapping network intensities ([0, 1], or [-1, 1] if ``symmetric``) to clipped HU."""
    w = get_window(window)

    def to_hu(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).as_subclass(torch.Tensor).float()
        return w.from_symmetric(x) if symmetric else w.from_unit(x)

    return to_hu


class CTMetrics:
    """Per-case metric object for :class:`common.handlers.MetricsReport`: every metric of :data:`CONVENTIONS`.

    ``metric(pred_hu, target_hu, context)`` with (1, X, Y, Z) or (X, Y, Z) HU tensors -> :func:`compute_ct_metrics`.
    """

    def __init__(self, win_size: int = DEFAULT_SSIM_WIN):
        self.win_size = int(win_size)
        self.conventions = CONVENTIONS

    def __call__(self, pred_hu, target_hu, context: dict | None = None) -> dict[str, float]:
        return compute_ct_metrics(pred_hu, target_hu, win_size=self.win_size)
