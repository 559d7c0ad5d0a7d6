"""The PerX2CT network (Kyung et al., ICASSP 2023): 2D encoder + perspective feature sampling + slice decoder.

For every CT slice, a coarse F x F grid of 3D points is projected into the PA and the lateral radiograph
(:mod:`bundles.perx2ct.scripts.geometry`: our DRR camera, or the released model's own camera). The 2D encoder
features found there (bilinear ``grid_sample``) and a NeRF positional encoding of the point are concatenated
(2 x 512 + 63 = 1087 channels in the paper) and a 2D decoder (the VQGAN/taming decoder, here MONAI's
``AutoencoderKL`` decoder, same blocks) upsamples the F x F grid to the N x N slice.

The defaults are the paper's architecture (``configs/PerX2CT.yaml`` of github.com/dek924/PerX2CT): one
ResNet-101-to-layer2 encoder shared by both views, a decoder with ch 128, ch_mult (1, 2, 4), 3 res blocks
per level (taming's ``num_res_blocks: 2`` builds ``num_res_blocks + 1`` per up level), attention at the
32 px level and in the middle block. ``scripts/convert_official.py`` maps the released checkpoint onto it.

Whole volumes are decoded in batched chunks of slices (``chunk_size`` slices per decoder call) with the
encoder run once, not one full forward per slice as the original repository does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets import ResNet
from monai.networks.nets.autoencoderkl import Decoder

from bundles.perx2ct.scripts.geometry import (
    CAMERAS,
    VIEWS,
    perx2ct_camera_grids,
    perx2ct_to_ras,
    perx2ct_view_orientation,
    projection_grids,
)
from common.drr import get_geometry

# torchvision's ImageNet statistics, which the released model normalises its 3-channel input with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NeRFPositionalEncoding(nn.Module):
    """``[x, sin(2^k x) for all k, cos(2^k x) for all k]`` per coordinate (NeRF, ``multires`` = L; 3 + 6L channels).

    Written here because MONAI has no NeRF-style frequency encoding. The original interleaves sin/cos per
    frequency; ``convert_official`` permutes the decoder's first convolution to this order (exact).
    """

    def __init__(self, multires: int = 10, in_dims: int = 3):
        super().__init__()
        self.multires = int(multires)
        self.register_buffer("freqs", 2.0 ** torch.arange(multires, dtype=torch.float32), persistent=False)
        self.out_channels = in_dims * (1 + 2 * multires)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        scaled = coords.unsqueeze(-1) * self.freqs  # (..., 3, L)
        parts = [coords, torch.sin(scaled).flatten(-2), torch.cos(scaled).flatten(-2)]
        return torch.cat(parts, dim=-1)


class XrayEncoder(nn.Module):
    """ResNet stem + layer1 + layer2 (PerX2CT: ResNet-101 up to ``layer2``, stride 8), projected to ``latent_dim``.

    Built from MONAI's ResNet in torchvision's layout (7x7 stride-2 stem, max-pool, bottleneck stride on the
    3x3 conv, no bias in the downsampling conv); layer3/layer4 are dropped (never used). Like the original,
    a 3x3 conv + BN + ReLU maps to ``latent_dim`` only when layer2's width differs (ResNet-101: 512 = 512,
    so none). ``in_channels`` 3 repeats a grey X-ray to 3 channels; ``normalization="imagenet"`` then
    standardises it with ImageNet's mean/std, as the released model does before its first convolution.
    """

    def __init__(
        self,
        block: str = "bottleneck",
        layers: Sequence[int] = (3, 4),
        block_inplanes: Sequence[int] = (64, 128),
        latent_dim: int = 512,
        in_channels: int = 1,
        normalization: str | None = None,
        bias_downsample: bool = False,
    ):
        super().__init__()
        if normalization not in (None, "imagenet"):
            raise ValueError(f"normalization must be None or 'imagenet', got {normalization!r}")
        if normalization == "imagenet" and in_channels != 3:
            raise ValueError("ImageNet normalisation needs in_channels=3")
        resnet = ResNet(
            block,
            [int(layers[0]), int(layers[1]), 1, 1],
            [int(block_inplanes[0]), int(block_inplanes[1]), 8, 8],
            spatial_dims=2,
            n_input_channels=int(in_channels),
            conv1_t_stride=2,
            num_classes=1,
            bias_downsample=bool(bias_downsample),
        )
        self.in_channels = int(in_channels)
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
        if normalization == "imagenet":
            self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        else:
            self.input_mean = self.input_std = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 or in_channels, H, W) -> (B, latent_dim, H/8, W/8)."""
        if x.shape[1] == 1 and self.in_channels > 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        return self.project(self.layer2(self.layer1(self.stem(x))))


