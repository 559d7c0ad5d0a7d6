"""The PerX2CT network (Kyung et al., ICASSP 2023): 2D encoders + perspective feature sampling + slice decoder.

For every CT slice, a coarse F x F grid of 3D points is projected into the PA and the lateral radiograph
(:mod:`bundles.perx2ct.scripts.geometry`, i.e. ``common.drr``'s camera). The 2D encoder features found
there (bilinear ``grid_sample``) and a NeRF positional encoding of the point are concatenated
(2 x 512 + 63 = 1087 channels in the paper) and a 2D decoder (the VQGAN/taming decoder, here MONAI's
``AutoencoderKL`` decoder, same design) upsamples the F x F grid to the N x N slice.

Whole volumes are decoded in batched chunks of slices (``chunk_size`` slices per decoder call), not one
Python step per slice as the original repository does.

Optional mean-CT prior (``mean_prior=True``; not in the paper, off by default): the decoder predicts the
residual to the mean training CT, whose slices are added to its output, and its last convolution starts
at zero, so an untrained network predicts exactly the mean-CT baseline and training only has to learn
what the X-rays change. At CPU size this is what makes the model beat that baseline (see
benchmarks/learning.py); the prior is a persistent buffer, saved in and loaded from checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import ResNet
from monai.networks.nets.autoencoderkl import Decoder

from bundles.perx2ct.scripts.geometry import VIEWS, projection_grids
from common.drr import get_geometry


class NeRFPositionalEncoding(nn.Module):
    """``[x, sin(2^k x), cos(2^k x)]_{k<L}`` per coordinate (NeRF, ``multires`` = L; 3 + 6L channels).

    Written here because MONAI has no NeRF-style frequency encoding.
    """

    def __init__(self, multires: int = 10, in_dims: int = 3):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(multires, dtype=torch.float32), persistent=False)
        self.out_channels = in_dims * (1 + 2 * multires)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        scaled = coords.unsqueeze(-1) * self.freqs  # (..., 3, L)
        parts = [coords, torch.sin(scaled).flatten(-2), torch.cos(scaled).flatten(-2)]
        # NeRF order interleaves sin/cos per frequency; the channel order does not matter to the decoder.
        return torch.cat(parts, dim=-1)


class XrayEncoder(nn.Module):
    """ResNet stem + layer1 + layer2 (PerX2CT: ResNet-101 up to ``layer2``, stride 8), then 3x3 conv to ``latent_dim``.

    Built from MONAI's ResNet; layer3/layer4 are dropped (never used). Grayscale input: the paper repeats
    the X-ray to 3 channels for ImageNet weights, which we do not download.
    """

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4),
        block_inplanes: Sequence[int] = (64, 128),
        latent_dim: int = 512,
        in_channels: int = 1,
    ):
        super().__init__()
        resnet = ResNet(
            block,
            [int(layers[0]), int(layers[1]), 1, 1],
            [int(block_inplanes[0]), int(block_inplanes[1]), 8, 8],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            num_classes=1,
        )
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.act, resnet.maxpool)
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        expansion = 4 if block == "bottleneck" else 1
        feat_ch = int(block_inplanes[1]) * expansion
        if feat_ch != latent_dim:
            self.project = nn.Sequential(
                nn.Conv2d(feat_ch, latent_dim, 3, padding=1, bias=False),
                nn.BatchNorm2d(latent_dim),
                nn.ReLU(),
            )
        else:
            self.project = nn.Identity()
        self.out_channels = latent_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.layer2(self.layer1(self.stem(x))))


class PerX2CTNet(nn.Module):
    """PA + lateral X-rays ``(B, 2, H, W)`` in [0, 1] -> CT ``(B, 1, N, N, N)`` (or chosen slices) in [0, 1].

    Args:
        volume_size: N, the cubic output size (128 in the paper).
        spacing: output voxel size (mm); with ``geometry`` it fixes where each voxel projects.
        image_size: X-ray size the network expects (128 in the paper).
        geometry: ``common.drr`` preset name or dict (``"perx2ct"``).
        feature_res: F, the coarse grid per slice that is decoded to N x N (32 in the paper).
        decoder_channels: decoder widths from fine to coarse (paper: 128, 256, 512); N = F * 2^(len-1).
        attention: self-attention at the coarsest decoder level and in the middle block as in the
            taming decoder (needs ``einops``).
        decode_axis: slice axis for whole volumes (0 sagittal, 1 coronal, 2 axial).
        chunk_size: slices per decoder call when decoding a whole volume.
        mean_prior: add a (N, N, N) prior volume (set with :meth:`set_mean_prior`, e.g. the mean training
            CT in [0, 1]) to the decoded slices and zero-initialise the decoder's last convolution.
    """

    def __init__(
        self,
        volume_size: int = 128,
        spacing: Sequence[float] = (2.5, 2.5, 2.5),
        image_size: int = 128,
        geometry: str | dict = "perx2ct",
        feature_res: int = 32,
        encoder_block: str = "bottleneck",
        encoder_layers: Sequence[int] = (3, 4),
        encoder_inplanes: Sequence[int] = (64, 128),
        latent_dim: int = 512,
        pe_multires: int = 10,
        decoder_channels: Sequence[int] = (128, 256, 512),
        decoder_res_blocks: int = 2,
        norm_num_groups: int = 32,
        attention: bool = True,
        decode_axis: int = 2,
        chunk_size: int = 16,
        mean_prior: bool = False,
    ):
        super().__init__()
        upsample = 2 ** (len(decoder_channels) - 1)
        if feature_res * upsample != volume_size:
            raise ValueError(
                f"feature_res {feature_res} x 2^{len(decoder_channels) - 1} must equal volume_size {volume_size}"
            )
        self.volume_size = int(volume_size)
        self.image_size = int(image_size)
        self.feature_res = int(feature_res)
        self.decode_axis = int(decode_axis)
        self.chunk_size = int(chunk_size)
        self.spacing = tuple(float(s) for s in spacing)
        # Stored in checkpoints so a loader can rebuild the same geometry (see _load_from_state_dict).
        self.register_buffer("spacing_mm", torch.tensor(self.spacing, dtype=torch.float64))
        geom = get_geometry(geometry)
        self.geometry = geom
        self.register_buffer(
            "geometry_mm", torch.tensor([geom.sad, geom.sid, *geom.detector_size_mm], dtype=torch.float64)
        )
        self.encoders = nn.ModuleList(
            XrayEncoder(encoder_block, encoder_layers, encoder_inplanes, latent_dim) for _ in VIEWS
        )
        self.pos_enc = NeRFPositionalEncoding(pe_multires)
        z_channels = len(VIEWS) * latent_dim + self.pos_enc.out_channels
        n = len(decoder_channels)
        self.decoder = Decoder(
            spatial_dims=2,
            channels=tuple(int(c) for c in decoder_channels),
            in_channels=z_channels,
            out_channels=1,
            num_res_blocks=(int(decoder_res_blocks),) * n,
            norm_num_groups=int(norm_num_groups),
            norm_eps=1e-6,
            attention_levels=(False,) * (n - 1) + (bool(attention),),
            with_nonlocal_attn=bool(attention),
        )
        self.mean_prior = bool(mean_prior)
        if self.mean_prior:
            self.register_buffer("prior", torch.zeros((self.volume_size,) * 3))
            last = self.decoder.blocks[-1].conv
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        for axis in range(3):  # geometry is fixed by the config: recomputed, never stored in checkpoints
            grids = projection_grids(volume_size, feature_res, self.spacing, geometry, image_size, axis)
            for key, value in grids.items():
                self.register_buffer(f"_{key}_{axis}", value, persistent=False)

    @torch.no_grad()
    def set_mean_prior(self, volume: torch.Tensor) -> PerX2CTNet:
        """Store the prior (N, N, N) in the output scale ([0, 1]); needs ``mean_prior=True``."""
        if not self.mean_prior:
            raise ValueError("the network was built without mean_prior=True")
        volume = torch.as_tensor(volume, dtype=torch.float32).reshape(-1, *volume.shape[-3:])[0]
        if tuple(volume.shape) != tuple(self.prior.shape):
            raise ValueError(
                f"prior shape {tuple(volume.shape)} differs from the volume {tuple(self.prior.shape)}"
            )
        self.prior.copy_(volume.to(self.prior.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        has_prior = prefix + "prior" in state_dict
        if has_prior != self.mean_prior:
            raise ValueError(
                f"checkpoint {'has' if has_prior else 'has no'} mean-CT prior but the network was built with "
                f"mean_prior={self.mean_prior}; set 'network_def#mean_prior' to {has_prior}"
            )
        for name, what in (
            ("spacing_mm", "voxel spacing (mm)"),
            ("geometry_mm", "DRR geometry [SAD, SID, det h, det w]"),
        ):
            key = prefix + name
            mine = getattr(self, name).cpu()
            if key in state_dict and not torch.allclose(state_dict[key].double().cpu(), mine):
                raise ValueError(
                    f"checkpoint was trained for {what} {state_dict[key].tolist()} but the network was built "
                    f"for {mine.tolist()}; set 'spacing'/'geometry' in the config to match"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _buffer(self, key: str, axis: int) -> torch.Tensor:
        return getattr(self, f"_{key}_{axis}")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-view feature maps from ``x`` = (B, 2, H, W) (channel 0 PA, 1 lateral)."""
        if (
            x.ndim != 4
            or x.shape[1] != len(VIEWS)
            or tuple(x.shape[2:]) != (self.image_size, self.image_size)
        ):
            raise ValueError(
                f"expected (B, 2, {self.image_size}, {self.image_size}) PA+lateral images, got {tuple(x.shape)}"
            )
        return [enc(x[:, i : i + 1]) for i, enc in enumerate(self.encoders)]

    def decode_slices(self, feats: list[torch.Tensor], index: torch.Tensor, axis: int) -> torch.Tensor:
        """Slices ``index`` (B, K) along ``axis`` -> (B, K, N, N), all K x B slices in one decoder call."""
        b, k = index.shape
        f = self.feature_res
        parts = []
        for view, feat in zip(VIEWS, feats):
            grid = self._buffer(view, axis)[index].to(feat.dtype).reshape(b, k * f, f, 2)
            sampled = F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            parts.append(sampled.reshape(b, -1, k, f, f).transpose(1, 2))  # (B, K, C, F, F)
        unit = self._buffer("unit", axis)[index]  # (B, K, F, F, 3)
        parts.append(self.pos_enc(unit).permute(0, 1, 4, 2, 3).to(parts[0].dtype))
        z = torch.cat(parts, dim=2).reshape(b * k, -1, f, f)
        out = self.decoder(z).reshape(b, k, self.volume_size, self.volume_size)  # (B, K, N, N)
        if self.mean_prior:
            out = out + self.prior.movedim(axis, 0)[index].to(out.dtype)
        return out

    def reconstruct(
        self, x: torch.Tensor, chunk_size: int | None = None, axis: int | None = None
    ) -> torch.Tensor:
        """Whole volume (B, 1, N, N, N) decoded ``chunk_size`` slices per decoder call (1 = slice by slice)."""
        axis = self.decode_axis if axis is None else int(axis)
        chunk = self.chunk_size if chunk_size is None else max(1, int(chunk_size))
        feats = self.encode(x)
        b, n = x.shape[0], self.volume_size
        chunks = []
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(n, start + chunk), device=x.device).unsqueeze(0).expand(b, -1)
            chunks.append(self.decode_slices(feats, idx, axis))
        vol = torch.cat(chunks, dim=1)  # (B, N_slices, d1, d2): the remaining axes keep their order
        return vol.movedim(1, 1 + axis).unsqueeze(1)

    def forward(
        self, x: torch.Tensor, slice_index: torch.Tensor | None = None, axis: int | None = None
    ) -> torch.Tensor:
        """Whole volume (B, 1, N, N, N) by default; with ``slice_index`` (B,) or (B, K): slices (B, K, N, N)."""
        if slice_index is None:
            return self.reconstruct(x, axis=axis)
        axis = self.decode_axis if axis is None else int(axis)
        index = slice_index.long()
        if index.ndim == 1:
            index = index.unsqueeze(1)
        return self.decode_slices(self.encode(x), index, axis)
