"""X-ray conditioned 3D latent diffusion network: MONAI DiffusionModelUNet + a MONAI 2D DenseNet X-ray encoder.

Conditioning is by cross-attention (``with_conditioning=True``): the encoder's last feature map (B, C, h, w)
becomes h*w tokens projected to ``cross_attention_dim``. Spatial tokens keep *where* a structure is on the
radiograph, which a single pooled vector added to the time embedding would lose; the UNet's attention levels
learn the projective correspondence between latent voxels and X-ray regions.

X-ray2CTPA's conditioning (``configs/xray2ctpa_encoder.json``; NoaCahan/X-ray2CTPA ``ddpm/diffusion.py``):
BiomedCLIP's image tower (ViT-B/16, 224 px, 512-d L2-normalised embedding, ``encode_image(normalize=True)``,
*trained* with the denoiser), read from a local ``open_clip_pytorch_model.bin``; its input is the X-ray
normalised with mean 0.633 / std 0.181 and bilinearly resized to 224 (``preprocess/preprocess_xray.py``).
The embedding is **concatenated** to the time embedding (``cond_dim = 4 * channels[0] + 512``) and every
ResNet block maps ``SiLU(cond)`` to a per-channel scale and shift (:class:`ScaleShiftResnetBlock`); with
``xray_tokens=False`` that is the only conditioning, as in the paper. The concatenation goes through MONAI's
own class-embedding sum: the time MLP's output is zero-padded on the right, the image embedding on the left,
so their sum *is* the concatenation. The tower is MONAI's ``ViT`` with the BiomedCLIP key names mapped
(``open_clip``/``timm`` import torchvision, which does not work beside our torch).

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
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

from common.errors import InputError
from common.weights import read_state_dict

# open_clip's OPENAI_DATASET_MEAN / STD, which BiomedCLIP's preprocessing uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# X-ray2CTPA's X-ray normalisation (preprocess/preprocess_xray.py: transforms.Normalize(0.633, 0.181), then a
# bilinear resize to 224), which is what its BiomedCLIP tower sees in training and sampling
XRAY2CTPA_MEAN = 0.633
XRAY2CTPA_STD = 0.181


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
    bias). Input: grey repeated to RGB, ``(x - mean) / std``, resized to ``image_size`` by ``resize_mode``.
    Defaults are open_clip's own BiomedCLIP preprocessing (CLIP mean/std, bicubic) and a frozen tower;
    X-ray2CTPA's are ``mean=0.633, std=0.181, resize_mode="bilinear", trainable=True``. Frozen: no gradients,
    always in eval mode. Sizes are arguments only so tests can be small.
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
        mean: float | Sequence[float] = CLIP_MEAN,
        std: float | Sequence[float] = CLIP_STD,
        resize_mode: str = "bicubic",
        trainable: bool = False,
    ):
        super().__init__()
        if resize_mode not in ("bicubic", "bilinear"):
            raise ValueError(f"resize_mode must be 'bicubic' or 'bilinear', got {resize_mode!r}")
        self.image_size = int(image_size)
        self.embed_dim = int(embed_dim)
        self.resize_mode = resize_mode
        self.trainable = bool(trainable)
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
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).expand(3).reshape(1, 3, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1).expand(3).reshape(1, 3, 1, 1)
        self.register_buffer("mean", mean_t.clone(), persistent=False)
        self.register_buffer("std", std_t.clone(), persistent=False)
        if weights_path:
            load_biomedclip_image_tower(self, weights_path)
        if not self.trainable:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):  # frozen: batch-independent, dropout-free, whatever the caller does
        return super().train(mode and self.trainable)

    def forward(self, xray: torch.Tensor) -> torch.Tensor:
        x = xray.expand(-1, 3, -1, -1) if xray.shape[1] == 1 else xray
        x = (x - self.mean) / self.std  # X-ray2CTPA normalises, then resizes (bilinear: the order is immaterial)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode=self.resize_mode, align_corners=False)
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


class ScaleShiftResnetBlock(DiffusionUNetResnetBlock):
    """MONAI's diffusion ResNet block with X-ray2CTPA's conditioning: ``SiLU(cond)`` -> per-channel scale and shift.

    X-ray2CTPA's ``ResnetBlock`` (``ddpm/diffusion.py``): ``Linear(cond_dim, 2 * dim_out)`` of ``SiLU(cond)``,
    chunked into (scale, shift), applied as ``h * (scale + 1) + shift`` right after a GroupNorm. MONAI's block
    instead *adds* ``Linear(cond_dim, dim_out)`` after ``conv1``; here the same place gets the paper's
    modulation of the following norm: ``h = norm2(conv1(...)) * (1 + scale) + shift``, then SiLU and ``conv2``
    (pre-activation order of MONAI's block; the modulation is the paper's). ``temb_channels`` = ``cond_dim``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.time_emb_proj = torch.nn.Linear(self.emb_channels, 2 * self.out_channels)

    @classmethod
    def like(cls, block: DiffusionUNetResnetBlock, temb_channels: int) -> ScaleShiftResnetBlock:
        """A fresh block with ``block``'s shape (channels, up/down, norm groups) and a ``temb_channels`` input."""
        return cls(
            spatial_dims=block.spatial_dims, in_channels=block.channels, temb_channels=temb_channels,
            out_channels=block.out_channels, up=block.up, down=block.down,
            norm_num_groups=block.norm1.num_groups, norm_eps=block.norm1.eps,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        scale, shift = self.time_emb_proj(self.nonlinearity(emb)).chunk(2, dim=1)
        spatial = (1,) * self.spatial_dims
        h = self.norm2(h) * (1 + scale.reshape(*scale.shape, *spatial)) + shift.reshape(*shift.shape, *spatial)
        h = self.conv2(self.nonlinearity(h))
        return self.skip_connection(x) + h


class ZeroPad(torch.nn.Module):
    """(B, n) -> (B, left + n + right), zeros around: two pads whose sum is a concatenation (exact)."""

    def __init__(self, left: int, right: int):
        super().__init__()
        self.left, self.right = int(left), int(right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (self.left, self.right))


def concat_condition_to_time_embedding(unet: DiffusionModelUNet, cond_dim: int) -> int:
    """Make ``unet`` condition as X-ray2CTPA: ``emb = cat(time_mlp(t), cond)``, scale/shift in every ResNet block.

    MONAI computes ``emb = time_embed(t) + class_embedding(class_labels)``: ``time_embed`` is followed by a
    right zero-pad of ``cond_dim`` and ``class_embedding`` becomes a left zero-pad of the time width, so
    ``emb`` is the concatenation (B, time_dim + cond_dim) and the image embedding goes in as ``class_labels``.
    Every :class:`DiffusionUNetResnetBlock` is replaced by a :class:`ScaleShiftResnetBlock` of that width.
    Returns the conditioning width ``time_dim + cond_dim`` (X-ray2CTPA: ``4 * dim + 512``).
    """
    time_dim = unet.time_embed[-1].out_features
    unet.time_embed = torch.nn.Sequential(*unet.time_embed, ZeroPad(0, cond_dim))
    unet.class_embedding = ZeroPad(time_dim, 0)
    unet.num_class_embeds = cond_dim  # MONAI only tests it for None: the class path is on
    width = time_dim + cond_dim
    for name, module in list(unet.named_modules()):
        if type(module) is DiffusionUNetResnetBlock:
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            replacement = ScaleShiftResnetBlock.like(module, width)
            if isinstance(parent, torch.nn.ModuleList):
                parent[int(child)] = replacement
            else:
                setattr(parent, child, replacement)
    return width


def optimizer_param_groups(
    network: torch.nn.Module, encoder_learning_rate: float | None = None
) -> list[dict]:
    """Parameter groups for the optimizer: the trainable image encoder gets its own learning rate.

    X-ray2CTPA trains BiomedCLIP with the denoiser (the whole ``GaussianDiffusion`` is in ``Adam(..., lr=1e-4)``);
    a separate group keeps that 1e-4 when our denoiser's rate differs (cpu sizes use 1e-3). ``network`` may be
    wrapped (DistributedDataParallel's ``module``). Without an encoder (or ``encoder_learning_rate`` None):
    one group of every trainable parameter.
    """
    inner = getattr(network, "module", network)
    encoder = getattr(inner, "image_encoder", None)
    enc_ids = {id(p) for p in encoder.parameters() if p.requires_grad} if encoder is not None else set()
    trainable = [p for p in network.parameters() if p.requires_grad]
    if encoder_learning_rate is None or not enc_ids:
        return [{"params": trainable}]
    rest = [p for p in trainable if id(p) not in enc_ids]
    enc = [p for p in trainable if id(p) in enc_ids]
    return [{"params": rest}, {"params": enc, "lr": float(encoder_learning_rate)}]


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
        xray_tokens: bool = True,
    ):
        """``image_embedding``: arguments of :class:`BiomedCLIPImageEncoder` (``weights_path``: the local
        BiomedCLIP file; ``trainable``, ``mean``, ``std``, ``resize_mode``) for X-ray2CTPA's conditioning (the
        embedding concatenated to the time embedding, scale/shift in every ResNet block); None: tokens only.
        ``xray_tokens``: the DenseNet cross-attention tokens (ours); False with an image embedding is the paper's
        conditioning path alone (the UNet then has self-attention only)."""
        super().__init__()
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        if not xray_tokens and image_embedding is None:
            raise ValueError("xray_tokens=False needs image_embedding: the network would not see the X-ray")
        self.condition_dropout = float(condition_dropout)
        self.xray_tokens = bool(xray_tokens)
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            with_conditioning=self.xray_tokens,
            cross_attention_dim=cross_attention_dim if self.xray_tokens else None,
            use_flash_attention=use_flash_attention,
        )
        self.image_encoder = None
        if image_embedding is not None:
            self.image_encoder = BiomedCLIPImageEncoder(**image_embedding)
            self.cond_dim = concat_condition_to_time_embedding(self.unet, self.image_encoder.embed_dim)
            # X-ray2CTPA's null_cond_emb is randn(1, 512); never used in its training (null_cond_prob 0)
            self.null_embedding = torch.nn.Parameter(torch.zeros(1, self.image_encoder.embed_dim))
        self.xray_encoder = None
        if self.xray_tokens:
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
        """(B, 512) BiomedCLIP embedding (with gradients when the tower is trainable, as in X-ray2CTPA), or the
        learned null embedding where dropped / unconditioned."""
        null = self.null_embedding.expand(batch, -1)
        if xray is None:
            return null
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_encoder.trainable):
            emb = self.image_encoder(xray.clamp(0.0, 1.0))
        return torch.where(drop[:, None], null.to(emb.dtype), emb)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        drop = None if context is None else self._dropped(context)
        tokens = None
        if self.xray_tokens:
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
