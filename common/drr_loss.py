"""DRR reprojection: render a predicted CT's radiographs and compare them with the input X-rays.

Used as a training loss (progressive cascade, stage 3) and as an evaluation metric ("DRR consistency")
for any model that produces a CT from radiographs. The renderer is :func:`common.drr.render_drr`, with
the same geometry that made the inputs, resized to the inputs' pixel count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from common.drr import DRRGeometry, drr_to_image, get_geometry, render_drr
from common.intensity import HUWindow, get_window, hu_to_mu


class DRRReprojectionLoss(torch.nn.Module):
    """Mean L1 between DRR images of ``pred`` and the given X-ray images, averaged over views.

    ``pred`` is (B, 1, X, Y, Z) in canonical RAS, either HU (``input_is_hu=True``) or the unit
    intensity of ``window`` (default: our XRAY2CT convention). X-rays are (B, 1, H, W) DRR-style images
    in [0, 1] (:func:`common.drr.drr_to_image`). Zero for the ground-truth CT; differentiable in ``pred``.
    """

    def __init__(
        self,
        geometry: str | dict | DRRGeometry,
        views: Sequence[str] = ("pa", "lateral"),
        window: str | HUWindow = "xray2ct",
        input_is_hu: bool = False,
    ):
        super().__init__()
        self.geometry = get_geometry(geometry)
        self.views = tuple(views)
        self.window = get_window(window)
        self.input_is_hu = input_is_hu

    def render(
        self, pred: torch.Tensor, spacing: Sequence[float], pixels: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        hu = pred if self.input_is_hu else self.window.from_unit(pred)
        mu = hu_to_mu(hu)
        geom = self.geometry.resized(tuple(int(p) for p in pixels))
        return {view: drr_to_image(render_drr(mu, spacing, geom, view)) for view in self.views}

    def forward(
        self, pred: torch.Tensor, xrays: Mapping[str, torch.Tensor], spacing: Sequence[float]
    ) -> torch.Tensor:
        missing = [v for v in self.views if v not in xrays]
        if missing:
            raise KeyError(f"DRR reprojection needs X-rays for views {missing}; got {sorted(xrays)}")
        pixels = xrays[self.views[0]].shape[-2:]
        drrs = self.render(pred, spacing, pixels)
        losses = [torch.mean(torch.abs(drrs[v] - xrays[v].to(drrs[v]))) for v in self.views]
        return torch.stack(losses).mean()


@torch.no_grad()
def drr_consistency(
    pred_hu: torch.Tensor,
    xrays: Mapping[str, torch.Tensor],
    spacing: Sequence[float],
    geometry: str | dict | DRRGeometry,
) -> dict[str, float]:
    """Per-view L1 and PSNR (data range 1) between the predicted CT's DRRs and the given X-rays."""
    return drr_consistency_with_drrs(pred_hu, xrays, spacing, geometry)[0]


@torch.no_grad()
def drr_consistency_with_drrs(
    pred_hu: torch.Tensor,
    xrays: Mapping[str, torch.Tensor],
    spacing: Sequence[float],
    geometry: str | dict | DRRGeometry,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """:func:`drr_consistency` and the DRRs it scored (view -> (B, 1, H, W) in [0, 1]), e.g. to show them."""
    loss = DRRReprojectionLoss(geometry, views=tuple(xrays), input_is_hu=True)
    pixels = next(iter(xrays.values())).shape[-2:]
    drrs = loss.render(pred_hu, spacing, pixels)
    out: dict[str, float] = {}
    for view, drr in drrs.items():
        target = xrays[view].to(drr)
        mse = torch.mean((drr - target) ** 2).item()
        out[f"drr_l1_{view}"] = torch.mean(torch.abs(drr - target)).item()
        out[f"drr_psnr_{view}"] = float("inf") if mse == 0 else float(-10.0 * torch.log10(torch.tensor(mse)))
    return out, drrs


def add_view_means(values: dict[str, float], views: Sequence[str]) -> dict[str, float]:
    """Add ``drr_l1`` and ``drr_psnr``: the means of the per-view scores over ``views`` (in place)."""
    for kind in ("l1", "psnr"):
        values[f"drr_{kind}"] = float(sum(values[f"drr_{kind}_{v}"] for v in views) / len(views))
    return values


DRR_CONVENTIONS = {
    "drr_consistency": {
        "definition": "DRRs of the predicted CT (HU, common.drr.render_drr with the dataset's geometry at the input "
        "pixel count) against the input X-rays in [0, 1]: mean L1 and PSNR (data range 1) per view "
        "(drr_l1_<view>, drr_psnr_<view>) and their mean over the views (drr_l1, drr_psnr)",
        "keys": ["drr_l1", "drr_psnr", "drr_l1_<view>", "drr_psnr_<view>"],
    }
}


class DRRConsistency:
    """Per-case metric object for :class:`common.handlers.MetricsReport`: how well a CT's DRRs match its X-rays.

    Called ``metric(pred_hu (C, X, Y, Z), target_hu, context)``; ``context["image"]`` is the network input,
    (V, H, W) X-rays in [0, 1] whose channels are ``views`` in order. The voxel spacing is ``spacing`` or,
    for outputs whose size varies (cascade stages), ``fov_mm / shape``.
    """

    def __init__(
        self,
        geometry: str | dict | DRRGeometry,
        views: Sequence[str] = ("pa", "lateral"),
        spacing: Sequence[float] | None = None,
        fov_mm: Sequence[float] | None = None,
    ):
        if (spacing is None) == (fov_mm is None):
            raise ValueError("give exactly one of spacing and fov_mm")
        self.geometry = get_geometry(geometry)
        self.views = tuple(views)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.fov_mm = None if fov_mm is None else tuple(float(f) for f in fov_mm)
        self.conventions = DRR_CONVENTIONS

    def __call__(self, pred_hu: torch.Tensor, target_hu: torch.Tensor | None, context: Mapping) -> dict[str, float]:
        image = torch.as_tensor(context["image"]).as_subclass(torch.Tensor).detach().float().cpu()
        image = image.reshape(-1, *image.shape[-2:])
        if image.shape[0] != len(self.views):
            raise ValueError(f"expected {len(self.views)} X-ray channel(s) {self.views}, got {image.shape[0]}")
        volume = torch.as_tensor(pred_hu).as_subclass(torch.Tensor).detach().float().cpu()
        volume = volume.reshape(1, 1, *volume.shape[-3:])
        spacing = self.spacing or tuple(f / n for f, n in zip(self.fov_mm, volume.shape[2:]))
        xrays = {view: image[i][None, None] for i, view in enumerate(self.views)}
        return add_view_means(drr_consistency(volume, xrays, spacing, self.geometry), self.views)
