"""The bundle contract's renamed config ids: old names keep working for one release, with a warning.

Every bundle uses the same config id for the same thing (docs/ARCHITECTURE.md, "The bundle contract"). Ids that
had other names before 0.4.0 are listed in ``RENAMED``. Two ways keep the old names working:

* on ``python -m monai.bundle run`` command lines (``--checkpoint x``, ``--lr 1e-3``): the configs keep the old id
  as a ``null`` alias and read it where the value is used, through ``renamed(@old, 'old', 'new', @new)``;
* in override dicts of our Python callers (``apply_deprecated_ids(bundle, overrides)``), which also renames
  paths under an old id (vqgan's list ``base_transforms#0`` -> ``preprocessing#transforms#0``) and the ids
  the configs do not alias (latent_ddpm's ``dataset_check``, a list of checks nobody sets on a command line).

Checkpoints and records written before still load: records store the training arguments under their own
names (``record["training"]``), never read back as config ids.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["RENAMED", "DeprecatedConfigId", "apply_deprecated_ids", "renamed", "deprecated_aliases"]

_log = logging.getLogger(__name__)

# bundle -> {old id: new id (or the path that now holds its value)}; ALIASED says which the configs keep as nulls
RENAMED: dict[str, dict[str, str]] = {
    "latent_ddpm": {"dataset_check": "datalist_check", "evaluate": "validate"},
    "pe_classifier": {"test": "validate"},
    "pix2pix_phase": {"checkpoint": "ckpt_path", "lr": "learning_rate"},
    "progressive_cascade": {"checkpoint": "ckpt_path", "evaluate": "validate"},
    "vqgan_3d_patch": {
        "checkpoint": "ckpt_path",
        "lr_g": "learning_rate",
        "lr_d": "learning_rate_d",
        "base_transforms": "preprocessing#transforms",
    },
}

# old ids kept in the configs as ``null`` aliases (value ids a command line sets); config file -> bundle -> ids
ALIASED: dict[str, dict[str, tuple[str, ...]]] = {
    "train.json": {"pix2pix_phase": ("lr",), "vqgan_3d_patch": ("lr_g", "lr_d")},
    "evaluate.json": {"pix2pix_phase": ("checkpoint",), "progressive_cascade": ("checkpoint",),
                      "vqgan_3d_patch": ("checkpoint",)},  # fmt: skip
}

_warned: set[tuple[str, str]] = set()


class DeprecatedConfigId(DeprecationWarning):
    """A renamed config id was given under its old name."""


def _warn(old_id: str, new_id: str, stacklevel: int = 3) -> None:
    message = f"config id {old_id!r} is deprecated and will be removed in the next release: use {new_id!r}"
    warnings.warn(message, DeprecatedConfigId, stacklevel=stacklevel)
    if (old_id, new_id) not in _warned:  # DeprecationWarning is hidden outside __main__: log it once as well
        _warned.add((old_id, new_id))
        _log.warning(message)


def renamed(old_value: Any, old_id: str, new_id: str, value: Any) -> Any:
    """``value`` (the new id's), or ``old_value`` with a warning naming ``new_id`` when the old id was set.

    Used in config expressions where the value is consumed, e.g. an optimizer's
    ``"lr": "$common.contract.renamed(@lr, 'lr', 'learning_rate', @learning_rate)"``, so that an overlay setting
    the new id and a command line setting the old one both take effect (the old one wins: it was asked for).
    """
    if old_value is None:
        return value
    _warn(old_id, new_id)
    return old_value


def deprecated_aliases(bundle: str, config_name: str) -> tuple[str, ...]:
    """The old ids ``config_name`` (e.g. "train.json") of ``bundle`` keeps as null aliases."""
    return ALIASED.get(config_name, {}).get(bundle, ())


def apply_deprecated_ids(bundle: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` with old ids (and section paths under them, ``old#x``) renamed to the new ids, warning once each.

    For Python callers that pass override dicts to ``monai.bundle run``; a key given under both names keeps the
    new one's value.
    """
    table = RENAMED.get(bundle, {})
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        old = next((o for o in sorted(table, key=len, reverse=True) if key == o or key.startswith(o + "#")), None)
        if old is None:
            out.setdefault(key, value)
            continue
        new = table[old]
        _warn(old, new.partition("#")[0] if new.endswith("#transforms") else new)
        new_key = new + key[len(old) :]
        if new_key not in overrides:
            out[new_key] = value
    return out
