"""PE classifiers: a 3D CT encoder, a 2D X-ray encoder, or both with late fusion; one logit out.

The encoders are MONAI's ResNet (MedicalNet/Med3D layout) and DenseNet121; only the heads and the
late-fusion wrapper are written here because MONAI has no two-encoder fusion classifier.
"""

from __future__ import annotations

import logging
import os

import torch
from monai.networks.nets import DenseNet121, ResNet
from monai.networks.utils import copy_model_state
from torch import nn

from common.errors import InputError

MODALITIES = ("ct", "xray", "fusion")
ARCHS = ("resnet10", "resnet18", "densenet121")
RESNET_LAYERS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2]}
logger = logging.getLogger(__name__)


def build_encoder(
    arch: str, spatial_dims: int, in_channels: int = 1, width: float = 1.0, pretrained_path: str | None = None
) -> tuple[nn.Module, int]:
    """A MONAI encoder returning pooled features ``(B, F)`` and its feature size ``F``.

    ``width`` scales the channel counts (1.0 = the published networks; the CPU overlay uses ~0.125).
    ``pretrained_path`` optionally loads a local state dict (e.g. MedicalNet ``resnet_10_23dataset.pth``);
    nothing is ever downloaded.
    """
    if arch in RESNET_LAYERS:
        net = ResNet(
            block="basic",
            layers=RESNET_LAYERS[arch],
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,  # MedicalNet's stem
            widen_factor=width,
            feed_forward=False,
            shortcut_type="B",
            bias_downsample=False,
        )
        n_features = int(512 * width)
    elif arch == "densenet121":
        net = DenseNet121(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            init_features=max(8, int(64 * width)),
            growth_rate=max(4, int(32 * width)),
        )
        n_features = net.class_layers.out.in_features
        net.class_layers.out = nn.Identity()
    else:
        raise ValueError(f"unknown encoder {arch!r}; choose one of {ARCHS}")
    if pretrained_path:
        load_local_weights(net, pretrained_path)
    return net, n_features


def load_local_weights(net: nn.Module, path: str) -> list[str]:
    """Copy matching tensors from a local checkpoint (``state_dict`` / ``model`` / plain dict, ``module.``
    prefixes stripped) into ``net``; returns the names that were loaded."""
    if not os.path.isfile(path):
        raise InputError(path, "pretrained weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    _, updated, unchanged = copy_model_state(net, state, inplace=True)
    if not updated:
        raise InputError(path, "no tensor in the checkpoint matches the encoder (wrong architecture?)")
    logger.info("loaded %d tensors from %s (%d left at init)", len(updated), path, len(unchanged))
    return list(updated)


class SingleModalityClassifier(nn.Module):
    """Encoder + dropout + linear: one logit per image (CT volume or X-ray)."""

    def __init__(self, encoder: nn.Module, n_features: int, dropout: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(n_features, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(image))


class LateFusionClassifier(nn.Module):
    """Concatenate the CT and X-ray encoders' pooled features, then one linear layer (late fusion)."""

    def __init__(
        self,
        ct_encoder: nn.Module,
        ct_features: int,
        xray_encoder: nn.Module,
        xray_features: int,
        dropout=0.2,
    ):
        super().__init__()
        self.ct_encoder = ct_encoder
        self.xray_encoder = xray_encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(ct_features + xray_features, 1))

    def forward(self, ct: torch.Tensor, xray: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.ct_encoder(ct), self.xray_encoder(xray)], dim=1))


def build_pe_classifier(
    modality: str = "ct",
    ct_arch: str = "resnet10",
    xray_arch: str = "densenet121",
    ct_width: float = 1.0,
    xray_width: float = 1.0,
    dropout: float = 0.2,
    ct_pretrained: str | None = None,
    xray_pretrained: str | None = None,
) -> nn.Module:
    """The network for ``modality``: ``ct`` (3D), ``xray`` (2D) or ``fusion`` (forward(ct, xray))."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if modality == "ct":
        return SingleModalityClassifier(*build_encoder(ct_arch, 3, 1, ct_width, ct_pretrained), dropout)
    if modality == "xray":
        return SingleModalityClassifier(*build_encoder(xray_arch, 2, 1, xray_width, xray_pretrained), dropout)
    ct = build_encoder(ct_arch, 3, 1, ct_width, ct_pretrained)
    xr = build_encoder(xray_arch, 2, 1, xray_width, xray_pretrained)
    return LateFusionClassifier(ct[0], ct[1], xr[0], xr[1], dropout)
