"""The one way checkpoints are written and read: self-describing records, guarded saving, one loader.

A checkpoint is ``{"model": state_dict, "record": {"json": ...}, ...}`` (plus optimiser/trainer states for
resuming). The **record** says what a loader needs to rebuild the network and its inputs without the
training config::

    {"format": "xray2ct.checkpoint_record/1", "bundle": "perx2ct", "version": "0.2.0",
     "network_def": {"_target_": "bundles.perx2ct.scripts.networks.PerX2CTNet", "volume_size": 128, ...},
     "inputs": {"hu_window": {...}, "spacing": [...], "geometry": {...}, ...},     # bundle-specific
     "datalist": {"file": ".../dataset.json", "sha256": "..."}, "training": {...},
     "progress": {"epoch": 12, "iteration": 480, "key_metric": {"name", "value", "sign"}}}

``network_def`` is recorded by :func:`build_network`, the ``_target_`` every bundle config's
``network_def`` uses (``"target"`` names the class, the other keys are its arguments, so overlays such as
``network_def#channels`` keep working). :func:`build_from_checkpoint` rebuilds the network from the record
alone; :func:`load_weights` and :class:`CheckpointLoader` load weights into a network built from a config
and refuse a config that contradicts the record; checkpoints without a record load through the config with
a warning.

A checkpoint is hostile input (issue 23): :func:`read_checkpoint`, which every loader calls, checks the zip before
``torch.load`` (:func:`check_torch_file`: no compressed entries, sizes within the file and a limit) and the record
before anything is built: its network must be one of :data:`NETWORKS` (checked on the string, so a record never
imports a module or calls anything else) with plain JSON arguments, and no record value may carry MONAI config
syntax. The zoo form is a bare state dict ``X.pt`` with ``X.record.json`` bound to it by ``weights_sha256``
(:func:`export_bare`).

:class:`CheckpointSaver` is MONAI's saver with three guarantees (issue 14, training hardening): files are
written atomically; the final checkpoint is written only when training completes (MONAI also writes it when
an exception stops training, e.g. a failed resume, overwriting a trained file with untrained weights); and a
comparable file (same bundle, network and datalist) is never replaced by a worse one: a best-metric file
only by a better score, a final file only by one trained for at least as many iterations (the new final is
then written beside it as ``<name>.iteration=<n>.pt``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader as MonaiCheckpointLoader
from monai.handlers import CheckpointSaver as MonaiCheckpointSaver

from common.atomic import atomic_write_text
from common.errors import InputError, require_file
from common.json_values import plain  # noqa: F401  (the one JSON-plain helper; re-exported)

RECORD_FORMAT = "xray2ct.checkpoint_record/1"
RECORD_KEY = "record"
MODEL_KEY = "model"
RECORD_FILE = "checkpoint_record.json"
ARGS_FILE = "network_args.json"

logger = logging.getLogger(__name__)

# network -> its network_def ({"_target_": ..., **arguments}); kept beside the module, not on it, so
# TorchScript export, DDP wrapping and state dicts never see it
_DESCRIPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------- networks
def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside DistributedDataParallel / DataParallel wrappers (the one DDP unwrap)."""
    while isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    return network


# The network classes (and factories) a checkpoint's record may name: one qualified name per line, checked on
# the string before anything is imported (issue 23, item 1). A record is data from whoever sent the file; it
# never chooses a module to import or a callable to run beyond these. A new network class is one line here
# (tests/test_checkpoint_security.py fails for a bundle config whose network_def names a class not listed).
NETWORKS: frozenset[str] = frozenset({
    "bundles.latent_ddpm.scripts.networks.XrayConditionedUNet",
    "bundles.pe_classifier.scripts.networks.build_pe_classifier",
    "bundles.perx2ct.scripts.networks.PerX2CTNet",
    "bundles.pix2pix_phase.scripts.networks.PhaseGenerator",
    "bundles.progressive_cascade.scripts.networks.ProgressiveCascade",
    "bundles.vqgan_3d_patch.scripts.networks.ReconstructionVQVAE",
    "monai.networks.nets.vqvae.VQVAE",
})  # fmt: skip
_EXTRA_NETWORKS: set[str] = set()  # allow_network(): classes registered by code (tests, plug-ins), never by data


