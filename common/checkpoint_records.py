"""Checkpoint records: what a loader needs to rebuild a network, read and verified from hostile files.

Part of :mod:`common.checkpoint` (import from there): :class:`CheckpointRecord`, :func:`read_checkpoint` (zip
checks, ``torch.load(weights_only=True)``, record checks), the zoo form (:func:`export_bare`, sidecar bound by
``weights_sha256``), :func:`check_record`, :func:`load_weights`, :func:`build_from_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence

import torch

from common.atomic import atomic_path, atomic_write_text
from common.checkpoint_registry import (
    _definition,
    instantiate_network,
    network_description,
    network_differences,
    plain,
    unwrap,
)
from common.errors import InputError, require_file
from common.intensity import get_window

RECORD_FORMAT = "xray2ct.checkpoint_record/1"
RECORD_KEY = "record"
MODEL_KEY = "model"
RECORD_FILE = "checkpoint_record.json"
ARGS_FILE = "network_args.json"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bundle_version(metadata_file: str | os.PathLike | None) -> str | None:
    """``version`` of a bundle's ``configs/metadata.json`` (None when the file is not given or absent)."""
    if not metadata_file or not os.path.isfile(metadata_file):
        return None
    with open(metadata_file) as f:
        return str(json.load(f).get("version"))


class CheckpointRecord:
    """What a loader needs to rebuild a bundle's network and inputs, saved in every checkpoint (key ``record``).

    ``CheckpointSaver``/``CheckpointLoader`` treat it like a module (``state_dict``/``load_state_dict``, one
    JSON string, so ``torch.load(weights_only=True)`` reads it). ``network`` must have been built by
    :func:`build_network`; ``inputs`` holds the bundle's input conventions (size, spacing, HU window, DRR
    geometry...); ``datalist`` (a file) is fingerprinted so checkpoints of different data never compete.
    """

    def __init__(
        self,
        bundle: str,
        network: torch.nn.Module | None = None,
        network_def: Mapping | None = None,
        inputs: Mapping | None = None,
        metadata_file: str | os.PathLike | None = None,
        version: str | None = None,
        datalist: str | os.PathLike | None = None,
        training: Mapping | None = None,
    ):
        self.network = network
        data = {"format": RECORD_FORMAT, "bundle": str(bundle)}
        data["version"] = version if version is not None else read_bundle_version(metadata_file)
        if network_def is not None:
            data["network_def"] = plain(dict(network_def))
        data["inputs"] = plain(dict(inputs or {}))
        if "hu_window" in data["inputs"] and isinstance(data["inputs"]["hu_window"], str):
            data["inputs"]["hu_window"] = get_window(data["inputs"]["hu_window"]).as_dict()
        if datalist:
            path = os.path.abspath(os.fspath(datalist))
            data["datalist"] = {"file": path, "sha256": file_sha256(path) if os.path.isfile(path) else None}
        if training:
            data["training"] = plain(dict(training))
        self._data = data

    @property
    def data(self) -> dict:
        """The record as a dict (``network_def`` from the network when it was built by :func:`build_network`)."""
        data = dict(self._data)
        if "network_def" not in data and self.network is not None:
            description = network_description(self.network)
            if description is None:
                raise InputError(
                    None, "the network was not built by common.checkpoint.build_network: nothing to record"
                )
            data["network_def"] = description
        return data

    def state_dict(self) -> dict:
        return {"json": json.dumps(self.data, sort_keys=True)}

    def load_state_dict(self, state: Mapping) -> None:
        self._data = json.loads(state["json"])
        self.network = None

    def write(self, folder: str | os.PathLike) -> str:
        """Write ``checkpoint_record.json`` and ``network_args.json`` (``monai.bundle run --args_file`` ready:
        ``network_def#<argument>`` overrides that rebuild this network from the bundle's default config)."""
        os.makedirs(folder, exist_ok=True)
        data = self.data
        args = {
            f"network_def#{k}": v for k, v in data["network_def"].items() if k not in ("_target_", "target")
        }
        atomic_write_text(os.path.join(folder, ARGS_FILE), json.dumps(args, indent=2) + "\n")
        path = os.path.join(folder, RECORD_FILE)
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
        return path


