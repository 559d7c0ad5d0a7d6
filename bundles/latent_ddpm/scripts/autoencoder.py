"""The frozen VQ-GAN (bundles/vqgan_3d_patch) as the latent codec of the diffusion model."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from bundles.vqgan_3d_patch.scripts.networks import downsampling_factor
from common.codec import load_vqgan
from common.errors import require_file


def vqgan_network_def(config_files: str | Sequence[str]) -> torch.nn.Module:
    """Build ``network_def`` from vqgan_3d_patch configs (a file or a list: train.json [+ cpu_tiny.json])."""
    from monai.bundle import ConfigParser

    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    parser = ConfigParser()
    parser.read_config([require_file(f) for f in files])
    return parser.get_parsed_content("network_def")


def load_frozen_vqgan(
    checkpoint: str | os.PathLike, config_files: str | Sequence[str], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The trained VQ-GAN in eval mode with gradients off (it is never trained here)."""
    net = load_vqgan(checkpoint, vqgan_network_def(config_files), device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def latent_factor(net: torch.nn.Module) -> int:
    """Image voxels per latent voxel along each axis."""
    return downsampling_factor(getattr(net, "module", net))