def allow_network(target: str) -> None:
    """Put ``<module>.<class>`` on the allow-list; for code (a test's or a plug-in's network), never for data."""
    if not isinstance(target, str) or "." not in target:
        raise ValueError(f"allow_network needs '<module>.<class>', got {target!r}")
    _EXTRA_NETWORKS.add(target)


def allowed_network(target: object, source: str | os.PathLike | None = None) -> str:
    """The allow-listed qualified name ``target`` stands for (a qualified name, or a MONAI class's short name
    such as ``VQVAE``), decided on the string alone; anything else is :class:`InputError` naming ``source``."""
    allowed = NETWORKS | _EXTRA_NETWORKS
    if isinstance(target, str) and target in allowed:
        return target
    if isinstance(target, str) and target and "." not in target:
        matches = sorted(n for n in allowed if n.startswith("monai.") and n.rsplit(".", 1)[1] == target)
        if len(matches) == 1:
            return matches[0]
    raise InputError(
        None if source is None else os.fspath(source),
        f"refusing network {str(target)[:200]!r}: not one of xray2ct's network classes "
        "(common.checkpoint.NETWORKS); a checkpoint never names code to run",
    )


def check_arguments(arguments: Mapping, target: str, source: str | os.PathLike | None = None) -> None:
    """Refuse network arguments that are not plain JSON (numbers, strings, bools, None, lists, nested dicts of
    them with string keys), so a record cannot hand a network an object; :class:`InputError` names the file."""

    def bad(value, where: str) -> str | None:
        if value is None or isinstance(value, (bool, int, str)):
            return None
        if isinstance(value, float):
            return None
        if isinstance(value, list):
            return next((b for i, v in enumerate(value) if (b := bad(v, f"{where}[{i}]"))), None)
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    return f"{where} has a non-string key {k!r}"
                if b := bad(v, f"{where}.{k}"):
                    return b
            return None
        return f"{where} is a {type(value).__name__}"

    for key, value in arguments.items():
        problem = f"argument {key!r} is not a string" if not isinstance(key, str) else bad(value, key)
        if problem:
            raise InputError(
                None if source is None else os.fspath(source),
                f"refusing network {target!r}: {problem}, not a plain JSON value",
            )


def _locate(target: str, source: str | os.PathLike | None = None):
    """The allow-listed class (or factory) ``target`` names: the string is checked first, then only its own
    module (one of ours or MONAI's) is imported."""
    import importlib

    qualified = allowed_network(target, source)
    module_name, _, name = qualified.rpartition(".")
    component = getattr(importlib.import_module(module_name), name, None)
    if component is None or _qualified_name(component) != qualified:
        raise InputError(None if source is None else os.fspath(source), f"cannot locate the network {target!r}")
    return component


def _qualified_name(component) -> str:
    return f"{component.__module__}.{component.__qualname__}"


_BUILD_NETWORK = "common.checkpoint.build_network"


def build_network(target: str, **arguments: Any) -> torch.nn.Module:
    """Instantiate ``target(**arguments)`` and remember its definition for the checkpoint record.

    The ``_target_`` of every bundle's ``network_def``::

        "network_def": {"_target_": "common.checkpoint.build_network",
                        "target": "bundles.perx2ct.scripts.networks.PerX2CTNet", "volume_size": 128, ...}

    ``target`` is a class path or a MONAI short name (``VQVAE``). Arguments must be JSON values (or DRR
    geometries, HU windows, tuples, which are converted); the recorded definition is
    ``{"_target_": "<module>.<class>", **arguments}``.
    """
    component = _locate(target)
    description = {"_target_": _qualified_name(component), **plain(arguments)}
    network = component(**arguments)
    _DESCRIPTIONS[network] = description
    return network


