"""The progressive cascade: a shared multi-scale X-ray encoder and one 3D refiner per resolution stage,
and the stage switching of training (load the previous stage's best checkpoint, freeze earlier stages).

Stage k reconstructs the CT at ``volume_sizes[k]`` from the PA + lateral feature maps at
``feature_sizes[k]``; stages after the first refine the upsampled output of the previous stage
(residual, final convolution zero-initialised so a new stage starts as the identity of the old one).

Ownership (what each stage trains; earlier stages are frozen): stage 1 owns the encoder trunk, its own
feature head and refiner; stage k > 1 owns only its feature head and refiner. So training a later stage
never changes an earlier stage's output.

2D -> 3D lifting is an exact cone-beam back-projection: every voxel centre is projected onto the
detector with :meth:`common.drr.DRRGeometry.project_points` (the geometry that rendered the inputs)
and the view's feature map is sampled there. Built from MONAI blocks (``ResidualUnit``,
``Convolution``, ``UpSample``); the refiner is our own small U-Net rather than ``monai.networks.nets.UNet``
because gradient checkpointing needs each block to be a separate call.

Optional mean-CT prior (``mean_prior=True``, off by default): stage 1 predicts
``sigmoid(logit(prior) + refiner)`` with the refiner's last convolution zero-initialised, the prior being
the mean training CT at stage 1's size (:meth:`ProgressiveCascade.set_mean_prior`, filled from the training
split by :func:`common.baselines.with_mean_prior`; a buffer saved in every stage's checkpoint). An untrained cascade
then outputs the mean-CT baseline at every stage instead of sigmoid(0) = 0.5 = +512 HU everywhere (a
white volume in any display window), and training learns what the X-rays add.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from torch.utils.checkpoint import checkpoint

from common.checkpoint import load_weights
from common.drr import DRRGeometry, get_geometry
from common.errors import InputError

VIEWS = ("pa", "lateral")
logger = logging.getLogger(__name__)


def voxel_centres_mm(size: int, fov_mm: Sequence[float]) -> torch.Tensor:
    """(N, N, N, 3) RAS mm of the voxel centres of an N^3 grid spanning ``fov_mm``, isocentre at 0."""
    axes = []
    for extent in fov_mm:
        step = float(extent) / size
        axes.append((torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0) * step)
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grid, dim=-1)


def backprojection_grid(geometry: DRRGeometry, size: int, fov_mm: Sequence[float], view: str) -> torch.Tensor:
    """``grid_sample`` coordinates (1, N*N, N, 2) of every voxel's projection on the detector.

    Normalised with ``align_corners=False`` so the same grid samples a feature map of any resolution
    covering the whole detector.
    """
    rows_cols = geometry.project_points(voxel_centres_mm(size, fov_mm), view)  # (N, N, N, 2)
    h, w = geometry.detector_pixels
    y = (rows_cols[..., 0] + 0.5) / h * 2.0 - 1.0
    x = (rows_cols[..., 1] + 0.5) / w * 2.0 - 1.0
    return torch.stack((x, y), dim=-1).reshape(1, size * size, size, 2).float()


class XrayPyramidEncoder(nn.Module):
    """Shared 2D trunk: an X-ray (B, 1, S, S) -> feature maps at S, S/2, S/4, ... (finest first)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64), norm: str | tuple = "instance"):
        super().__init__()
        self.stem = Convolution(2, 1, channels[0], kernel_size=3, norm=norm, act="prelu")
        levels = [ResidualUnit(2, channels[0], channels[0], norm=norm)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            levels.append(ResidualUnit(2, c_in, c_out, strides=2, norm=norm))
        self.levels = nn.ModuleList(levels)
        self.channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class Refiner3D(nn.Module):
    """Small 3D U-Net of MONAI ``ResidualUnit`` blocks; each block can be gradient-checkpointed."""

    def __init__(self, in_channels: int, channels: Sequence[int], norm: str | tuple = "instance"):
        super().__init__()
        self.down = nn.ModuleList([ResidualUnit(3, in_channels, channels[0], norm=norm)])
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.down.append(ResidualUnit(3, c_in, c_out, strides=2, norm=norm))
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for c_deep, c_skip in zip(reversed(channels[1:]), reversed(channels[:-1])):
            self.upsample.append(UpSample(3, c_deep, c_skip, scale_factor=2, mode="deconv"))
            self.up.append(ResidualUnit(3, 2 * c_skip, c_skip, norm=norm))
        self.head = Convolution(3, channels[0], 1, kernel_size=1, conv_only=True)
        self.use_checkpoint = False

    def _run(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = self._run(block, x)
            skips.append(x)
        skips.pop()
        for upsample, block in zip(self.upsample, self.up):
            x = self._run(upsample, x)
            x = self._run(block, torch.cat((x, skips.pop()), dim=1))
        return self.head(x)


class _Stage(nn.Module):
    """One resolution: per-stage 1x1 feature head (shared by both views), back-projection, refiner."""

    def __init__(
        self, geometry, size, fov_mm, enc_channels, head_channels, refiner_channels, has_previous, prior=False
    ):
        super().__init__()
        self.size = int(size)
        self.has_previous = has_previous
        self.use_prior = bool(prior) and not has_previous
        if self.use_prior:  # logit of the mean CT (B=1, 1, N, N, N); the untrained stage outputs the prior
            self.register_buffer("prior_logit", torch.zeros((1, 1) + (self.size,) * 3))
        self.feature_head = Convolution(2, enc_channels, head_channels, kernel_size=1, conv_only=True)
        in_channels = 2 * head_channels + (1 if has_previous else 0)
        self.refiner = Refiner3D(in_channels, refiner_channels)
        if has_previous or self.use_prior:  # start as the identity of the previous stage / the prior
            nn.init.zeros_(self.refiner.head.conv.weight)
            nn.init.zeros_(self.refiner.head.conv.bias)
        for view in VIEWS:
            self.register_buffer(
                f"grid_{view}", backprojection_grid(geometry, size, fov_mm, view), persistent=False
            )

    def lift(self, features: dict[str, torch.Tensor], previous: torch.Tensor | None) -> torch.Tensor:
        lifted = []
        for view in VIEWS:
            f = self.feature_head(features[view])
            grid = getattr(self, f"grid_{view}").to(f.dtype).expand(f.shape[0], -1, -1, -1)
            v = F.grid_sample(f, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            lifted.append(v.reshape(f.shape[0], f.shape[1], self.size, self.size, self.size))
        if previous is not None:
            lifted.append(
                F.interpolate(previous, size=(self.size,) * 3, mode="trilinear", align_corners=False)
            )
        return torch.cat(lifted, dim=1)

    def forward(self, features: dict[str, torch.Tensor], previous: torch.Tensor | None) -> torch.Tensor:
        use_ckpt = self.refiner.use_checkpoint and self.training and torch.is_grad_enabled()
        x = (
            checkpoint(self.lift, features, previous, use_reentrant=False)
            if use_ckpt
            else self.lift(features, previous)
        )
        out = self.refiner(x)
        if previous is None:
            return torch.sigmoid(out + self.prior_logit.to(out.dtype) if self.use_prior else out)
        return x[:, -1:] + out


class ProgressiveCascade(nn.Module):
    """X-ray pair (B, 2, S, S) = [PA, lateral] in [0, 1] -> CT (B, 1, N, N, N) in the XRAY2CT unit window.

    ``forward`` returns the active stage's output (``stage``); :meth:`forward_all` every stage's.
    """

    def __init__(
        self,
        geometry: str | dict | DRRGeometry,
        fov_mm: Sequence[float],
        volume_sizes: Sequence[int] = (64, 128, 256),
        xray_size: int = 512,
        feature_sizes: Sequence[int] = (128, 256, 512),
        encoder_channels: Sequence[int] = (16, 32, 64),
        head_channels: int = 8,
        refiner_channels: Sequence[Sequence[int]] = ((32, 64, 128), (16, 32, 64), (8, 16, 32)),
        gradient_checkpointing: Sequence[bool] = (False, False, True),
        stage: int = 3,
        mean_prior: bool = False,
    ):
        super().__init__()
        geometry = get_geometry(geometry)
        n = len(volume_sizes)
        if not (len(feature_sizes) == len(refiner_channels) == len(gradient_checkpointing) == n):
            raise ValueError(
                "volume_sizes, feature_sizes, refiner_channels, gradient_checkpointing need one entry per stage"
            )
        # encoder level of each stage: feature size = xray_size / 2**level
        self.levels = []
        for f in feature_sizes:
            level = (int(xray_size) // int(f)).bit_length() - 1
            if int(f) << level != int(xray_size) or level >= len(encoder_channels):
                raise ValueError(
                    f"feature size {f} must be xray_size {xray_size} / 2**k with k < {len(encoder_channels)}"
                )
            self.levels.append(level)
        self.xray_size = int(xray_size)
        self.volume_sizes = tuple(int(s) for s in volume_sizes)
        self.mean_prior = bool(mean_prior)
        self.encoder = XrayPyramidEncoder(encoder_channels)
        self.stages = nn.ModuleList(
            _Stage(geometry, size, fov_mm, encoder_channels[lvl], head_channels, ch, k > 0, mean_prior)
            for k, (size, lvl, ch) in enumerate(zip(volume_sizes, self.levels, refiner_channels))
        )
        for s, flag in zip(self.stages, gradient_checkpointing):
            s.refiner.use_checkpoint = bool(flag)
        self.stage = n
        self.frozen: tuple[nn.Module, ...] = ()
        self.set_stage(stage)

    @torch.no_grad()
    def set_mean_prior(self, mean_ct: torch.Tensor, eps: float = 1e-3) -> ProgressiveCascade:
        """Stage 1's prior from a mean CT (N, N, N) in [0, 1] at any size (area-resampled); needs ``mean_prior``."""
        first = self.stages[0]
        if not first.use_prior:
            raise ValueError("the cascade was built without mean_prior=True")
        x = torch.as_tensor(mean_ct, dtype=torch.float32).reshape(1, 1, *mean_ct.shape[-3:])
        x = F.interpolate(x, size=(first.size,) * 3, mode="area").clamp(eps, 1.0 - eps)
        first.prior_logit.copy_(torch.logit(x).to(first.prior_logit.device))
        return self

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_modules(self, stage: int) -> list[nn.Module]:
        """The modules stage ``stage`` (1-based) trains."""
        owned = [self.stages[stage - 1]]
        return [self.encoder, *owned] if stage == 1 else owned

    def set_stage(self, stage: int) -> ProgressiveCascade:
        """Make ``stage`` active: only its modules require gradients; earlier ones are frozen in eval mode."""
        if not 1 <= int(stage) <= self.num_stages:
            raise ValueError(f"stage must be in 1..{self.num_stages}, got {stage}")
        self.stage = int(stage)
        self.requires_grad_(False)
        for m in self.stage_modules(self.stage):
            m.requires_grad_(True)
        self.frozen = tuple(m for k in range(1, self.stage) for m in self.stage_modules(k))
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> ProgressiveCascade:
        """Like ``nn.Module.train`` but frozen stages stay in eval mode (engines call train() every step)."""
        super().train(mode)
        for m in self.frozen:
            m.eval()
        return self

    def encode(self, xrays: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if xrays.ndim != 4 or xrays.shape[1] != 2:
            raise ValueError(f"expected X-rays (B, 2, H, W) = [PA, lateral], got {tuple(xrays.shape)}")
        b = xrays.shape[0]
        pyramid = self.encoder(torch.cat((xrays[:, :1], xrays[:, 1:]), dim=0))  # both views, shared weights
        return [{"pa": pyramid[lvl][:b], "lateral": pyramid[lvl][b:]} for lvl in self.levels]

    def forward_all(self, xrays: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        features = self.encode(xrays)
        outputs: list[torch.Tensor] = []
        previous = None
        for k in range(upto or self.num_stages):
            if k + 1 < self.stage and self.training:
                with torch.no_grad():  # frozen: no graph, less memory
                    previous = self.stages[k](features[k], previous)
            else:
                previous = self.stages[k](features[k], previous)
            outputs.append(previous)
        return outputs

    def forward(self, xrays: torch.Tensor) -> torch.Tensor:
        return self.forward_all(xrays, upto=self.stage)[-1]


# ----------------------------------------------------------------------------------------------- stages
def best_checkpoint(ckpt_dir: str, stage: int) -> str:
    """``<ckpt_dir>/stage<k>_model.pt`` (best by the validation key metric)."""
    return os.path.join(ckpt_dir, f"stage{stage}_model.pt")


def final_checkpoint(ckpt_dir: str, stage: int) -> str:
    return os.path.join(ckpt_dir, f"stage{stage}_final.pt")


def find_stage_checkpoint(ckpt_dir: str, stage: int) -> str:
    """Best checkpoint of ``stage``, else its final one; :class:`InputError` when neither exists."""
    for path in (best_checkpoint(ckpt_dir, stage), final_checkpoint(ckpt_dir, stage)):
        if os.path.isfile(path):
            return path
    raise InputError(
        best_checkpoint(ckpt_dir, stage), f"no checkpoint of stage {stage}: train stage {stage} first"
    )


def prepare_stage(
    network: ProgressiveCascade, stage: int, ckpt_dir: str, previous_checkpoint: str | None = None
) -> ProgressiveCascade:
    """Activate ``stage``: for stage > 1 load the previous stage's checkpoint, then freeze earlier stages.

    The network definition has no stage (it is training state), so a stage's checkpoint records the same
    ``network_def`` as the others and :func:`common.checkpoint.load_weights` checks it.
    """
    stage = int(stage)
    if stage > 1:
        path = previous_checkpoint or find_stage_checkpoint(ckpt_dir, stage - 1)
        load_weights(network, path, expected_bundle="progressive_cascade")
        logger.info("stage %d: loaded stage %d weights from %s", stage, stage - 1, path)
    return network.set_stage(stage)


def trainable_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the active stage (the optimizer must not see frozen ones)."""
    return [p for p in network.parameters() if p.requires_grad]