def comparable(a: Mapping | None, b: Mapping | None) -> bool:
    """True when two records describe the same bundle, network and datalist (their scores can be compared)."""
    if not a or not b:
        return False
    same_data = (a.get("datalist") or {}).get("sha256") == (b.get("datalist") or {}).get("sha256")
    if not (a.get("bundle") == b.get("bundle") and same_data and a.get("network_def") and b.get("network_def")):
        return False
    try:
        return not network_differences(a["network_def"], b["network_def"])
    except InputError:  # a record naming a class off the allow-list compares with nothing
        return False


# ----------------------------------------------------------------------------------------------- reading
MAX_CHECKPOINT_BYTES_ENV = "XRAY2CT_MAX_CHECKPOINT_BYTES"
DEFAULT_MAX_CHECKPOINT_BYTES = 8 << 30  # 8 GiB: above every network of the project with optimiser states
MAX_SIDECAR_BYTES = 1 << 20
SIDECAR_SUFFIX = ".record.json"
BASELINE_SUFFIX = ".baseline.pt"  # the zoo form's mean-CT baseline beside X.pt (X.baseline.pt)
BASELINE_ENTRY = "baseline"  # common.baselines.BASELINE_KEY: the checkpoint entry it travels in
_CONFIG_SYNTAX = ("$", "@", "%")  # MONAI ConfigParser: expression, reference, macro
_CONFIG_KEYS = ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_")


def max_checkpoint_bytes() -> int:
    """The largest checkpoint (bytes, file and tensors alike) a loader reads: ``$XRAY2CT_MAX_CHECKPOINT_BYTES``
    or 8 GiB."""
    text = os.environ.get(MAX_CHECKPOINT_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_CHECKPOINT_BYTES
    try:
        value = int(text)
    except ValueError:
        raise InputError(None, f"{MAX_CHECKPOINT_BYTES_ENV}={text!r} is not a number of bytes") from None
    if value <= 0:
        raise InputError(None, f"{MAX_CHECKPOINT_BYTES_ENV}={text!r} must be positive")
    return value


def check_torch_file(path: str | os.PathLike, legacy: str = "refuse", limit: int | None = None) -> None:
    """Refuse a ``.pt`` that would inflate or lie about its sizes, before ``torch.load`` allocates anything.

    ``torch.save`` writes a zip whose entries are STORED (uncompressed): a compressed entry (a zip bomb: 1 MB
    inflating to GiB), an entry whose declared size overruns the file, or declared sizes summing above the
    file's size or ``limit`` (default :func:`max_checkpoint_bytes`) are refused with :class:`InputError`.
    A file that is not a zip is the pre-1.6 legacy format: ``legacy="refuse"`` (our checkpoints: every
    torch since 1.6 writes zips) refuses it; ``legacy="size"`` (third-party weights) only checks its size.
    """
    import zipfile

    path = os.fspath(path)
    limit = max_checkpoint_bytes() if limit is None else limit
    size = os.path.getsize(path)
    if size > limit:
        raise InputError(path, f"is {size} bytes, above the {limit}-byte limit for checkpoints ({MAX_CHECKPOINT_BYTES_ENV})")
    if not zipfile.is_zipfile(path):
        if legacy == "size":
            return
        raise InputError(
            path, "cannot read the checkpoint (not the zip format torch.save writes since torch 1.6; the legacy "
            "format is refused): the file is truncated or not a checkpoint",
        )
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(path, f"unreadable checkpoint archive ({e})") from None
    total = 0
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise InputError(
                path, f"entry {entry.filename[:100]!r} is compressed ({entry.file_size} bytes declared in "
                f"{entry.compress_size}): torch.save never compresses, refusing a possible zip bomb",
            )
        if entry.header_offset + entry.file_size > size:
            raise InputError(path, f"entry {entry.filename[:100]!r} declares {entry.file_size} bytes beyond the end of the file")
        total += entry.file_size
    if total > min(size, limit):
        raise InputError(path, f"entries declare {total} bytes, more than the file's {size} bytes (limit {limit})")


def _check_record_data(record: object, source: str | None) -> dict:
    """A parsed record, refused unless it is inert data: a dict whose strings carry no MONAI config syntax
    (``$`` expressions, ``@`` references, ``%`` macros) and whose dicts no ``_target_``-like keys (except an
    allow-listed ``_target_`` of a ``network_def``, also one nested, such as the VQ-GAN record in latent_ddpm's),
    since loaders set record values into config parsers."""
    if not isinstance(record, dict):
        raise InputError(source, f"checkpoint record is a {type(record).__name__}, not a dict")

    def walk(value, where: str) -> None:
        if isinstance(value, str):
            if value.startswith(_CONFIG_SYNTAX):
                raise InputError(source, f"checkpoint record {where} = {value[:60]!r} is config syntax, not data")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, dict):
            definition = where.rsplit(".", 1)[-1] == "network_def"  # also a record inside (latent_ddpm's VQ-GAN)
            if definition:
                _definition(value, source)  # allow-listed class, plain arguments
            for k, v in value.items():
                if k in _CONFIG_KEYS and not (definition and k == "_target_"):
                    raise InputError(source, f"checkpoint record {where}.{k} = {str(v)[:60]!r} is config syntax, not data")
                walk(v, f"{where}.{k}")

    for key, value in record.items():
        walk(value, str(key))
    if record.get("network_def") is not None:
        _definition(record["network_def"], source)  # not a dict: refused
    return record