def network_description(network: torch.nn.Module) -> dict | None:
    """The ``network_def`` recorded when ``network`` was built by :func:`build_network` (None otherwise)."""
    return _DESCRIPTIONS.get(unwrap(network))


def _definition(network_def: Mapping, source: str | os.PathLike | None = None) -> tuple[str, dict]:
    """``(allow-listed qualified class name, arguments)`` of a ``network_def``, unwrapping :func:`build_network`;
    refused (:class:`InputError` naming ``source``) before anything is imported or called."""
    if not isinstance(network_def, Mapping):
        raise InputError(source, f"network definition is a {type(network_def).__name__}, not a dict")
    definition = dict(network_def)
    target = definition.pop("_target_", None)
    if target in (_BUILD_NETWORK, "build_network"):
        target = definition.pop("target", None)
    if not target:
        raise InputError(source, f"network definition without a '_target_': {sorted(map(str, definition))}")
    target = allowed_network(target, source)
    check_arguments(definition, target, source)
    return target, definition


def instantiate_network(network_def: Mapping, source: str | os.PathLike | None = None) -> torch.nn.Module:
    """A network from a recorded or config ``network_def`` (``{"_target_": ..., **arguments}``).

    Only allow-listed classes (:data:`NETWORKS`) with plain JSON arguments: a record is untrusted data, so
    anything else is refused with one :class:`InputError` naming ``source`` (the checkpoint) and the target.
    """
    target, arguments = _definition(network_def, source)
    return build_network(target, **arguments)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def network_differences(
    recorded: Mapping, configured: Mapping, ignore: Sequence[str] = (), source: str | os.PathLike | None = None
) -> list[str]:
    """Human-readable differences between two network definitions (empty when they build the same network).

    Classes agree when one is a subclass of the other (e.g. MONAI ``VQVAE`` and the vqgan bundle's
    ``ReconstructionVQVAE``, same parameters), factory functions when they are the same; an argument present
    on one side only is compared with its default. Arguments in ``ignore`` (run-time settings such as a
    decoder's chunk size, which change neither the weights nor the output) are not compared. Both targets
    must be allow-listed (:func:`allowed_network`, checked before any import; ``source`` names the file).
    """
    classes, definitions = [], []
    for d in (recorded, plain(dict(configured))):  # the config's side is code: its tuples become lists
        target, arguments = _definition(d, source)
        classes.append(_locate(target, source))
        definitions.append({k: v for k, v in plain(arguments).items() if k not in ignore})
    recorded, configured = definitions
    a_cls, b_cls = classes
    out = []
    if isinstance(a_cls, type) and isinstance(b_cls, type):
        related = issubclass(a_cls, b_cls) or issubclass(b_cls, a_cls)
    else:  # factory functions (e.g. pe_classifier's build_pe_classifier) must be the same function
        related = a_cls is b_cls
    if not related:
        out.append(f"network class {_qualified_name(a_cls)} (checkpoint) vs {_qualified_name(b_cls)} (config)")
    params = inspect.signature(a_cls).parameters
    for key in sorted(set(recorded) | set(configured)):
        default = params[key].default if key in params else inspect.Parameter.empty
        a = recorded.get(key, plain(default) if default is not inspect.Parameter.empty else "<unset>")
        b = configured.get(key, plain(default) if default is not inspect.Parameter.empty else "<unset>")
        if not _same(a, b):
            out.append(f"{key}={json.dumps(a)} (checkpoint) vs {json.dumps(b)} (config)")
    return out


