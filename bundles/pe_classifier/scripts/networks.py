"""PE classifiers: a 3D CT encoder, a 2D X-ray encoder, or both with late fusion; one logit out.

The encoders are MONAI's ResNet (MedicalNet/Med3D layout) and DenseNet121; only the heads and the
late-fusion wrapper are written here because MONAI has no two-encoder fusion classifier.

MedicalNet (Tencent, Med3D) weights: ``ct_pretrained`` takes a local ``resnet_{10,18,34,50}[_23dataset].pth``
(``{"state_dict": {"module.conv1.weight", ...}}``). The ResNets are built with MONAI's own MedicalNet
layout (``monai.networks.nets.resnet.get_medicalnet_pretrained_resnet_args``: shortcut ``A`` for 18/34,
``B`` without bias for 10/50) and loaded the way MONAI's ``resnetXX(pretrained=...)`` does (``module.``
stripped, ``weights_only=True``); MONAI's own entry point downloads from a hub or expects a bare state
dict, so the unwrapping, the depth check and the report are here. MedicalNet's segmentation head
(``conv_seg``) is reported and ignored. MedicalNet trained layer3/layer4 with dilation 2/4 and stride 1;
MONAI's ResNet uses stride 2 without dilation, so the weights are an initialisation, not the same features.
"""

from __future__ import annotations

import logging
import re

import torch
from monai.networks.nets import DenseNet121, ResNet
from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args
from monai.networks.utils import copy_model_state
from torch import nn

from common.errors import InputError
from common.weights import read_state_dict

MODALITIES = ("ct", "xray", "fusion")
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "densenet121")
# MedicalNet's depths: (block, blocks per layer)
RESNET_LAYERS = {
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
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
        block, layers = RESNET_LAYERS[arch]
        bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(int(arch[len("resnet") :]))
        net = ResNet(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,  # MedicalNet's stem
            widen_factor=width,
            feed_forward=False,
            shortcut_type=shortcut_type,
            bias_downsample=bias_downsample,
        )
        n_features = int(512 * width) * (4 if block == "bottleneck" else 1)
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
        if arch in RESNET_LAYERS:
            load_medicalnet_weights(net, pretrained_path, arch)
        else:
            load_local_weights(net, pretrained_path)
    return net, n_features


def medicalnet_depth(state: dict[str, torch.Tensor]) -> int | None:
    """ResNet depth of a MedicalNet-layout state dict (10/18/34/50/101/152/200), None if not a ResNet."""
    if "conv1.weight" not in state or not any(k.startswith("layer4.") for k in state):
        return None
    counts = []
    for i in range(1, 5):
        counts.append(len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    table = {
        ((1, 1, 1, 1), False): 10, ((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34,
        ((3, 4, 6, 3), True): 50, ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152,
        ((3, 24, 36, 3), True): 200,
    }  # fmt: skip
    return table.get((tuple(counts), bottleneck), -1)


def load_medicalnet_weights(net: nn.Module, path: str, arch: str) -> dict[str, list[str]]:
    """Load MedicalNet weights into ``net`` (built by :func:`build_encoder` for ``arch``).

    Refuses a checkpoint of another depth or width, or one that is no ResNet, with the file name and the
    fix; returns and logs which tensors were loaded and which of the file were ignored (``conv_seg``).
    """
    state = read_state_dict(path, "pretrained weights")
    depth = medicalnet_depth(state)
    want = int(arch[len("resnet") :])
    if depth is None:
        raise InputError(
            path, f"not a MedicalNet ResNet checkpoint (no conv1/layer4 weights; keys: {sorted(state)[:4]})"
        )
    if depth != want:
        found = f"ResNet-{depth}" if depth > 0 else "a ResNet of unknown depth"
        if f"resnet{depth}" in RESNET_LAYERS:
            fix = f"set ct_arch to resnet{depth}"
        else:  # 101/152/200 exist in MedicalNet's release but not among ct_arch's values
            fix = f"ct_arch accepts {', '.join(RESNET_LAYERS)}: use MedicalNet's resnet_{{10,18,34,50}} weights"
        raise InputError(path, f"checkpoint is {found} but the encoder is {arch}: {fix}")
    ours = net.state_dict()
    if ours["conv1.weight"].shape != state["conv1.weight"].shape:
        raise InputError(
            path,
            f"conv1 is {tuple(state['conv1.weight'].shape)} in the checkpoint but {tuple(ours['conv1.weight'].shape)} "
            "here: MedicalNet weights need width 1.0 and one input channel",
        )
    backbone = {k: v for k, v in state.items() if k in ours}
    unexpected = sorted(k for k in state if k not in ours)
    try:
        missing = net.load_state_dict(backbone, strict=False).missing_keys
    except RuntimeError as e:
        raise InputError(path, f"tensor shapes differ from {arch}: {e}") from e
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise InputError(path, f"checkpoint lacks {len(missing)} tensors of {arch}, e.g. {missing[:4]}")
    logger.info(
        "MedicalNet %s: loaded %d tensors from %s; ignored %d (%s)",
        arch, len(backbone), path, len(unexpected), ", ".join(sorted({k.split('.')[0] for k in unexpected})) or "none",
    )  # fmt: skip
    return {"loaded": sorted(backbone), "missing": missing, "ignored": unexpected}


def load_local_weights(net: nn.Module, path: str) -> list[str]:
    """Copy matching tensors from a local checkpoint (``state_dict`` / ``model`` / plain dict, ``module.``
    prefixes stripped) into ``net``; returns the names that were loaded."""
    state = read_state_dict(path, "pretrained weights")
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
