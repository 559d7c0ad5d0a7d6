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

from common.checkpoint_handlers import CheckpointLoader, CheckpointSaver
from common.checkpoint_inference import (
    LEGACY_PREDICTION_TYPE,
    InferenceSettings,
    build_for_inference,
    configured_network_def,
    read_config,
    resolve_settings,
)
from common.checkpoint_records import (
    ARGS_FILE,
    BASELINE_SUFFIX,
    DEFAULT_MAX_CHECKPOINT_BYTES,
    MAX_CHECKPOINT_BYTES_ENV,
    MAX_SIDECAR_BYTES,
    MODEL_KEY,
    RECORD_FILE,
    RECORD_FORMAT,
    RECORD_KEY,
    SIDECAR_SUFFIX,
    CheckpointRecord,
    baseline_path,
    build_from_checkpoint,
    check_record,
    check_torch_file,
    comparable,
    export_bare,
    file_sha256,
    load_weights,
    max_checkpoint_bytes,
    network_state,
    read_bundle_version,
    read_checkpoint,
    read_record,
    record_of,
    sidecar_path,
)
from common.checkpoint_registry import (  # noqa: F401  (_locate, _qualified_name: for the security tests)
    NETWORKS,
    _locate,
    _qualified_name,
    allow_network,
    allowed_network,
    build_network,
    check_arguments,
    instantiate_network,
    network_description,
    network_differences,
    plain,
    unwrap,
)

__all__ = [
    "ARGS_FILE", "BASELINE_SUFFIX", "DEFAULT_MAX_CHECKPOINT_BYTES", "MAX_CHECKPOINT_BYTES_ENV", "MAX_SIDECAR_BYTES", "MODEL_KEY",
    "NETWORKS", "RECORD_FILE", "RECORD_FORMAT", "RECORD_KEY", "SIDECAR_SUFFIX", "CheckpointLoader",
    "CheckpointRecord", "CheckpointSaver", "InferenceSettings", "LEGACY_PREDICTION_TYPE", "resolve_settings", "allow_network", "allowed_network",
    "baseline_path", "build_for_inference", "build_from_checkpoint", "build_network", "check_arguments", "check_record",
    "check_torch_file", "comparable", "configured_network_def", "export_bare", "file_sha256",
    "instantiate_network", "load_weights", "max_checkpoint_bytes", "network_description", "network_differences",
    "network_state", "plain", "read_bundle_version", "read_checkpoint", "read_config", "read_record", "record_of",
    "sidecar_path", "unwrap",
]  # fmt: skip
