"""One driver that trains and evaluates a bundle through its own configs, as a user runs them.

``monai.bundle run training`` with ``train.json`` + an overlay (``cpu_small.json``, ``cpu_64.json``), once
per training run (the cascade trains one run per stage), then ``monai.bundle run evaluating`` with
``train.json`` + ``evaluate.json`` + the overlay on one split; the figures are the bundle's own
``metrics_report.json``. ``bin/demo.py`` (subprocesses, one lane per core) and ``benchmarks/learning.py``
(in this process) both drive the bundles through :func:`train_and_evaluate`.

The config ids the driver sets are named once, in :data:`IDS`: when a bundle id is renamed, the table changes
and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"

# the bundle config ids the driver sets (driver name -> the id in the bundles' train.json / evaluate.json)
IDS: dict[str, str] = {
    "dataset_dir": "dataset_dir",
    "bundle_root": "bundle_root",
    "output_dir": "output_dir",
    "split": "eval_split",
    "stage": "stage",
    "vqgan_checkpoint": "vqgan_checkpoint",  # latent_ddpm: the VQ-GAN it encodes and decodes with
    "modality": "modality",  # pe_classifier: "ct" or "xray"
    "source": "source",  # pe_classifier: what the report says the inputs were
    "xray_report": "xray_report",  # pe_classifier: the X-ray-only report compared with on the same cases
}
# where training leaves the checkpoint that evaluation and the next bundle read (relative to bundle_root)
CHECKPOINTS: dict[str, str] = {"progressive_cascade": "models/stage3_model.pt"}
DEFAULT_CHECKPOINT = "models/model.pt"
REPORT = "metrics_report.json"

# run(run_id, config files, overrides) -> {"wall_s", "cpu_s"}
Runner = Callable[[str, list[str], dict], dict]


def config_files(bundle: str, *names: str) -> list[str]:
    """Absolute paths of ``bundles/<bundle>/configs/<name>`` (later files override earlier ones)."""
    return [str(BUNDLES / bundle / "configs" / n) for n in names]


def checkpoint_path(bundle: str, work_dir: str | os.PathLike) -> Path:
    """The trained checkpoint under ``work_dir`` (the bundle_root of :func:`train`): the final stage's."""
    return Path(work_dir) / CHECKPOINTS.get(bundle, DEFAULT_CHECKPOINT)


def ids(**values) -> dict:
    """``{bundle config id: value}`` for values given by driver name (:data:`IDS`); paths become strings."""
    return {IDS[k]: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in values.items()}


def bundle_overrides(dataset_dir: str | os.PathLike, work_dir: str | os.PathLike, **more) -> dict:
    """The overrides that place a run: data from ``dataset_dir``, checkpoints under ``work_dir``, the
    evaluation's report and previews under ``work_dir/eval``; ``more``: other driver names of :data:`IDS`."""
    return ids(dataset_dir=dataset_dir, bundle_root=work_dir, output_dir=Path(work_dir) / "eval", **more)


def in_process(run_id: str, files: list[str], overrides: dict) -> dict:
    """``monai.bundle run`` in this process (the caller sets the threads); wall and process CPU seconds."""
    from monai.bundle import run

    t, c = time.time(), time.process_time()
    run(run_id, config_file=files, **overrides)
    return {"wall_s": time.time() - t, "cpu_s": time.process_time() - c}


