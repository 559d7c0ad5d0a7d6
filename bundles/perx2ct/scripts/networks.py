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

Optional mean-CT prior (``mean_prior=True``; not in the paper, off by default): the decoder predicts the
residual to the mean training CT, whose slices are added to its output on every decoding path (sampled
features or :meth:`PerX2CTNet.project_features`), and its last convolution starts at zero, so an untrained
network predicts exactly the mean-CT baseline and training only has to learn what the X-rays change. The
prior is a persistent buffer (saved in and loaded from checkpoints; ``network_def`` records ``mean_prior``);
:func:`common.baselines.with_mean_prior` fills it from the training split. At CPU size this is what makes
the model beat that baseline (``benchmarks/learning.py``).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence

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
    ras_to_perx2ct,
)
from common.drr import detector_geometry

logger = logging.getLogger(__name__)
# torchvision's ImageNet statistics, which the released model normalises its 3-channel input with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cache_bytes(default: int = 8 << 20) -> int:
    """The largest CPU cache (bytes) the OS reports (Linux sysfs), else ``default``."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else default


def auto_chunk_size(net: PerX2CTNet, device: str | torch.device = "cpu") -> int:
    """Slices per decoder call guessed from the hardware: the CUDA choice, and the CPU fallback.

    CPU: the decoder is compute-bound per slice but slows down once a chunk's finest activation
    (chunk x N^2 x C x 4 bytes, e.g. 512 KB per 64^2 x 32 slice) spills out of the cache: the chunk is
    sized so it stays within 1/4 of the largest cache. A guess: on the issue-25 machine it gave 64 where 8
    was fastest, so on CPU :meth:`PerX2CTNet.reconstruct` times the candidates instead
    (:func:`timed_chunk_size`). CUDA: as many slices as fit in half the free memory at ~16 such activations
    per slice (AMP halves it).
    """
    finest = max(net.decoder_channels[:2])  # the last upsampling runs at N x N with the next level's width
    per_slice = net.volume_size**2 * finest * 4
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = free // 2 // (16 * per_slice)
    else:
        n = cache_bytes() // 4 // per_slice
    return int(max(1, min(net.volume_size, n)))


CHUNK_ENV = "XRAY2CT_PERX2CT_CHUNK"  # a fixed chunk size for every network, instead of the timed one
CHUNK_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
CHUNK_CACHE_MAX_BYTES = 1 << 20
_TIMED_CHUNKS: dict[str, int] = {}  # this process's choices, by :func:`chunk_key`


def chunk_cache_file() -> str:
    """``perx2ct_chunk.json`` in the cache folder (``$XRAY2CT_CACHE``, else ``$XDG_CACHE_HOME/xray2ct``, else
    ``~/.cache/xray2ct``, as :mod:`data_prep.example_ct`): the timed choices of this machine."""
    root = os.environ.get("XRAY2CT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "xray2ct"
    )
    return os.path.join(root, "perx2ct_chunk.json")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def chunk_key(net: PerX2CTNet, device: torch.device, fused: bool, batch: int = 1) -> str:
    """What the fastest chunk depends on: the machine, the threads, the decoder's shape and path."""
    dec = next(net.decoder.parameters())
    key = {
        "device": device.type, "batch": int(batch), "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "volume_size": net.volume_size, "feature_res": net.feature_res,
        "decoder_channels": list(net.decoder_channels), "fused": bool(fused),
        "decoder_parameters": sum(p.numel() for p in net.decoder.parameters()),  # blocks, attention
        "dtype": str(dec.dtype).replace("torch.", ""),
        "channels_last": dec.dim() == 4 and dec.is_contiguous(memory_format=torch.channels_last),
        "autocast": torch.is_autocast_enabled(device.type),
    }  # fmt: skip
    return json.dumps(key, sort_keys=True)


def read_chunk_cache(path: str | None = None) -> dict[str, int]:
    """``{key: chunk}`` of the cache file; an absent, oversized or malformed file (or entry) reads as empty."""
    path = path or chunk_cache_file()
    try:
        if os.path.getsize(path) > CHUNK_CACHE_MAX_BYTES:
            return {}
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    chunks = data.get("chunks") if isinstance(data, dict) else None
    if not isinstance(chunks, dict):
        return {}
    return {k: v["chunk"] for k, v in chunks.items() if isinstance(v, dict) and type(v.get("chunk")) is int
            and v["chunk"] >= 1}  # fmt: skip


