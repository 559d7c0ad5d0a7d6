"""DRR reprojection loss: zero for the ground truth, gradients for a prediction."""

import pytest
import torch

from common.drr import DRRProjector, get_geometry
from common.drr_loss import DRRReprojectionLoss, drr_consistency
from common.intensity import XRAY2CT


def _ct_unit(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, 16, 18, 12, generator=g)


def test_zero_for_ground_truth_and_positive_otherwise():
    geom = get_geometry("x2ctgan").resized(24)
    spacing = (12.0, 12.0, 16.0)
    gt = _ct_unit()
    xrays = DRRProjector(geom)(XRAY2CT.from_unit(gt), spacing)
    loss = DRRReprojectionLoss(geom)
    assert loss(gt, xrays, spacing).item() == pytest.approx(0.0, abs=1e-7)
    pred = _ct_unit(seed=1).requires_grad_(True)
    value = loss(pred, xrays, spacing)
    assert value.item() > 1e-3
    value.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    metrics = drr_consistency(XRAY2CT.from_unit(gt), xrays, spacing, geom)
    assert metrics["drr_l1_pa"] == pytest.approx(0.0, abs=1e-7) and metrics["drr_psnr_lateral"] == float(
        "inf"
    )


def test_missing_view_is_a_clear_error():
    loss = DRRReprojectionLoss("x2ctgan")
    with pytest.raises(KeyError, match="lateral"):
        loss(_ct_unit(), {"pa": torch.zeros(1, 1, 8, 8)}, (10.0, 10.0, 10.0))