class PerX2CTNet(nn.Module):
    """PA + lateral X-rays ``(B, 2, H, W)`` in [0, 1] -> CT ``(B, 1, N, N, N)`` (or chosen slices) in [0, 1].

    Args:
        volume_size: N, the cubic output size (128 in the paper).
        spacing: output voxel size (mm); with ``geometry`` it fixes where each voxel projects (DRR camera).
        image_size: X-ray size the network expects (128 in the paper).
        geometry: ``common.drr`` preset name or dict (``"perx2ct"``).
        camera: ``"drr"`` (our DRR geometry, ``align_corners=False``) or ``"perx2ct"`` (the released model's
            unit-cube pinhole camera, fov ``fov_deg``, ``align_corners=True``; volume axes are then the
            original's (D0, D1, D2), see :func:`geometry.perx2ct_to_ras`).
        feature_res: F, the coarse grid per slice that is decoded to N x N (32 in the paper).
        shared_encoder: one encoder for both views (paper) or one per view.
        encoder_in_channels / encoder_normalization: 3 and ``"imagenet"`` reproduce the released model's
            input (grey repeated to RGB, ImageNet mean/std); 1 and None feed the grey image as is.
        decoder_channels: decoder widths from fine to coarse (paper: 128, 256, 512); N = F * 2^(len-1).
        decoder_res_blocks: res blocks per decoder level (paper: 3).
        attention: self-attention at the coarsest decoder level and in the middle block (taming decoder).
        decoder_out_activation: the swish between the decoder's last GroupNorm and its output convolution,
            which taming's decoder has and MONAI's ``Decoder`` lacks (inserted as ``decoder.blocks[-2]``).
        out_channels / output_channel: decoder output channels and the one that is the CT (the released
            model predicts 3 identical channels and its test script reads channel 1).
        decode_axis: slice axis for whole volumes.
        chunk_size: slices per decoder call when decoding a whole volume.
    """

    def __init__(
        self,
        volume_size: int = 128,
        spacing: Sequence[float] = (2.5, 2.5, 2.5),
        image_size: int = 128,
        geometry: str | dict = "perx2ct",
        camera: str = "drr",
        fov_deg: float = 60.0,
        feature_res: int = 32,
        shared_encoder: bool = True,
        encoder_block: str = "bottleneck",
        encoder_layers: Sequence[int] = (3, 4),
        encoder_inplanes: Sequence[int] = (64, 128),
        encoder_in_channels: int = 1,
        encoder_normalization: str | None = None,
        encoder_bias_downsample: bool = False,
        latent_dim: int = 512,
        pe_multires: int = 10,
        decoder_channels: Sequence[int] = (128, 256, 512),
        decoder_res_blocks: int = 3,
        norm_num_groups: int = 32,
        attention: bool = True,
        decoder_out_activation: bool = True,
        out_channels: int = 1,
        output_channel: int = 0,
        decode_axis: int = 2,
        chunk_size: int = 16,
    ):
        super().__init__()
        upsample = 2 ** (len(decoder_channels) - 1)
        if feature_res * upsample != volume_size:
            raise ValueError(
                f"feature_res {feature_res} x 2^{len(decoder_channels) - 1} must equal volume_size {volume_size}"
            )
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
        if not 0 <= int(output_channel) < int(out_channels):
            raise ValueError(
                f"output_channel {output_channel} is not one of the {out_channels} output channels"
            )
        self.volume_size = int(volume_size)
        self.image_size = int(image_size)
        self.feature_res = int(feature_res)
        self.decode_axis = int(decode_axis)
        self.chunk_size = int(chunk_size)
        self.camera = camera
        self.align_corners = camera == "perx2ct"
        self.output_channel = int(output_channel)
        self.spacing = tuple(float(s) for s in spacing)
        # Stored in checkpoints so a loader can rebuild the same geometry (see _load_from_state_dict).
        self.register_buffer("spacing_mm", torch.tensor(self.spacing, dtype=torch.float64))
        geom = get_geometry(geometry)
        self.geometry = geom
        self.register_buffer(
            "geometry_mm", torch.tensor([geom.sad, geom.sid, *geom.detector_size_mm], dtype=torch.float64)
        )
        # 0 = our DRR camera; > 0 = the released model's camera with this field of view (degrees)
        self.register_buffer(
            "camera_fov_deg",
            torch.tensor([float(fov_deg) if camera == "perx2ct" else 0.0], dtype=torch.float64),
        )

        def make_encoder() -> XrayEncoder:
            return XrayEncoder(
                encoder_block, encoder_layers, encoder_inplanes, latent_dim, encoder_in_channels,
                encoder_normalization, encoder_bias_downsample,
            )  # fmt: skip

        self.shared_encoder = bool(shared_encoder)
        if self.shared_encoder:
            self.encoder = make_encoder()
        else:
            self.encoders = nn.ModuleList(make_encoder() for _ in VIEWS)
        self.pos_enc = NeRFPositionalEncoding(pe_multires)
        z_channels = len(VIEWS) * latent_dim + self.pos_enc.out_channels
        n = len(decoder_channels)
        self.decoder = Decoder(
            spatial_dims=2,
            channels=tuple(int(c) for c in decoder_channels),
            in_channels=z_channels,
            out_channels=int(out_channels),
            num_res_blocks=(int(decoder_res_blocks),) * n,
            norm_num_groups=int(norm_num_groups),
            norm_eps=1e-6,
            attention_levels=(False,) * (n - 1) + (bool(attention),),
            with_nonlocal_attn=bool(attention),
        )
        if decoder_out_activation:  # GroupNorm -> SiLU -> conv_out, as taming's Decoder
            self.decoder.blocks.insert(len(self.decoder.blocks) - 1, nn.SiLU())
        for axis in range(3):  # geometry is fixed by the config: recomputed, never stored in checkpoints
            if camera == "perx2ct":
                grids = perx2ct_camera_grids(volume_size, feature_res, axis, fov_deg)
            else:
                grids = projection_grids(volume_size, feature_res, self.spacing, geometry, image_size, axis)
            for key, value in grids.items():
                self.register_buffer(f"_{key}_{axis}", value, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        camera_key = prefix + "camera_fov_deg"
        if camera_key not in state_dict:  # checkpoints from before the camera option: the DRR camera
            state_dict[camera_key] = torch.zeros(1, dtype=torch.float64)
        for name, what, hint in (
            ("spacing_mm", "voxel spacing (mm)", "'spacing'"),
            ("geometry_mm", "DRR geometry [SAD, SID, det h, det w]", "'geometry'"),
            ("camera_fov_deg", "camera field of view (0 = DRR camera)", "'camera'/'fov_deg' (configs/perx2ct_official.json)"),
        ):  # fmt: skip
            key = prefix + name
            mine = getattr(self, name).cpu()
            if key in state_dict and not torch.allclose(state_dict[key].double().cpu(), mine):
                raise ValueError(
                    f"checkpoint was trained for {what} {state_dict[key].tolist()} but the network was built "
                    f"for {mine.tolist()}; set {hint} in the config to match"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _buffer(self, key: str, axis: int) -> torch.Tensor:
        return getattr(self, f"_{key}_{axis}")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-view feature maps from ``x`` = (B, 2, H, W) (channel 0 PA, 1 lateral)."""
        if isinstance(x, MetaTensor):  # batch reshapes below would split MONAI's per-item metadata
            x = x.as_tensor()
        if (
            x.ndim != 4
            or x.shape[1] != len(VIEWS)
            or tuple(x.shape[2:]) != (self.image_size, self.image_size)
        ):
            raise ValueError(
                f"expected (B, 2, {self.image_size}, {self.image_size}) PA+lateral images, got {tuple(x.shape)}"
            )
        if self.camera == "perx2ct":  # the released camera looks at the radiographs flipped / transposed
            x = torch.stack([perx2ct_view_orientation(x[:, i], v) for i, v in enumerate(VIEWS)], dim=1)
        if not self.shared_encoder:
            return [enc(x[:, i : i + 1]) for i, enc in enumerate(self.encoders)]
        if self.training:  # one view per call, so batch-norm statistics are per view as in the original
            return [self.encoder(x[:, i : i + 1]) for i in range(len(VIEWS))]
        both = self.encoder(x.transpose(0, 1).reshape(-1, 1, *x.shape[2:]))  # (2B, C, h, w): one call
        return list(both.reshape(len(VIEWS), x.shape[0], *both.shape[1:]).unbind(0))

    def decode_slices(self, feats: list[torch.Tensor], index: torch.Tensor, axis: int) -> torch.Tensor:
        """Slices ``index`` (B, K) along ``axis`` -> (B, K, N, N), all K x B slices in one decoder call."""
        b, k = index.shape
        f = self.feature_res
        parts = []
        for view, feat in zip(VIEWS, feats):
            grid = self._buffer(view, axis)[index].to(feat.dtype).reshape(b, k * f, f, 2)
            sampled = F.grid_sample(
                feat, grid, mode="bilinear", padding_mode="zeros", align_corners=self.align_corners
            )
            parts.append(sampled.reshape(b, -1, k, f, f).transpose(1, 2))  # (B, K, C, F, F)
        unit = self._buffer("unit", axis)[index]  # (B, K, F, F, 3)
        parts.append(self.pos_enc(unit).permute(0, 1, 4, 2, 3).to(parts[0].dtype))
        z = torch.cat(parts, dim=2).reshape(b * k, -1, f, f)
        out = self.decoder(z)[:, self.output_channel]  # (B*K, N, N)
        return out.reshape(b, k, self.volume_size, self.volume_size)

    def reconstruct(
        self, x: torch.Tensor, chunk_size: int | None = None, axis: int | None = None
    ) -> torch.Tensor:
        """Whole volume (B, 1, N, N, N) decoded ``chunk_size`` slices per decoder call (1 = slice by slice).

        The volume is canonical RAS for both cameras (the released camera's (D0, D1, D2) are reordered);
        ``axis`` and :meth:`decode_slices` address the camera's own array axes.
        """
        axis = self.decode_axis if axis is None else int(axis)
        chunk = self.chunk_size if chunk_size is None else max(1, int(chunk_size))
        feats = self.encode(x)
        b, n = x.shape[0], self.volume_size
        chunks = []
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(n, start + chunk), device=x.device).unsqueeze(0).expand(b, -1)
            chunks.append(self.decode_slices(feats, idx, axis))
        vol = torch.cat(chunks, dim=1).movedim(1, 1 + axis)  # the remaining axes keep their order
        if self.camera == "perx2ct":
            vol = perx2ct_to_ras(vol)
        return vol.unsqueeze(1)

    def forward(
        self, x: torch.Tensor, slice_index: torch.Tensor | None = None, axis: int | None = None
    ) -> torch.Tensor:
        """Whole volume (B, 1, N, N, N) by default; with ``slice_index`` (B,) or (B, K): slices (B, K, N, N).

        Inputs are radiographs as displayed (PA: row 0 superior, column 0 patient right; lateral: column 0
        anterior), for both cameras.
        """
        if slice_index is None:
            return self.reconstruct(x, axis=axis)
        axis = self.decode_axis if axis is None else int(axis)
        index = slice_index.long()
        if index.ndim == 1:
            index = index.unsqueeze(1)
        return self.decode_slices(self.encode(x), index, axis)