# ----------------------------------------------------------------------------------------------- records
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
            from common.intensity import get_window

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
    weights by ``weights_sha256``. Both files are written atomically; returns ``(weights, record)`` paths."""
    from common.atomic import atomic_path

    src, dst = os.fspath(src), os.fspath(dst)
    checkpoint = read_checkpoint(src)
    record = record_of(checkpoint, src)
    if record is None:
        raise InputError(src, "checkpoint has no record to export beside its weights")
    sidecar = sidecar_path(dst)
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
) -> None:
    """Refuse (:class:`InputError`) a checkpoint of another bundle or one whose network the config contradicts.

    ``network`` (built by :func:`build_network`) or ``network_def`` is what the config builds. A checkpoint
    without a record passes with a warning: it can only be checked by loading its weights.
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
            + ". Set these network_def values (or build from the checkpoint: common.checkpoint.build_from_checkpoint)",
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


def _same_input(key: str, recorded, configured) -> bool:
    if key == "hu_window":
        from common.intensity import get_window

        return get_window(recorded).as_dict() == get_window(configured).as_dict()
    return _same(plain(recorded), plain(configured))


def read_config(config_files: Sequence[str | os.PathLike], overrides: Mapping | None = None):
    """A MONAI ``ConfigParser`` of ``config_files`` (later files override earlier ones) with ``overrides`` set."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([require_file(os.fspath(f)) for f in config_files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def configured_network_def(parser, network_id: str = "network_def") -> dict:
    """The config's network definition with every reference resolved, nothing instantiated."""
    component = parser.get_parsed_content(network_id, instantiate=False)
    config = component.get_config() if hasattr(component, "get_config") else component
    return plain(dict(config))


def build_for_inference(
    path: str | os.PathLike,
    config_files: Sequence[str | os.PathLike] | None = None,
    default_config_files: Sequence[str | os.PathLike] | None = None,
    expected_bundle: str | None = None,
    data_arguments: Sequence[str] = (),
    runtime_arguments: Sequence[str] = (),
    input_ids: Sequence[str] = (),
    overrides: Mapping | None = None,
    device: str | torch.device = "cpu",
    network_id: str = "network_def",
    checkpoint: Mapping | None = None,
    settings: Mapping | None = None,
    build_arguments: Mapping | None = None,
):
    """``(network in eval mode, record, parser)``: a trained network built from its checkpoint, for every loader.

    The one entry point of the inference loaders (web app, Python APIs, inference server, batch synthesis,
    pipeline). With a record, the network is built from it alone; the config (``config_files``, else
    ``default_config_files``; ``parser`` carries its other settings) only matters where the user spoke:
    when ``config_files`` or ``overrides`` are given, their network definition must agree with the record
    (else :class:`InputError` naming every differing argument), and so must the config ids ``input_ids``
    (e.g. ``hu_window``) with the record's ``inputs``. Network arguments the config derives from a dataset
    (``data_arguments``, e.g. ``spacing``, ``geometry``) are taken from the record before comparing;
    ``runtime_arguments`` (e.g. ``chunk_size``) are not compared and the config's value is used.
    A checkpoint without a record is built from the config with a warning (nothing can check it).
    ``checkpoint``: the file's contents when the caller already read them (:func:`read_checkpoint`);
    ``settings``: config ids set on the parser that say nothing about the network (``bundle_root``...);
    ``build_arguments``: network arguments replaced before building and never compared (e.g. a pretrained
    weights file, irrelevant once the checkpoint's weights are loaded).
    """
    path = os.fspath(path)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    record = record_of(checkpoint)
    spoken = config_files is not None or bool(overrides)
    files = config_files if config_files is not None else default_config_files
    parser = read_config(files, {**(settings or {}), **(overrides or {})}) if files else None
    if parser is not None and network_id not in parser:
        sources = ", ".join(os.fspath(f) for f in files)
        raise InputError(sources, f"config defines no {network_id!r} (give the bundle's inference.json first)")
    recorded = (record or {}).get("network_def")
    if record is not None and expected_bundle is not None and record.get("bundle") != expected_bundle:
        raise InputError(path, f"is a {record.get('bundle')!r} checkpoint, not {expected_bundle!r}")
    if recorded is None:
        check_record(record, expected_bundle=expected_bundle, source=path)  # warns
        if parser is None:
            raise InputError(path, "checkpoint has no record of its network: give the bundle's config")
        for key, value in (build_arguments or {}).items():
            if f"{network_id}#{key}" in parser:
                parser[f"{network_id}#{key}"] = value
        network = parser.get_parsed_content(network_id, instantiate=True)
    else:
        definition = dict(recorded)
        if spoken and parser is not None:
            for argument in data_arguments:
                if argument in recorded:
                    parser[f"{network_id}#{argument}"] = recorded[argument]
            configured = configured_network_def(parser, network_id)
            ignore = (*runtime_arguments, *(build_arguments or {}))
            try:
                check_record(record, network_def=configured, source=path, ignore=ignore)
            except InputError as exc:  # the user of a loader gave a config: say how to do without one
                problem = exc.problem.split(". Set these network_def values")[0]
                raise InputError(path, f"{problem}. Fix the config, or give none: the record alone builds the network") from None
            differing = []
            for key in input_ids:
                if key not in parser or key not in record.get("inputs", {}):
                    continue
                recorded_value, configured_value = record["inputs"][key], parser.get_parsed_content(key)
                if not _same_input(key, recorded_value, configured_value):
                    differing.append(
                        f"{key}={json.dumps(plain(recorded_value))} (checkpoint) vs "
                        f"{json.dumps(plain(configured_value))} (config)"
                    )
            if differing:
                raise InputError(path, "the config contradicts the checkpoint's record: " + "; ".join(differing))
            definition.update({k: configured[k] for k in runtime_arguments if k in configured})
        definition.update({k: v for k, v in (build_arguments or {}).items() if k in definition})
        network = instantiate_network(definition, path)
    _load_state(network, network_state(checkpoint, path), path)
    return network.to(device).eval(), record, parser


