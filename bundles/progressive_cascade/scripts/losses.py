"""Per-stage training losses of the cascade (weights configurable, defaults from the method's seed).

- stage 1: ``l1 * L1 + ssim * (1 - SSIM3D)``                    (1.0, 0.5; MONAI ``SSIMLoss``)
- stage 2: + ``perceptual * tri-planar perceptual``                (0.1; local weights only)
- stage 3: + ``edge * 3D gradient L1`` + ``drr * DRR reprojection``  (0.2, 0.3)

The DRR term renders PA and lateral DRRs of the prediction with the geometry that made the inputs
(:class:`common.drr_loss.DRRReprojectionLoss`) and compares them with the input X-rays.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import PerceptualLoss, SSIMLoss

from common.drr_loss import DRRReprojectionLoss
from common.errors import InputError

STAGE_TERMS = {
    1: ("l1", "ssim"),
    2: ("l1", "ssim", "perceptual"),
    3: ("l1", "ssim", "perceptual", "edge", "drr"),
}


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the forward differences of two volumes along each spatial axis (edge loss).

    Written here: MONAI has no gradient-difference loss for images (``BendingEnergyLoss`` is for DDFs).
    """
    total = pred.new_zeros(())
    for dim in range(2, pred.ndim):
        total = total + torch.mean(torch.abs(torch.diff(pred, dim=dim) - torch.diff(target, dim=dim)))
    return total / (pred.ndim - 2)


class TriPlanarPerceptualLoss(nn.Module):
    """Perceptual loss on axial, coronal and sagittal slices, from LOCAL weights only (never downloads).

    ``network="torchscript"``: ``weights_path`` is a TorchScript 2D feature extractor (1 channel in,
    features out); the loss is the mean squared difference of channel-normalised features (LPIPS-style,
    unit weights) over the three slice stacks. ``network="resnet50"``: MONAI ``PerceptualLoss`` with
    ``is_fake_3d=True`` and ``pretrained_path`` (needs torchvision). Without ``weights_path`` the loss is
    disabled with a warning and returns 0.
    """

    def __init__(
        self, weights_path: str | None = None, network: str = "torchscript", fake_3d_ratio: float = 0.5
    ):
        super().__init__()
        self.enabled = bool(weights_path)
        self.network = network
        self.fake_3d_ratio = float(fake_3d_ratio)
        self.features = None
        self.monai_loss = None
        if not self.enabled:
            warnings.warn(
                "perceptual loss skipped: no local weights path given (downloads are never made)",
                stacklevel=2,
            )
            return
        if not os.path.isfile(weights_path):
            raise InputError(weights_path, "perceptual weights file not found")
        if network == "torchscript":
            self.features = torch.jit.load(weights_path, map_location="cpu").eval()
            for p in self.features.parameters():  # frozen: ScriptModules have no requires_grad_()
                p.requires_grad = False
        elif network == "resnet50":
            self.monai_loss = PerceptualLoss(
                spatial_dims=3,
                network_type="resnet50",
                is_fake_3d=True,
                fake_3d_ratio=fake_3d_ratio,
                pretrained=True,
                pretrained_path=weights_path,
            )
            self.monai_loss.requires_grad_(False)
        else:
            raise ValueError(f"unknown perceptual network {network!r}; use 'torchscript' or 'resnet50'")

    def _slices(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        moved = torch.movedim(x, axis, 2)  # (B, C, n, h, w)
        n = moved.shape[2]
        keep = max(1, int(round(n * self.fake_3d_ratio)))
        idx = torch.linspace(0, n - 1, keep, device=x.device).round().long()
        picked = moved.index_select(2, idx)
        return picked.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], *picked.shape[3:])

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return pred.new_zeros(())
        if self.monai_loss is not None:
            return self.monai_loss(pred.float(), target.float())
        total = pred.new_zeros(())
        for axis in (2, 3, 4):
            fp = self.features(self._slices(pred.float(), axis))
            ft = self.features(self._slices(target.float(), axis))
            fp = fp / (fp.norm(dim=1, keepdim=True) + 1e-8)
            ft = ft / (ft.norm(dim=1, keepdim=True) + 1e-8)
            total = total + torch.mean((fp - ft) ** 2)
        return total / 3.0


class CascadeStageLoss(nn.Module):
    """Weighted sum of the terms of ``stage``; ``target`` holds ``ct`` (any size) and the input X-rays.

    ``target = {"ct": (B,1,N,N,N) unit CT, "pa": (B,1,H,W), "lateral": (B,1,H,W)}``; the CT is
    area-resampled to the prediction's size. ``last_terms`` keeps the unweighted terms of the last call.
    """

    def __init__(
        self,
        stage: int,
        geometry,
        fov_mm: Sequence[float],
        l1_weight: float = 1.0,
        ssim_weight: float = 0.5,
        perceptual_weight: float = 0.1,
        edge_weight: float = 0.2,
        drr_weight: float = 0.3,
        perceptual_weights_path: str | None = None,
        perceptual_network: str = "torchscript",
        ssim_win_size: int = 7,
        hu_window: str = "xray2ct",
    ):
        super().__init__()
        if stage not in STAGE_TERMS:
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        weights = {"l1": l1_weight, "ssim": ssim_weight, "perceptual": perceptual_weight, "edge": edge_weight}
        weights["drr"] = drr_weight
        self.weights = {t: float(weights[t]) for t in STAGE_TERMS[stage] if float(weights[t]) != 0.0}
        self.fov_mm = tuple(float(f) for f in fov_mm)
        self.ssim = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=ssim_win_size)
        self.perceptual = (
            TriPlanarPerceptualLoss(perceptual_weights_path, perceptual_network)
            if "perceptual" in self.weights
            else None
        )
        if self.perceptual is not None and not self.perceptual.enabled:
            del self.weights["perceptual"]
        self.drr = DRRReprojectionLoss(geometry, window=hu_window) if "drr" in self.weights else None
        self.last_terms: dict[str, float] = {}

    def spacing(self, size: Sequence[int]) -> tuple[float, ...]:
        return tuple(f / n for f, n in zip(self.fov_mm, size))

    def forward(self, pred: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pred = pred.float()
        ct = target["ct"].float()
        if ct.shape[2:] != pred.shape[2:]:
            ct = F.interpolate(ct, size=pred.shape[2:], mode="area")
        terms = {}
        for name in self.weights:
            if name == "l1":
                terms[name] = F.l1_loss(pred, ct)
            elif name == "ssim":
                terms[name] = self.ssim(pred, ct)
            elif name == "perceptual":
                terms[name] = self.perceptual(pred, ct)
            elif name == "edge":
                terms[name] = gradient_l1(pred, ct)
            elif name == "drr":
                xrays = {v: target[v].float() for v in ("pa", "lateral")}
                terms[name] = self.drr(pred, xrays, self.spacing(pred.shape[2:]))
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return sum(self.weights[k] * v for k, v in terms.items())
