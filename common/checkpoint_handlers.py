"""The ignite handlers that write and read checkpoints: :class:`CheckpointSaver`, :class:`CheckpointLoader`.

Part of :mod:`common.checkpoint` (import from there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader as MonaiCheckpointLoader
from monai.handlers import CheckpointSaver as MonaiCheckpointSaver

from common.baselines import BASELINE_KEY, MEAN_CT_BUNDLES, mean_ct_state
from common.checkpoint_records import (
    CheckpointRecord,
    check_record,
    comparable,
    read_checkpoint,
    read_record,
    record_of,
)
from common.errors import InputError


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


class _MeanCTBaseline:
    """The mean training CT of the record's datalist as a checkpoint entry (``common.baselines.BASELINE_KEY``),
    computed once per run at the first save: loaders read the baseline from the checkpoint instead of loading
    every training CT again (:func:`common.baselines.mean_ct_baseline`)."""

    def __init__(self, record: CheckpointRecord):
        self.record, self._state = record, None

    def state_dict(self) -> dict:
        if self._state is None:
            self._state = mean_ct_state(self.record.data)
        return self._state

    def load_state_dict(self, state: Mapping) -> None:
        self._state = dict(state)


class CheckpointSaver(MonaiCheckpointSaver):
    """MONAI's ``CheckpointSaver`` that never leaves a half-written file or replaces a better one (see module doc).

    Same arguments as MONAI's; a :class:`CheckpointRecord` in ``save_dict`` is written with the progress
    (epoch, iteration, key metric) that the guards compare. Checkpoints of the X-ray -> CT bundles
    (``common.baselines.MEAN_CT_BUNDLES``) also carry the mean training CT (entry ``baseline``).
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
        bundle = (self._record._data if self._record is not None else {}).get("bundle")
        if bundle in MEAN_CT_BUNDLES and BASELINE_KEY not in wrapped:  # the X-ray -> CT baseline travels along
            wrapped[BASELINE_KEY] = _MeanCTBaseline(self._record)
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