class Subprocess:
    """``monai.bundle run`` in a child process with ``threads`` threads, its output appended to ``log``.

    A child per run isolates the runs (two lanes side by side on two cores each get their threads); its CPU
    seconds come from the child's own resource usage."""

    def __init__(self, log: str | os.PathLike, threads: int = 1):
        self.log, self.threads = Path(log), max(1, int(threads))

    def __call__(self, run_id: str, files: list[str], overrides: dict) -> dict:
        args = self.log.with_suffix(f".{run_id}.json")
        args.write_text(json.dumps(overrides))
        cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(files),
               "--args_file", str(args)]  # fmt: skip
        threads = str(self.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
        t = time.time()
        with open(self.log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
            try:
                _, status, usage = os.wait4(child.pid, 0)  # the child's own CPU time
            except BaseException:  # interrupted: the run must not go on alone
                child.kill()
                child.wait()
                raise
            child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"{run_id} failed (exit {child.returncode}); log: {self.log}")
        return {"wall_s": time.time() - t, "cpu_s": usage.ru_utime + usage.ru_stime}


def _runs(stages: Sequence) -> list[dict]:
    """Training runs as override dicts: None -> one plain run, an int -> ``stage``, a dict as given."""
    return [{} if s is None else dict(s) if isinstance(s, Mapping) else {IDS["stage"]: int(s)} for s in stages]


def train(
    bundle: str,
    dataset_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    overlay: str = "cpu_small.json",
    overrides: Mapping | None = None,
    stages: Sequence = (None,),
    runner: Runner = in_process,
) -> dict:
    """Train ``bundle`` on ``dataset_dir``'s training split, checkpoints under ``work_dir/models``.

    ``stages``: one training run each (None: the bundle's default, an int: that ``stage``, a dict: the run's
    own overrides); ``overrides`` go to every run. Returns the summed ``{"wall_s", "cpu_s"}``.
    """
    files = config_files(bundle, "train.json", overlay)
    base = {**bundle_overrides(dataset_dir, work_dir), **(overrides or {})}
    total = {"wall_s": 0.0, "cpu_s": 0.0}
    for run in _runs(stages):
        t = runner("training", files, {**base, **run})
        total = {k: total[k] + t[k] for k in total}
    return total


def evaluate(
    bundle: str,
    dataset_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    overlay: str = "cpu_small.json",
    overrides: Mapping | None = None,
    split: str = "test",
    runner: Runner = in_process,
    require_unseen: bool = True,
) -> dict:
    """Evaluate the checkpoint under ``work_dir`` on ``split``; returns ``{"report", "wall_s", "cpu_s"}``.

    ``report``: the bundle's ``work_dir/eval/metrics_report.json``. ``require_unseen``: a report whose cases
    are training cases (``smoke_test``) raises unless ``split`` is the training split.
    """
    files = config_files(bundle, "train.json", "evaluate.json", overlay)
    over = {**bundle_overrides(dataset_dir, work_dir, split=split), **(overrides or {})}
    times = runner("evaluating", files, over)
    report = json.loads((Path(over[IDS["output_dir"]]) / REPORT).read_text())
    if require_unseen and report.get("smoke_test") and split != "training":
        raise RuntimeError(f"{bundle}: evaluated cases {report.get('training_cases_evaluated')} are training cases")
    return {"report": report, **times}


def train_and_evaluate(
    bundle: str,
    dataset_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    overlay: str = "cpu_small.json",
    overrides: Mapping | None = None,
    stages: Sequence = (None,),
    split: str = "test",
    eval_overrides: Mapping | None = None,
    runner: Runner = in_process,
    require_unseen: bool = True,
) -> dict:
    """:func:`train` then :func:`evaluate` (``overrides`` to both, ``eval_overrides`` to the evaluation only).

    Returns the bundle's metrics report and the timings: ``{"report", "train_wall_s", "train_cpu_s",
    "eval_wall_s", "eval_cpu_s", "wall_s", "cpu_s"}`` (seconds; CPU: all threads). The checkpoint:
    :func:`checkpoint_path`.
    """
    t = train(bundle, dataset_dir, work_dir, overlay, overrides, stages, runner)
    e = evaluate(bundle, dataset_dir, work_dir, overlay, {**(overrides or {}), **(eval_overrides or {})}, split,
                 runner, require_unseen)  # fmt: skip
    return {
        "report": e["report"],
        "train_wall_s": t["wall_s"], "train_cpu_s": t["cpu_s"], "eval_wall_s": e["wall_s"], "eval_cpu_s": e["cpu_s"],
        "wall_s": t["wall_s"] + e["wall_s"], "cpu_s": t["cpu_s"] + e["cpu_s"],
    }  # fmt: skip
