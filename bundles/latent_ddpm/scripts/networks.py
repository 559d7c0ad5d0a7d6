"""X-ray conditioned 3D latent diffusion network: MONAI DiffusionModelUNet + a MONAI 2D DenseNet X-ray encoder.

Conditioning is by cross-attention (``with_conditioning=True``): the encoder's last feature map (B, C, h, w)
becomes h*w tokens projected to ``cross_attention_dim``. Spatial tokens keep *where* a structure is on the
radiograph, which a single pooled vector added to the time embedding would lose; the UNet's attention levels
learn the projective correspondence between latent voxels and X-ray regions.

X-ray2CTPA's conditioning (optional, ``configs/xray2ctpa_encoder.json``): a frozen BiomedCLIP image tower
(ViT-B/16, 224 px, 512-d L2-normalised embedding; ``open_clip``'s ``encode_image(normalize=True)``) read from
a local ``open_clip_pytorch_model.bin``. X-ray2CTPA concatenates that embedding to the time embedding, which
each UNet block's MLP then sees; here a linear map of it is *added* to the time embedding through MONAI's
own class-embedding path of ``DiffusionModelUNet`` (the sum reaches every block's time projection, the
same information), beside the cross-attention tokens. The tower is MONAI's ``ViT`` with the BiomedCLIP key
names mapped (``open_clip``/``timm`` import torchvision, which does not work beside our torch).

Classifier-free guidance: during training each sample's tokens are replaced by a learned "null" token with
probability ``condition_dropout`` (and its image embedding by a learned null embedding). At sampling time MONAI's ``DiffusionInferer.sample(cfg=...)`` builds the
unconditional half by filling the X-ray with ``cfg_fill_value`` (-1); an X-ray whose pixels are all negative
cannot be a radiograph in [0, 1], so this wrapper maps it to the null token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet, DiffusionModelUNet, ViT

from common.errors import InputError
from common.weights import read_state_dict

# open_clip's OPENAI_DATASET_MEAN / STD, which BiomedCLIP's preprocessing uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


class BiomedCLIPImageEncoder(torch.nn.Module):
    """BiomedCLIP's image tower: X-ray (B, 1, H, W) in [0, 1] -> (B, embed_dim) L2-normalised embedding.

    ViT-B/16 at 224 px (timm ``vit_base_patch16_224``: pre-norm blocks, fused qkv with bias, GELU MLP,
    LayerNorm eps 1e-6, class token) as MONAI's ``ViT``, then open_clip's ``head.proj`` (768 -> 512, no
    bias). Preprocessing as BiomedCLIP's: grey repeated to RGB, bicubic resize to ``image_size``, CLIP
    mean/std. Frozen: no gradients, always in eval mode. Sizes are arguments only so tests can be small.
    """

    def __init__(
        self,
        weights_path: str | None = None,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        embed_dim: int = 512,
    ):
        super().__init__()
        self.image_size = int(image_size)
        self.embed_dim = int(embed_dim)
        self.trunk = ViT(
            in_channels=3, img_size=image_size, patch_size=patch_size, hidden_size=width, mlp_dim=mlp_dim,
            num_layers=layers, num_heads=heads, proj_type="conv", pos_embed_type="learnable",
            classification=True, spatial_dims=2, qkv_bias=True,
        )  # fmt: skip
        self.trunk.classification_head = torch.nn.Identity()  # the class token after the final norm
        for module in self.trunk.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-6  # timm's ViT
        self.proj = torch.nn.Linear(width, embed_dim, bias=False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        if weights_path:
            load_biomedclip_image_tower(self, weights_path)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: batch-independent, dropout-free, whatever the caller does
        return super().train(False)

    def forward(self, xray: torch.Tensor) -> torch.Tensor:
        x = xray.expand(-1, 3, -1, -1) if xray.shape[1] == 1 else xray
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        feats, _ = self.trunk(x)
        return F.normalize(self.proj(feats), dim=-1)


def biomedclip_key_map(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip BiomedCLIP keys (``visual.trunk.*``, ``visual.head.proj.weight``) -> :class:`BiomedCLIPImageEncoder`.

    timm adds its positional embedding to the class token too; MONAI's ViT adds it to the patches only,
    so the class token's share is folded into the stored class token (exact).
    """
    vis = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    out = {}
    pos = vis.get("trunk.pos_embed")
    for key, value in vis.items():
        if key == "trunk.pos_embed":
            out["trunk.patch_embedding.position_embeddings"] = value[:, 1:]
        elif key == "trunk.cls_token":
            out["trunk.cls_token"] = value + (pos[:, :1] if pos is not None else 0)
        elif key.startswith("trunk.patch_embed.proj."):
            out["trunk.patch_embedding.patch_embeddings." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("trunk.norm."):
            out[key] = value
        elif key == "head.proj.weight":
            out["proj.weight"] = value
        elif m := re.match(r"trunk\.blocks\.(\d+)\.(.+)$", key):
            sub = {"attn.proj": "attn.out_proj", "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}
            name, param = m.group(2).rsplit(".", 1)
            out[f"trunk.blocks.{m.group(1)}.{sub.get(name, name)}.{param}"] = value
        else:
            out["unmapped." + key] = value
    return out


def load_biomedclip_image_tower(encoder: BiomedCLIPImageEncoder, path: str) -> None:
    """Load BiomedCLIP's ``open_clip_pytorch_model.bin`` (local file, ``weights_only``) into ``encoder``."""
    path = os.fspath(path)
    state = read_state_dict(path, "BiomedCLIP weights")
    if "visual.trunk.patch_embed.proj.weight" not in state:
        raise InputError(
            path, "not an open_clip BiomedCLIP checkpoint (no 'visual.trunk.patch_embed.proj.weight')"
        )
    mapped = biomedclip_key_map(state)
    unmapped = sorted(k for k in mapped if k.startswith("unmapped."))
    if unmapped:
        raise InputError(
            path, f"unexpected image-tower tensors {unmapped[:4]} (another vision architecture?)"
        )
    ours = encoder.state_dict()
    wrong = [k for k, v in mapped.items() if k in ours and ours[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise InputError(
            path,
            f"{k} is {tuple(mapped[k].shape)} in the file, {tuple(ours[k].shape)} here: not ViT-B/16 224",
        )
    missing, unexpected = encoder.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if ".norm_cross_attn." not in k]  # MONAI's unused cross-attention norms
    if missing or unexpected:
        raise InputError(path, f"image tower incomplete: missing {missing[:4]}, unexpected {unexpected[:4]}")


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
        image_embedding: dict | None = None,
    ):
        """``image_embedding``: arguments of :class:`BiomedCLIPImageEncoder` (``weights_path``: the local
        BiomedCLIP file) to add X-ray2CTPA's frozen image embedding to the time embedding; None: tokens only."""
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
            num_class_embeds=1 if image_embedding is not None else None,
        )
        self.image_encoder = None
        if image_embedding is not None:
            self.image_encoder = BiomedCLIPImageEncoder(**image_embedding)
            # MONAI adds class_embedding(class_labels) to the time embedding: a linear map of the image embedding
            time_dim = self.unet.class_embedding.embedding_dim
            self.unet.class_embedding = torch.nn.Linear(self.image_encoder.embed_dim, time_dim)
            self.null_embedding = torch.nn.Parameter(torch.zeros(1, self.image_encoder.embed_dim))
        self.xray_encoder = XrayEncoder(
            cross_attention_dim,
            init_features=xray_init_features,
            growth_rate=xray_growth_rate,
            block_config=xray_block_config,
            token_grid=xray_token_grid,
        )
        self.null_token = torch.nn.Parameter(torch.zeros(1, 1, cross_attention_dim))

    def _dropped(self, xray: torch.Tensor) -> torch.Tensor:
        drop = (xray.flatten(1) < 0).all(dim=1)
        if self.training and self.condition_dropout > 0:
            drop = drop | (torch.rand(xray.shape[0], device=xray.device) < self.condition_dropout)
        return drop

    def encode_condition(self, xray: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """X-ray (B, 1, H, W) -> tokens; null tokens for all-negative images and, in training, dropped samples."""
        tokens = self.xray_encoder(xray)
        drop = self._dropped(xray) if drop is None else drop
        null = self.null_token.to(tokens.dtype).expand_as(tokens)
        return torch.where(drop[:, None, None], null, tokens)

    def image_embedding(
        self, xray: torch.Tensor | None, batch: int, drop: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, 512) frozen BiomedCLIP embedding, or the learned null embedding where dropped / unconditioned."""
        null = self.null_embedding.expand(batch, -1)
        if xray is None:
            return null
        with torch.no_grad():
            emb = self.image_encoder(xray.clamp(0.0, 1.0))
        return torch.where(drop[:, None], null.to(emb.dtype), emb)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        drop = None if context is None else self._dropped(context)
        if context is None:
            tokens = self.null_token.expand(x.shape[0], 1, -1)
        else:
            tokens = self.encode_condition(context, drop)
        if timesteps.ndim == 0 or timesteps.shape[0] != x.shape[0]:
            timesteps = timesteps.reshape(-1)[:1].expand(x.shape[0])
        if self.image_encoder is None:
            return self.unet(x, timesteps=timesteps, context=tokens)
        emb = self.image_embedding(context, x.shape[0], drop)
        return self.unet(x, timesteps=timesteps, context=tokens, class_labels=emb)