# ----------------------------------------------------------------------------------------------- handlers
class CheckpointLoader(MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` (resume, evaluation) that names an unreadable file and checks the record.

    Every network in ``load_dict`` built by :func:`build_network` is checked against the checkpoint's record
    before anything is loaded, so a config that contradicts the checkpoint stops with one clear message.
    """

    def __init__(self, load_path: str, load_dict: dict, expected_bundle: str | None = None, **kwargs: Any):
        super().__init__(load_path, load_dict, **kwargs)
        self.expected_bundle = expected_bundle

    def __call__(self, engine) -> None:
        path = os.fspath(self.load_path)
        checkpoint = read_checkpoint(path)
        record = record_of(checkpoint)
        for obj in self.load_dict.values():
            if isinstance(obj, torch.nn.Module):
                check_record(record, network=obj, expected_bundle=self.expected_bundle, source=path)
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=self.strict)
        except (RuntimeError, ValueError, KeyError) as e:
            raise InputError(path, f"checkpoint does not fit what it is loaded into ({e})") from None
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise InputError(
                path,
                f"was saved at epoch {engine.state.epoch}, beyond max_epochs {prior_max_epochs}: "
                "raise max_epochs to train further",
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored all variables from {path}")


class _AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver, atomic, with MONAI's optional fixed file name (its replacement is atomic, so
    the old file is not removed first)."""

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class _ProgressRecord:
    """A :class:`CheckpointRecord` as one saver writes it: with the training progress at the time of saving."""

    def __init__(self, record: CheckpointRecord, saver: CheckpointSaver):
        self.record, self.saver = record, saver

    def state_dict(self) -> dict:
        return {"json": json.dumps({**self.record.data, "progress": self.saver.progress()}, sort_keys=True)}

    def load_state_dict(self, state: Mapping) -> None:
        self.record.load_state_dict(state)


class CheckpointSaver(MonaiCheckpointSaver):
    """MONAI's ``CheckpointSaver`` that never leaves a half-written file or replaces a better one (see module doc).

    Same arguments as MONAI's; a :class:`CheckpointRecord` in ``save_dict`` is written with the progress
    (epoch, iteration, key metric) that the guards compare.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any):
        self._engine = None
        self._record: CheckpointRecord | None = None
        wrapped = {}
        for key, obj in save_dict.items():
            if isinstance(obj, CheckpointRecord):
                self._record = obj
                obj = _ProgressRecord(obj, self)
            wrapped[key] = obj
        super().__init__(save_dir, wrapped, **kwargs)
        self._key_metric_name = kwargs.get("key_metric_name")
        self._key_metric_sign = -1.0 if kwargs.get("key_metric_negative_sign") else 1.0
        self._key_metric_filename = kwargs.get("key_metric_filename")
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, fixed)

    # -- what the record says about this save
    def _metric_name(self) -> str | None:
        if self._key_metric_name:
            return self._key_metric_name
        return getattr(getattr(self._engine, "state", None), "key_metric_name", None)

    def progress(self) -> dict:
        from monai.engines import Trainer

        state = self._engine.state if self._engine is not None else None
        if state is None:
            return {}
        out: dict = {"epoch": int(state.epoch)}
        if isinstance(self._engine, Trainer):
            out["iteration"] = int(state.iteration)
        name = self._metric_name() if self._key_metric_checkpoint is not None else None
        if name is not None and name in (state.metrics or {}):
            value = state.metrics[name]
            out["key_metric"] = {"name": name, "value": float(value), "sign": self._key_metric_sign}
        return out

    # -- ignite events
    def attach(self, engine) -> None:
        self._engine = engine
        super().attach(engine)
        self._seed_best_from_disk()

    def _existing_record(self, filename: str) -> dict | None:
        path = os.path.join(self.save_dir, filename)
        if not os.path.isfile(path):
            return None
        try:
            return read_record(path)
        except InputError:
            return None

    def _seed_best_from_disk(self) -> None:
        """A comparable best-metric file already on disk (an earlier run, or the run being resumed) sets the
        score to beat, so a worse validation never replaces it."""
        if self._key_metric_checkpoint is None or not self._key_metric_filename or self._record is None:
            return
        existing = self._existing_record(self._key_metric_filename)
        metric = ((existing or {}).get("progress") or {}).get("key_metric")
        if not metric or not comparable(existing, self._record.data) or metric["name"] != self._metric_name():
            return
        if metric.get("sign", 1.0) != self._key_metric_sign or metric.get("value") is None:
            return
        priority = self._key_metric_sign * float(metric["value"])
        self._key_metric_checkpoint._saved = [Checkpoint.Item(priority, self._key_metric_filename)]
        self.logger.info(
            f"{os.path.join(self.save_dir, self._key_metric_filename)} holds {metric['name']}={metric['value']:.4g}"
            " of a comparable run: only a better score replaces it"
        )

    def completed(self, engine) -> None:
        """Training completed: write the final checkpoint, beside a comparable final trained for longer."""
        name = self._final_filename
        existing = self._existing_record(name) if name else None
        done = ((existing or {}).get("progress") or {}).get("iteration")
        here = int(engine.state.iteration)
        if (
            name
            and self._record is not None
            and done is not None
            and done > here
            and comparable(existing, self._record.data)
        ):
            stem, ext = os.path.splitext(name)
            alternative = f"{stem}.iteration={here}{ext}"
            self.logger.warning(
                f"{os.path.join(self.save_dir, name)} was trained for {done} iterations, this run for {here}: "
                f"kept; this run's final checkpoint is {alternative}"
            )
            handler = self._final_checkpoint.save_handler
            handler.filename, self._final_filename = alternative, alternative
            try:
                super().completed(engine)
            finally:
                handler.filename, self._final_filename = name, name
            return
        super().completed(engine)

    def exception_raised(self, engine, e: Exception) -> None:
        """An exception stopped training: write nothing (the files on disk are better than this state)."""
        self.logger.error(f"training stopped by {type(e).__name__}: no final checkpoint written")
        raise e
