"""The allow-list of network classes a checkpoint may name, and the one network builder (:func:`build_network`).

Part of :mod:`common.checkpoint` (import from there). A record is data from whoever sent the file: its
``network_def`` is checked on the string against :data:`NETWORKS` before any module is imported (issue 23).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from common.drr import same_camera
from common.errors import InputError
from common.json_values import plain  # noqa: F401  (the one JSON-plain helper; re-exported)

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
        if key == "geometry" and same_camera(a, b):
            continue  # one DRR camera: its pixel count follows the network's input size (older records: the DRRs')
        if not _same(a, b):
            out.append(f"{key}={json.dumps(a)} (checkpoint) vs {json.dumps(b)} (config)")
    return out