def _write_chunk_cache(key: str, entry: dict, path: str | None = None) -> None:
    """Add ``key`` to the cache file (atomically); a cache that cannot be written only costs a re-timing."""
    from common.atomic import atomic_write_text

    path = path or chunk_cache_file()
    try:
        with open(path) as f:
            data = json.load(f) if os.path.getsize(path) <= CHUNK_CACHE_MAX_BYTES else {}
    except (OSError, ValueError):
        data = {}
    chunks = data.get("chunks") if isinstance(data, dict) and isinstance(data.get("chunks"), dict) else {}
    chunks[key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps({"version": 1, "chunks": chunks}, indent=1) + "\n")
    except OSError as exc:
        logger.warning("perx2ct chunk cache %s not written: %s", path, exc)


def time_chunk_sizes(
    decode: Callable[[int], object], n: int, candidates: Sequence[int] = CHUNK_CANDIDATES, budget_s: float = 5.0
) -> dict[int, float]:
    """Estimated seconds to decode ``n`` slices in chunks of each candidate: ``ceil(n / c)`` x one chunk's time.

    ``decode(c)`` decodes one chunk of ``c`` slices. Each candidate runs once to warm up (new shapes build new
    kernels), then the rounds interleave so load from other processes hits every candidate alike; the best
    of up to two rounds counts (the second only while the first stayed within ``budget_s``). With one thread
    the clock is this process's CPU time (steady on shared cores), with several the wall time.
    """
    sizes = sorted({min(int(c), n) for c in candidates if int(c) >= 1})
    best = {c: float("inf") for c in sizes}
    # one thread: this process's CPU time, the compute cost whatever else the cores run; else wall time
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    for rnd in range(3):
        t_round = time.perf_counter()
        for c in sizes:
            t = clock()
            decode(c)
            if rnd:
                best[c] = min(best[c], clock() - t)
        if rnd and time.perf_counter() - t_round > budget_s:
            break
    return {c: best[c] * math.ceil(n / c) for c in sizes}


