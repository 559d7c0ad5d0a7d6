"""Convert the released PerX2CT checkpoint (``PerX2CT.ckpt``, PyTorch Lightning) into this bundle's ``model.pt``.

    python -m bundles.perx2ct.scripts.convert_official PerX2CT.ckpt bundles/perx2ct/models/model.pt

The checkpoint's ``state_dict`` is that of ``INRAEZoomModel`` (github.com/dek924/PerX2CT,
``configs/PerX2CT.yaml``): ``encoder.network_fn.cond_encoder.model.*`` is a torchvision ResNet cut after
``layer2`` (one encoder for both views; ``cond_encoder.conv2/bn2`` only if layer2's width differs from the
latent size), ``decoder.*`` a taming-transformers ``Decoder``; ``loss.*`` (LPIPS, discriminator) is dropped.
The architecture is read from the tensor shapes, the weights are mapped onto :class:`PerX2CTNet` built with
the original camera (``camera="perx2ct"``), and the two layout differences are handled exactly: the
decoder's first convolution is permuted from the original's channel order ``[NeRF encoding (interleaved
sin/cos) | PA | lateral]`` to ours ``[PA | lateral | encoding (sin block, cos block)]``, and taming's 1x1
attention convolutions become MONAI's linear layers.

Reading is ``torch.load(weights_only=True)`` only. Lightning 1.0.x pickles its callback states keyed by
the callback *class* (``pytorch_lightning.callbacks.ModelCheckpoint``), which ``weights_only`` refuses; such
references from Lightning / omegaconf are bound to an inert placeholder (never imported, never executed)
and any other global is refused. Only ``state_dict`` is kept. Run inference with
``configs/perx2ct_official.json`` on top of ``inference.json``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Iterator

import fire
import torch

from common.atomic import atomic_path
from common.checkpoint import check_torch_file
from common.errors import InputError, require_file

ENCODER_PREFIX = "encoder.network_fn.cond_encoder."
DECODER_PREFIX = "decoder."
# modules a Lightning/omegaconf checkpoint may reference outside its tensors (callback keys, hparams)
BENIGN_GLOBAL_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")
# what the released model needs besides the weights (configs/PerX2CT.yaml and its data loader)
OFFICIAL_SETTINGS = dict(
    volume_size=128,
    image_size=128,
    spacing=(2.5, 2.5, 2.5),  # a 320 mm cube at 1 mm resampled to 128^3
    camera="perx2ct",
    fov_deg=60.0,
    shared_encoder=True,
    encoder_in_channels=3,
    encoder_normalization="imagenet",
    encoder_bias_downsample=False,
    decode_axis=0,  # the original's axial axis
)


class _Inert:
    """Stands in for a Lightning/omegaconf class referenced by a checkpoint: accepts and keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lightning_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, read with ``torch.load(weights_only=True)``."""
    path = require_file(path)
    if os.path.getsize(path) == 0:
        raise InputError(path, "empty file, not a checkpoint")
    check_torch_file(path, legacy="size")  # no zip bomb, no declared size beyond the file or the limit
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise InputError(path, f"not a readable PyTorch checkpoint ({e})") from e
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        unknown = [n for n in names if not n.startswith(BENIGN_GLOBAL_PREFIXES)]
        if unknown:
            raise InputError(
                path,
                f"refusing to unpickle {unknown}: a Lightning checkpoint references only Lightning/omegaconf "
                "classes besides tensors",
            ) from e
        with torch.serialization.safe_globals([(_Inert, name) for name in names]):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e2:
                raise InputError(
                    path, f"not a readable PyTorch checkpoint ({type(e2).__name__}: {e2})"
                ) from e2
    except Exception as e:  # truncated zip, not a torch file, ...
        raise InputError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(path, f"not a PyTorch Lightning checkpoint: no 'state_dict' (found {found})")
    state = ckpt["state_dict"]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(path, f"state_dict holds non-tensor entries {bad[:5]}")
    return state


def _count(state: dict, pattern: str) -> int:
    """Number of distinct integers ``i`` in keys matching ``pattern`` (with one ``(\\d+)`` group)."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def infer_network_kwargs(state: dict[str, torch.Tensor], path: str | None = None) -> dict:
    """``PerX2CTNet`` arguments (architecture only) read off the released checkpoint's tensor shapes."""
    enc = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    dec = {k[len(DECODER_PREFIX) :]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    if "model.conv1.weight" not in enc or "conv_in.weight" not in dec:
        sample = sorted(state)[:6]
        raise InputError(
            path,
            "not a PerX2CT checkpoint: no 'encoder.network_fn.cond_encoder.model.conv1.weight' / "
            f"'decoder.conv_in.weight' (keys start with {sample})",
        )
    if any(k.startswith(("global", "model.layer3", "model.layer4", "model.fc")) for k in enc) or any(
        ".global" in k for k in state
    ):
        raise InputError(
            path,
            "this checkpoint holds global features or ResNet layers beyond layer2 (PerX2CT_global / zoom-in "
            "variant): only PerX2CT.ckpt (configs/PerX2CT.yaml) is supported",
        )
    axis_emb = state.get("encoder.axis_emb.weight")
    if axis_emb is not None and axis_emb.shape[-1] != 0:
        raise InputError(
            path, f"axis embedding of size {axis_emb.shape[-1]} is not supported (PerX2CT uses 0)"
        )
    bottleneck = "model.layer1.0.conv3.weight" in enc
    layers = [_count(enc, rf"model\.layer{i}\.(\d+)\.") for i in (1, 2)]
    inplanes = [int(enc[f"model.layer{i}.0.conv1.weight"].shape[0]) for i in (1, 2)]
    if "conv2.weight" in enc:
        latent = int(enc["conv2.weight"].shape[0])
    else:
        latent = int(enc[f"model.layer2.{layers[1] - 1}.conv{3 if bottleneck else 2}.weight"].shape[0])
    in_ch = int(enc["model.conv1.weight"].shape[1])
    z_channels = int(dec["conv_in.weight"].shape[1])
    pe = z_channels - 2 * latent
    if pe < 3 or (pe - 3) % 6:
        raise InputError(
            path, f"decoder input of {z_channels} channels is not 2 x {latent} + a NeRF encoding"
        )
    levels = _count(dec, r"up\.(\d+)\.")
    res_blocks = _count(dec, r"up\.0\.block\.(\d+)\.")
    channels = [int(dec[f"up.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    attn_levels = [any(k.startswith(f"up.{i}.attn.") for k in dec) for i in range(levels)]
    has_mid_attn = any(k.startswith("mid.attn_1.") for k in dec)
    if any(attn_levels[:-1]) or attn_levels[-1] != has_mid_attn:
        raise InputError(
            path, f"attention at levels {attn_levels} (mid {has_mid_attn}) is not PerX2CT's layout"
        )
    feature_res = OFFICIAL_SETTINGS["volume_size"] // 2 ** (levels - 1)
    return dict(
        feature_res=feature_res,
        encoder_block="bottleneck" if bottleneck else "basic",
        encoder_layers=layers,
        encoder_inplanes=inplanes,
        encoder_in_channels=in_ch,
        latent_dim=latent,
        pe_multires=(pe - 3) // 6,
        decoder_channels=channels,
        decoder_res_blocks=res_blocks,
        norm_num_groups=32,  # taming's Normalize is GroupNorm(32, eps=1e-6)
        attention=has_mid_attn,
        decoder_out_activation=True,
        out_channels=int(dec["conv_out.weight"].shape[0]),
        output_channel=1 if int(dec["conv_out.weight"].shape[0]) > 1 else 0,
    )


def _taming_decoder_modules(levels: int, res_blocks: int, attention: bool) -> Iterator[tuple[str, str]]:
    """(taming prefix, kind) in forward order, which is also the order of MONAI's ``Decoder.blocks``."""
    yield "conv_in", "conv"
    if attention:
        yield from (("mid.block_1", "res"), ("mid.attn_1", "attn"), ("mid.block_2", "res"))
    else:
        raise ValueError("taming's Decoder always has a middle attention block")
    for level in reversed(range(levels)):
        for j in range(res_blocks):
            yield f"up.{level}.block.{j}", "res"
            if attention and level == levels - 1:
                yield f"up.{level}.attn.{j}", "attn"
        if level != 0:
            yield f"up.{level}.upsample.conv", "upsample"
    yield "norm_out", "norm"
    yield "nonlinearity", "act"  # swish, no parameters
    yield "conv_out", "conv"


def conv_in_permutation(latent: int, multires: int) -> torch.Tensor:
    """Index ``p`` such that ``ours[:, c] = original[:, p[c]]`` for the decoder's input channels.

    Original: [x, (sin f_l x, cos f_l x) for l] per xyz (NeRF), then PA, then lateral features.
    Ours: PA, lateral, then [x, sin f_l x_d (d-major), cos f_l x_d (d-major)].
    """
    n_pe = 3 * (1 + 2 * multires)
    perm = [n_pe + c for c in range(2 * latent)]
    perm += list(range(3))
    perm += [3 + k * 6 + d for d in range(3) for k in range(multires)]  # sin
    perm += [3 + k * 6 + 3 + d for d in range(3) for k in range(multires)]  # cos
    return torch.tensor(perm)


def convert_state_dict(state: dict[str, torch.Tensor], net: torch.nn.Module, kwargs: dict) -> dict:
    """Map the released ``state_dict`` onto ``net`` (a :class:`PerX2CTNet` built from ``kwargs``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(ENCODER_PREFIX):
            continue
        sub = key[len(ENCODER_PREFIX) :]
        sub = re.sub(r"^model\.conv1\.", "stem.0.", sub)
        sub = re.sub(r"^model\.bn1\.", "stem.1.", sub)
        sub = re.sub(r"^model\.(layer[12])\.", r"\1.", sub)
        sub = re.sub(r"^conv2\.", "project.0.", sub)
        sub = re.sub(r"^bn2\.", "project.1.", sub)
        out["encoder." + sub] = value
    res_map = {"norm1": "norm1", "conv1": "conv1.conv", "norm2": "norm2", "conv2": "conv2.conv",
               "nin_shortcut": "nin_shortcut.conv"}  # fmt: skip
    attn_map = {
        "norm": "norm",
        "q": "attn.to_q",
        "k": "attn.to_k",
        "v": "attn.to_v",
        "proj_out": "attn.out_proj",
    }
    modules = list(
        _taming_decoder_modules(
            len(kwargs["decoder_channels"]), kwargs["decoder_res_blocks"], kwargs["attention"]
        )
    )
    blocks = net.decoder.blocks
    if len(modules) != len(blocks):
        raise ValueError(
            f"decoder layout mismatch: {len(modules)} taming modules vs {len(blocks)} MONAI blocks"
        )
    perm = conv_in_permutation(kwargs["latent_dim"], kwargs["pe_multires"])
    for i, (prefix, kind) in enumerate(modules):
        src = f"{DECODER_PREFIX}{prefix}."
        dst = f"decoder.blocks.{i}."
        for key, value in state.items():
            if not key.startswith(src):
                continue
            name, param = key[len(src) :].rsplit(".", 1) if kind in ("res", "attn") else ("", key[len(src) :])
            if kind == "res":
                out[f"{dst}{res_map[name]}.{param}"] = value
            elif kind == "attn":
                out[f"{dst}{attn_map[name]}.{param}"] = value.flatten(1) if value.ndim == 4 else value
            elif kind == "norm":
                out[f"{dst}{param}"] = value
            elif kind == "upsample":
                out[f"{dst}postconv.conv.{param}"] = value
            elif prefix == "conv_in" and param == "weight":
                out[f"{dst}conv.{param}"] = value[:, perm]
            else:
                out[f"{dst}conv.{param}"] = value
    # buffers the network records about itself (spacing, geometry, camera)
    for name in ("spacing_mm", "geometry_mm", "camera_fov_deg"):
        out[name] = getattr(net, name).clone()
    return out


def build_official_network(kwargs: dict, image_size: int | None = None):
    """A :class:`PerX2CTNet` in the released model's configuration (architecture from ``kwargs``)."""
    from bundles.perx2ct.scripts.networks import PerX2CTNet

    settings = dict(OFFICIAL_SETTINGS)
    settings["volume_size"] = kwargs["feature_res"] * 2 ** (len(kwargs["decoder_channels"]) - 1)
    if image_size is not None:
        settings["image_size"] = int(image_size)
    return PerX2CTNet(**{**settings, **kwargs, "geometry": "perx2ct"})


def convert(
    checkpoint: str, output: str, volume_size: int | None = None, image_size: int | None = None
) -> dict:
    """Read ``checkpoint``, write ``{"model": state_dict, "network_kwargs", "source"}`` to ``output``.

    ``volume_size`` / ``image_size`` override the released model's 128 / 128 (the architecture does not
    fix them: the decoder upsamples F x 4, the camera works in unit coordinates).
    Returns the network arguments (put them in the config if they differ from ``perx2ct_official.json``).
    """
    state = read_lightning_state_dict(checkpoint)
    try:  # a crafted state dict (odd shapes, missing keys) is bad input, not a crash
        kwargs = infer_network_kwargs(state, checkpoint)
        if volume_size is not None:
            kwargs["feature_res"] = int(volume_size) // 2 ** (len(kwargs["decoder_channels"]) - 1)
        net = build_official_network(kwargs, image_size)
        converted = convert_state_dict(state, net, kwargs)
        missing, unexpected = net.load_state_dict(converted, strict=False)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(checkpoint, f"not a convertible PerX2CT checkpoint ({type(e).__name__}: {e})") from None
    if missing or unexpected:
        raise InputError(
            checkpoint, f"conversion incomplete: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    dropped = sorted({k.split(".")[0] for k in state if not k.startswith((ENCODER_PREFIX, DECODER_PREFIX))})
    record = {
        "model": net.state_dict(),
        "network_kwargs": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()},
        "source": {"file": os.path.basename(checkpoint), "sha256": _sha256(checkpoint), "dropped": dropped},
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with atomic_path(output) as tmp:
        torch.save(record, tmp)
    return record["network_kwargs"]


def main(checkpoint: str, output: str, volume_size: int | None = None, image_size: int | None = None) -> None:
    """``convert`` with a one-line ``error: <file>: <problem>`` (exit status 1) for bad input, no traceback."""
    try:
        kwargs = convert(checkpoint, output, volume_size, image_size)
    except InputError as exc:
        raise SystemExit("error: " + " ".join(str(exc).split())) from None  # torch's messages span lines
    print(f"wrote {output}")
    print("architecture read from the checkpoint:")
    for key, value in kwargs.items():
        print(f"  {key}: {value}")
    print(
        "run: python -m monai.bundle run inference --config_file \"['bundles/perx2ct/configs/inference.json',"
        "'bundles/perx2ct/configs/perx2ct_official.json']\" --ckpt_path " + output + " --dataset_dir <dir>"
    )


if __name__ == "__main__":
    fire.Fire(main)
