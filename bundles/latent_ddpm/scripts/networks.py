"""X-ray conditioned 3D latent diffusion network: MONAI DiffusionModelUNet + a MONAI 2D DenseNet X-ray encoder.

Conditioning is by cross-attention (``with_conditioning=True``): the encoder's last feature map (B, C, h, w)
becomes h*w tokens projected to ``cross_attention_dim``. Spatial tokens keep *where* a structure is on the
radiograph, which a single pooled vector added to the time embedding would lose; the UNet's attention levels
learn the projective correspondence between latent voxels and X-ray regions.

Classifier-free guidance: during training each sample's tokens are replaced by a learned "null" token with
probability ``condition_dropout``. At sampling time MONAI's ``DiffusionInferer.sample(cfg=...)`` builds the
unconditional half by filling the X-ray with ``cfg_fill_value`` (-1); an X-ray whose pixels are all negative
cannot be a radiograph in [0, 1], so this wrapper maps it to the null token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DenseNet, DiffusionModelUNet


class XrayEncoder(torch.nn.Module):
    """MONAI 2D DenseNet feature extractor (no classifier head) -> (B, tokens, dim) cross-attention tokens.

    ``init_features=64, growth_rate=32, block_config=(6, 12, 24, 16)`` is DenseNet121. Local pretrained
    weights may be loaded into ``features`` by the caller (no downloads here).
    """

    def __init__(
        self,
        out_dim: int,
        in_channels: int = 1,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        token_grid: int | None = None,
    ):
        super().__init__()
        densenet = DenseNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
        )
        self.features = densenet.features
        channels = densenet.class_layers.out.in_features
        # token_grid bounds the number of tokens (attention cost) for large radiographs
        self.pool = torch.nn.AdaptiveAvgPool2d(token_grid) if token_grid else torch.nn.Identity()
        self.project = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(channels, out_dim))

    def forward(self, xray: torch.Tensor) -> torch.Tensor:
        fmap = self.pool(self.features(xray))
        return self.project(fmap.flatten(2).transpose(1, 2))


class XrayConditionedUNet(torch.nn.Module):
    """``forward(x, timesteps, context=xray)``: the call signature MONAI's DiffusionInferer uses (mode crossattn)."""

    def __init__(
        self,
        latent_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512),
        attention_levels: Sequence[bool] = (False, False, True, True),
        num_res_blocks: int | Sequence[int] = 2,
        num_head_channels: int | Sequence[int] = 32,
        norm_num_groups: int = 32,
        cross_attention_dim: int = 256,
        xray_init_features: int = 64,
        xray_growth_rate: int = 32,
        xray_block_config: Sequence[int] = (6, 12, 24, 16),
        xray_token_grid: int | None = 8,
        condition_dropout: float = 0.1,
        use_flash_attention: bool = False,
    ):
        super().__init__()
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        self.condition_dropout = float(condition_dropout)
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            with_conditioning=True,
            cross_attention_dim=cross_attention_dim,
            use_flash_attention=use_flash_attention,
        )
        self.xray_encoder = XrayEncoder(
            cross_attention_dim,
            init_features=xray_init_features,
            growth_rate=xray_growth_rate,
            block_config=xray_block_config,
            token_grid=xray_token_grid,
        )
        self.null_token = torch.nn.Parameter(torch.zeros(1, 1, cross_attention_dim))

    def encode_condition(self, xray: torch.Tensor) -> torch.Tensor:
        """X-ray (B, 1, H, W) -> tokens; null tokens for all-negative images and, in training, dropped samples."""
        tokens = self.xray_encoder(xray)
        drop = (xray.flatten(1) < 0).all(dim=1)
        if self.training and self.condition_dropout > 0:
            drop = drop | (torch.rand(xray.shape[0], device=xray.device) < self.condition_dropout)
        null = self.null_token.to(tokens.dtype).expand_as(tokens)
        return torch.where(drop[:, None, None], null, tokens)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        if context is None:
            tokens = self.null_token.expand(x.shape[0], 1, -1)
        else:
            tokens = self.encode_condition(context)
        if timesteps.ndim == 0 or timesteps.shape[0] != x.shape[0]:
            timesteps = timesteps.reshape(-1)[:1].expand(x.shape[0])
        return self.unet(x, timesteps=timesteps, context=tokens)