def sidecar_path(path: str | os.PathLike) -> str:
    """``X.record.json`` beside the bare state dict ``X.pt`` (the zoo form, see :func:`export_bare`)."""
    stem, _ = os.path.splitext(os.fspath(path))
    return stem + SIDECAR_SUFFIX


def baseline_path(path: str | os.PathLike) -> str:
    """``X.baseline.pt`` beside the bare state dict ``X.pt``: the training checkpoint's ``baseline`` entry (the mean
    training CT of the X-ray -> CT bundles) in the zoo form, bound to the record by ``baseline_sha256``."""
    stem, _ = os.path.splitext(os.fspath(path))
    return stem + BASELINE_SUFFIX


def _read_baseline(path: str, expected: object) -> dict | None:
    """The ``baseline`` entry of a zoo-form checkpoint ``path`` from ``X.baseline.pt`` (:func:`baseline_path`),
    read like a checkpoint (zip checks, ``weights_only``) and refused unless its sha256 is the record's
    ``baseline_sha256`` (``expected``). A missing file (published without it) loads without it, with a warning:
    the baseline is then rebuilt from the training datalist or reported unavailable."""
    if expected is None:
        return None
    file = baseline_path(path)
    if not isinstance(expected, str):
        raise InputError(sidecar_path(path), "baseline_sha256 is not a sha256 string")
    if not os.path.isfile(file):
        warnings.warn(f"{file}: not found (the record names a stored mean-CT baseline); loaded without it", stacklevel=3)
        return None
    actual = file_sha256(file)
    if actual != expected:
        raise InputError(
            file, f"belongs to other weights (baseline_sha256 {expected[:12]}..., the file is {actual[:12]}...): "
            "refusing a swapped baseline",
        )
    check_torch_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged file: as read_checkpoint
        raise InputError(file, f"cannot read the stored baseline ({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping):
        raise InputError(file, f"stored baseline is a {type(state).__name__}, not a dict")
    return dict(state)


def _read_sidecar(path: str) -> dict | None:
    """The record of a bare state dict from its sidecar, refused unless its ``weights_sha256`` is the file's."""
    sidecar = sidecar_path(path)
    if not os.path.isfile(sidecar):
        return None
    if os.path.getsize(sidecar) > MAX_SIDECAR_BYTES:
        raise InputError(sidecar, f"record above {MAX_SIDECAR_BYTES} bytes")
    try:
        with open(sidecar, encoding="utf-8") as f:
            record = json.load(f)
    except RecursionError:
        raise InputError(sidecar, "checkpoint record is nested too deeply") from None
    except (OSError, ValueError) as e:
        raise InputError(sidecar, f"unreadable checkpoint record ({e})") from None
    if not isinstance(record, dict):
        raise InputError(sidecar, "checkpoint record is not a JSON object")
    expected = record.pop("weights_sha256", None)
    if not isinstance(expected, str):
        raise InputError(sidecar, "record has no weights_sha256: it is not bound to any weights")
    actual = file_sha256(path)
    if actual != expected:
        raise InputError(
            sidecar, f"record belongs to other weights (weights_sha256 {expected[:12]}..., {os.path.basename(path)} "
            f"is {actual[:12]}...): refusing a swapped record",
        )
    try:
        return _check_record_data(record, sidecar)
    except RecursionError:
        raise InputError(sidecar, "checkpoint record is nested too deeply") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint as ``{"model": state_dict, "record": {"json": ...}, ...}``, read safely.

    :func:`check_torch_file` (no zip bomb) then ``torch.load(weights_only=True)`` (nothing is unpickled); an
    unreadable file (truncated, or not a PyTorch checkpoint) raises :class:`InputError` naming the file. A
    bare state dict is wrapped as ``{"model": ...}`` with the record of its sidecar ``X.record.json`` when that
    exists and its ``weights_sha256`` matches (else refused). The record is checked to be inert data naming an
    allow-listed network (:func:`allowed_network`).
    """
    path = require_file(path)
    check_torch_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise InputError(
            path, f"cannot read the checkpoint ({type(e).__name__}: {e}); the file is truncated or not a checkpoint"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise InputError(path, f"expected a dict of states, got {type(checkpoint).__name__}")
    checkpoint = dict(checkpoint)
    if MODEL_KEY not in checkpoint and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {MODEL_KEY: checkpoint}  # a bare state dict (ignite's one-entry save_dict, the zoo form)
        record = _read_sidecar(path)
        if record is not None:
            baseline = _read_baseline(path, record.pop("baseline_sha256", None))
            if baseline is not None:
                checkpoint[BASELINE_ENTRY] = baseline
            checkpoint[RECORD_KEY] = {"json": json.dumps(record, sort_keys=True)}
    record_of(checkpoint, path)
    return checkpoint


def record_of(checkpoint: Mapping, source: str | os.PathLike | None = None) -> dict | None:
    """The record of a checkpoint read by :func:`read_checkpoint` (None for checkpoints saved without one),
    refused unless it is inert data naming an allow-listed network."""
    source = None if source is None else os.fspath(source)
    state = checkpoint.get(RECORD_KEY)
    if state is None:
        return None
    try:
        return _check_record_data(json.loads(state["json"]), source)
    except RecursionError:
        raise InputError(source, "checkpoint record is nested too deeply") from None
    except InputError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(source, f"checkpoint record is unreadable ({e})") from None


def export_bare(src: str | os.PathLike, dst: str | os.PathLike) -> tuple[str, str]:
    """Write the zoo form of checkpoint ``src``: the bare state dict ``dst`` (what MONAI's ``ckpt_export``
    loads without ``key_in_ckpt``) and its record ``dst`` minus ``.pt`` plus ``.record.json``, bound to the
    weights by ``weights_sha256``. A stored mean-CT baseline (the ``baseline`` entry of the X-ray -> CT bundles'
    checkpoints) goes to ``X.baseline.pt`` (:func:`baseline_path`, tensors and numbers: ``weights_only``),
    bound by ``baseline_sha256``, so a published bundle still reports its baseline. Each file is written
    atomically, the record last; returns ``(weights, record)`` paths."""

    src, dst = os.fspath(src), os.fspath(dst)
    checkpoint = read_checkpoint(src)
    record = record_of(checkpoint, src)
    if record is None:
        raise InputError(src, "checkpoint has no record to export beside its weights")
    sidecar = sidecar_path(dst)
    baseline = checkpoint.get(BASELINE_ENTRY)
    if isinstance(baseline, Mapping) and baseline:
        with atomic_path(baseline_path(dst)) as tmp:
            torch.save(dict(baseline), tmp)
            record = {**record, "baseline_sha256": file_sha256(tmp)}
    with atomic_path(dst) as tmp:
        torch.save(network_state(checkpoint, src), tmp)
        record = {**record, "weights_sha256": file_sha256(tmp)}
        atomic_write_text(sidecar, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return dst, sidecar


def read_record(path: str | os.PathLike) -> dict | None:
    """The record saved in the checkpoint file ``path`` (None when it has none)."""
    return record_of(read_checkpoint(path))


def network_state(checkpoint: Mapping, source: str | None = None) -> dict:
    """The network's state dict in a checkpoint read by :func:`read_checkpoint`."""
    if MODEL_KEY not in checkpoint:
        raise InputError(source, f"checkpoint has no '{MODEL_KEY}' entry (keys: {sorted(checkpoint)})")
    return checkpoint[MODEL_KEY]


def check_record(
    record: Mapping | None,
    network: torch.nn.Module | None = None,
    network_def: Mapping | None = None,
    expected_bundle: str | None = None,
    source: str | os.PathLike | None = None,
    ignore: Sequence[str] = (),
    hint: str = "Set these network_def values (or build from the checkpoint: common.checkpoint.build_from_checkpoint)",
) -> None:
    """Refuse (:class:`InputError`) a checkpoint of another bundle or one whose network the config contradicts.

    ``network`` (built by :func:`build_network`) or ``network_def`` is what the config builds. A checkpoint
    without a record passes with a warning: it can only be checked by loading its weights. ``hint``: the
    sentence after the differences saying what to do (each caller knows its own remedy).
    """
    source = None if source is None else os.fspath(source)
    if record is None:
        warnings.warn(
            f"{source}: checkpoint has no record (saved before xray2ct recorded its networks): "
            "loaded through the config, which nothing checks",
            stacklevel=3,
        )
        return
    if expected_bundle is not None and record.get("bundle") != expected_bundle:
        raise InputError(source, f"is a {record.get('bundle')!r} checkpoint, not {expected_bundle!r}")
    configured = network_def if network_def is not None else (
        network_description(network) if network is not None else None
    )
    if configured is None or "network_def" not in record:
        return
    differences = network_differences(record["network_def"], configured, ignore, source)
    if differences:
        raise InputError(
            source,
            "the config contradicts the checkpoint's record: "
            + "; ".join(differences)
            + f". {hint}",
        )


def _load_state(network: torch.nn.Module, state: Mapping, source: str, strict: bool = True) -> None:
    try:
        unwrap(network).load_state_dict(state, strict=strict)
    except (RuntimeError, ValueError) as e:
        raise InputError(source, f"weights do not fit the network ({e})") from None


def load_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    expected_bundle: str | None = None,
    strict: bool = True,
) -> dict | None:
    """Load a checkpoint's network weights into ``network`` (built from a config); returns the record.

    The one checkpoint loader of the project (DDP-wrapped networks too). A record that the network's
    definition contradicts is refused; a checkpoint without a record loads with a warning.
    """
    path = os.fspath(path)
    checkpoint = read_checkpoint(path)
    record = record_of(checkpoint)
    check_record(record, network=network, expected_bundle=expected_bundle, source=path)
    _load_state(network, network_state(checkpoint, path), path, strict)
    return record


def build_from_checkpoint(
    path: str | os.PathLike,
    expected_bundle: str | None = None,
    network_def: Mapping | torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict | None]:
    """``(network in eval mode on device, record)`` from a checkpoint alone (its record says how to build it).

    ``network_def`` (a config ``network_def`` dict or an already built network) is the fallback for
    checkpoints without a record (with a warning); given together with a record, it must agree with it.
    """
    path = os.fspath(path)
    checkpoint = read_checkpoint(path)
    record = record_of(checkpoint)
    if isinstance(network_def, torch.nn.Module):
        check_record(record, network=network_def, expected_bundle=expected_bundle, source=path)
        network = network_def
    elif record is not None and "network_def" in record:
        check_record(record, network_def=network_def, expected_bundle=expected_bundle, source=path)
        network = instantiate_network(record["network_def"], path)
    elif network_def is not None:
        check_record(record, network_def=network_def, expected_bundle=expected_bundle, source=path)
        network = instantiate_network(plain(dict(network_def)), path)  # the config's: tuples become lists
    else:
        raise InputError(
            path, "checkpoint has no record of its network: give the bundle's network_def to build it"
        )
    _load_state(network, network_state(checkpoint, path), path)
    return network.to(device).eval(), record