def timed_chunk_size(
    net: PerX2CTNet, decode: Callable[[int], object], device: torch.device, fused: bool, batch: int = 1,
    cache: bool = True,
) -> int:
    """The chunk size for ``net`` on this machine: ``$XRAY2CT_PERX2CT_CHUNK`` if set, else the fastest
    candidate, timed once per machine and network shape (:func:`time_chunk_sizes` with ``decode``) and kept
    in this process and in :func:`chunk_cache_file`."""
    fixed = os.environ.get(CHUNK_ENV, "").strip()
    if fixed:
        if not fixed.isdigit() or int(fixed) < 1:
            raise ValueError(f"{CHUNK_ENV} must be a whole number >= 1, got {fixed!r}")
        return min(int(fixed), net.volume_size)
    key = chunk_key(net, device, fused, batch)
    if key not in _TIMED_CHUNKS and cache:
        found = read_chunk_cache().get(key)
        if found is not None:
            _TIMED_CHUNKS[key] = min(found, net.volume_size)
    if key not in _TIMED_CHUNKS:
        with torch.no_grad():
            seconds = time_chunk_sizes(decode, net.volume_size)
        chunk = min(seconds, key=seconds.get)
        _TIMED_CHUNKS[key] = chunk
        if cache:
            entry = {"chunk": chunk, "volume_seconds": {str(c): round(t, 5) for c, t in seconds.items()},
                     "timed": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
            _write_chunk_cache(key, entry)
        logger.info("perx2ct chunk size %d (timed: %s)", chunk, seconds)
    return _TIMED_CHUNKS[key]


class ProjectedFeatures:
    """Encoder features with the decoder's first convolution applied per kernel tap (see ``project_features``)."""

    def __init__(self, taps: list[torch.Tensor]):
        self.taps = taps


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
        chunk_size: slices per decoder call when decoding a whole volume (0: chosen for the machine).
        mean_prior: add a prior volume (:meth:`set_mean_prior`, the mean training CT in [0, 1]) to the decoded
            slices and zero-initialise the decoder's output convolution (the untrained network is the prior).
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
        mean_prior: bool = False,
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
        self.decoder_channels = tuple(int(c) for c in decoder_channels)
        self.spacing = tuple(float(s) for s in spacing)
        # Stored in checkpoints so a loader can rebuild the same geometry (see _load_from_state_dict).
        self.register_buffer("spacing_mm", torch.tensor(self.spacing, dtype=torch.float64))
        geom = detector_geometry(geometry, self.image_size)  # as configured; records before 0.4: the DRRs' size
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
        self.mean_prior = bool(mean_prior)
        if self.mean_prior:  # the prior in the decoder's array frame (the camera's axes), [0, 1]
            self.register_buffer("prior", torch.zeros((self.volume_size,) * 3))
            last = self.decoder.blocks[-1].conv
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        for axis in range(3):  # geometry is fixed by the config: recomputed, never stored in checkpoints
            if camera == "perx2ct":
                grids = perx2ct_camera_grids(volume_size, feature_res, axis, fov_deg)
            else:
                grids = projection_grids(volume_size, feature_res, self.spacing, geom, image_size, axis)
            for key, value in grids.items():
                self.register_buffer(f"_{key}_{axis}", value, persistent=False)

    @torch.no_grad()
    def set_mean_prior(self, volume: torch.Tensor) -> PerX2CTNet:
        """Store the prior, a canonical RAS volume (N, N, N) in the output scale [0, 1]; needs ``mean_prior``."""
        if not self.mean_prior:
            raise ValueError("the network was built without mean_prior=True")
        volume = torch.as_tensor(volume, dtype=torch.float32)
        volume = volume.reshape(-1, *volume.shape[-3:])[0]
        if tuple(volume.shape) != tuple(self.prior.shape):
            raise ValueError(f"prior shape {tuple(volume.shape)} differs from the volume {tuple(self.prior.shape)}")
        if self.camera == "perx2ct":  # decode_slices addresses the released camera's (D0, D1, D2) axes
            volume = ras_to_perx2ct(volume)
        self.prior.copy_(volume.to(self.prior.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        has_prior = prefix + "prior" in state_dict
        if has_prior != self.mean_prior:
            raise ValueError(
                f"checkpoint {'has' if has_prior else 'has no'} mean-CT prior but the network was built with "
                f"mean_prior={self.mean_prior}; set 'network_def#mean_prior' to {str(has_prior).lower()}"
            )
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
        """Slices ``index`` (B, K) along ``axis`` -> (B, K, N, N), all K x B slices in one decoder call.

        ``feats`` from :meth:`encode` (sample, concatenate, decode) or from :meth:`project_features` (the
        decoder's first convolution already applied to the feature maps; same result, see there).
        """
        if isinstance(feats, ProjectedFeatures):
            h = self._first_conv_projected(feats, index, axis)
        else:
            h = self.decoder.blocks[0](self._decoder_input(feats, index, axis))
        for block in self.decoder.blocks[1:]:
            h = block(h)
        b, k = index.shape
        out = h[:, self.output_channel].reshape(b, k, self.volume_size, self.volume_size)
        if self.mean_prior:  # the decoder predicts the residual to the prior's slices
            out = out + self.prior.movedim(axis, 0)[index].to(out.dtype)
        return out

    def _decoder_input(self, feats: list[torch.Tensor], index: torch.Tensor, axis: int) -> torch.Tensor:
        """(B*K, 2 C + PE, F, F): features sampled at the slices' points in both views + positional encoding."""
        b, k = index.shape
        f = self.feature_res
        parts = []
        for view, feat in zip(VIEWS, feats):
            grid = self._buffer(view, axis)[index].to(feat.dtype).reshape(b, k * f, f, 2)
            sampled = F.grid_sample(
                feat, grid, mode="bilinear", padding_mode="zeros", align_corners=self.align_corners
            )
            parts.append(sampled.reshape(b, -1, k, f, f).transpose(1, 2))  # (B, K, C, F, F)
        parts.append(self._positional(index, axis).to(parts[0].dtype))
        return torch.cat(parts, dim=2).reshape(b * k, -1, f, f)

    def _positional(self, index: torch.Tensor, axis: int) -> torch.Tensor:
        return self.pos_enc(self._buffer("unit", axis)[index]).permute(0, 1, 4, 2, 3)  # (B, K, PE, F, F)

    def project_features(self, feats: list[torch.Tensor]) -> ProjectedFeatures:
        """Apply the decoder's first 3x3 convolution to the encoder features *before* sampling (inference).

        Bilinear sampling and convolution are both linear, so for each of the 9 kernel taps ``W_t`` the
        image-feature part of ``conv(z)`` at grid point p is ``sum_t (W_t * feat)`` sampled where the
        neighbour ``p + t`` projects. Projecting the (h x w) feature maps once per volume (a 1x1 convolution
        to 9 x C_out channels) replaces the per-slice convolution over 2 x 512 sampled channels (the largest
        convolution of the decoder, 1087 -> 512 channels at F x F in the paper); only the 63-channel
        positional part is still convolved per slice. Equal to the direct path up to float rounding.
        """
        conv = self.decoder.blocks[0].conv
        c = feats[0].shape[1]
        c_out = conv.weight.shape[0]
        taps = []
        for i, feat in enumerate(feats):
            w = conv.weight[:, i * c : (i + 1) * c]  # (C_out, C, 3, 3)
            w = w.permute(2, 3, 0, 1).reshape(9 * c_out, c, 1, 1)  # tap-major: (ky, kx, C_out)
            taps.append(F.conv2d(feat, w.to(feat.dtype)))  # (B, 9 C_out, h, w)
        return ProjectedFeatures(taps)

    def _first_conv_projected(self, feats: ProjectedFeatures, index: torch.Tensor, axis: int) -> torch.Tensor:
        b, k = index.shape
        f = self.feature_res
        conv = self.decoder.blocks[0].conv
        c_out = conv.weight.shape[0]
        total = None
        for view, tap in zip(VIEWS, feats.taps):
            grid = self._buffer(view, axis)[index].to(tap.dtype).reshape(b, k * f, f, 2)
            sampled = F.grid_sample(
                tap, grid, mode="bilinear", padding_mode="zeros", align_corners=self.align_corners
            )
            total = sampled if total is None else total + sampled  # (B, 9 C_out, K F, F)
        taps = total.reshape(b, 9, c_out, k, f, f).permute(0, 3, 1, 2, 4, 5).reshape(b * k, 9, c_out, f, f)
        taps = F.pad(taps, (1, 1, 1, 1))
        n_img = conv.weight.shape[1] - self.pos_enc.out_channels
        pe = self._positional(index, axis).reshape(b * k, -1, f, f).to(taps.dtype)
        out = F.conv2d(pe, conv.weight[:, n_img:].to(taps.dtype), conv.bias, padding=1)
        for t in range(9):  # output(i, j) += tap (ky, kx) read at neighbour (i + ky - 1, j + kx - 1)
            ky, kx = divmod(t, 3)
            out = out + taps[:, t, :, ky : ky + f, kx : kx + f]
        return out

    def machine_chunk_size(self, feats, device: torch.device, axis: int | None = None, fused: bool = True) -> int:
        """The chunk size for this machine: CUDA by free memory (:func:`auto_chunk_size`); CPU timed once on
        ``feats`` (this volume's encoder output, sampled or fused) and cached (:func:`timed_chunk_size`)."""
        device = torch.device(device)
        if device.type == "cuda":
            return auto_chunk_size(self, device)
        axis = self.decode_axis if axis is None else int(axis)
        b = feats.taps[0].shape[0] if isinstance(feats, ProjectedFeatures) else feats[0].shape[0]

        def decode(c: int):
            idx = torch.arange(c, device=device).unsqueeze(0).expand(b, -1)
            return self.decode_slices(feats, idx, axis)

        return timed_chunk_size(self, decode, device, fused, b)

    def reconstruct(
        self,
        x: torch.Tensor,
        chunk_size: int | None = None,
        axis: int | None = None,
        fused: bool | None = None,
    ) -> torch.Tensor:
        """Whole volume (B, 1, N, N, N) decoded ``chunk_size`` slices per decoder call (1 = slice by slice).

        The volume is canonical RAS for both cameras (the released camera's (D0, D1, D2) are reordered);
        ``axis`` and :meth:`decode_slices` address the camera's own array axes. ``fused`` (default: when
        not training) applies the decoder's first convolution before sampling (:meth:`project_features`).
        ``chunk_size`` 0 (or the network's ``chunk_size`` 0) picks it for the machine (:meth:`machine_chunk_size`).
        """
        axis = self.decode_axis if axis is None else int(axis)
        chunk = self.chunk_size if chunk_size is None else int(chunk_size)
        fused = (not self.training) if fused is None else bool(fused)
        feats = self.encode(x)
        if fused:
            feats = self.project_features(feats)
        b, n = x.shape[0], self.volume_size
        if chunk <= 0:
            chunk = self.machine_chunk_size(feats, x.device, axis, fused)
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
