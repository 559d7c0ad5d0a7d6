"""Reconstruction jobs run one at a time by a single worker thread, so concurrent uploads queue instead of
holding several volumes (and network activations) in memory at once. Clients poll a job's status.

A job is first *reserved* (it takes a place in the queue, or the client gets "server busy" before anything
is decoded), then *started* with its decoded views (see :mod:`webapp.app`), or *discarded* when they fail.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import shutil
import threading
import time
import uuid

import numpy as np

from common.errors import InputError
from common.predictor import write_volumes
from common.volume import Volume
from webapp.loaders import LoadedModel
from xray2ct.models import PEModel, baseline_scores, score_against_inputs

logger = logging.getLogger(__name__)

# (stage, progress fraction reached when the stage starts); a model's own progress (the diffusion's steps)
# moves the bar within "reconstructing"
STAGES = {
    "queued": 0.0,
    "preprocessing": 0.05,
    "reconstructing": 0.15,
    "rendering DRRs": 0.8,
    "writing": 0.88,
    "PE classifier": 0.95,
}


class QueueFull(RuntimeError):
    """Too many jobs waiting: the client should try again later."""


@dataclasses.dataclass
class Job:
    id: str
    model: LoadedModel
    folder: str
    pa: str
    lateral: str | None
    state: str = "queued"  # queued | running | done | failed
    stage: str = "queued"
    progress: float = 0.0
    error: str | None = None
    submitted: float = dataclasses.field(default_factory=time.time)
    seconds: float | None = None
    finished: float | None = None  # time.monotonic() when it finished
    volume: Volume | None = None  # the final CT (the last stage)
    views: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # model inputs, [0, 1]
    drrs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # of the final CT
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # "nifti" / "hdf5" -> path
    options: dict = dataclasses.field(default_factory=dict)  # validated run-time options (sampling steps...)
    classifier: PEModel | None = None
    detail: str = ""  # what the model is doing now ("diffusion step 3/20")
    stages: dict[str, Volume] = dataclasses.field(default_factory=dict)  # every stage, final last
    stage_drrs: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    scores: dict[str, dict | None] = dataclasses.field(default_factory=dict)  # stage -> DRR consistency
    baseline: dict | None = None  # the mean training CT's DRR consistency on the same views
    pe: dict | None = None
    checks: dict | None = None  # {"domain_gap", "plausibility"} of the inputs and the final CT (issue 22)
    stage_files: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> NIfTI path


class JobQueue:
    """FIFO of jobs and the one thread that runs them.

    Finished jobs beyond the ``keep`` most recent are forgotten (files deleted) once ``min_keep_s`` seconds
    old, so a busy server does not drop a result before its client has fetched it; ``max_kept`` caps them
    whatever their age (each holds a volume in memory).
    """

    def __init__(self, max_pending: int = 4, keep: int = 8, min_keep_s: float = 60.0, max_kept: int = 32):
        self.max_pending = int(max_pending)
        self.keep, self.min_keep_s, self.max_kept = (
            int(keep),
            float(min_keep_s),
            max(int(keep), int(max_kept)),
        )
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="webapp-worker", daemon=True)
        self._worker.start()

    # -- client side ----------------------------------------------------------------------------
    def new_id(self) -> str:
        return uuid.uuid4().hex[:12]

    def reserve(self, job: Job) -> Job:
        """Take a place in the queue for ``job`` (not run yet); :class:`QueueFull` when none is left."""
        with self._lock:
            waiting = sum(j.state == "queued" for j in self.jobs.values())
            if waiting >= self.max_pending:
                raise QueueFull(f"server busy: {waiting} jobs are waiting; try again in a minute")
            self.jobs[job.id] = job
            self._forget_old()
        return job

    def reserve_all(self, group: list[Job]) -> list[Job]:
        """Reserve a place for every job of ``group`` (a comparison), or none: :class:`QueueFull`."""
        with self._lock:
            waiting = sum(j.state == "queued" for j in self.jobs.values())
            if waiting + len(group) > self.max_pending:
                more = "" if len(group) == 1 else f" and this comparison needs {len(group)} places"
                raise QueueFull(f"server busy: {waiting} jobs are waiting{more}; try again in a minute")
            for job in group:
                self.jobs[job.id] = job
            self._forget_old()
        return list(group)

    def start(self, job: Job, views: np.ndarray | None = None) -> Job:
        """Hand a reserved job to the worker; ``views`` (decoded model inputs) skip its preprocessing."""
        if views is not None:
            job.views = dict(zip(job.model.views, views))
        self._pending.put(job)
        return job

    def discard(self, job: Job) -> None:
        """Give a reserved job's place back (its upload failed)."""
        with self._lock:
            self.jobs.pop(job.id, None)

    def submit(self, job: Job) -> Job:
        """Reserve and start in one step (the job preprocesses its own uploads)."""
        return self.start(self.reserve(job))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def position(self, job: Job) -> int:
        """How many jobs run before this one (0 when it is running or finished)."""
        if job.state != "queued":
            return 0
        with self._lock:
            ahead = [
                j
                for j in self.jobs.values()
                if j.state in ("queued", "running") and j.submitted <= job.submitted
            ]
        return len(ahead) - 1

    def status(self, job: Job) -> dict:
        out = {
            "id": job.id,
            "model": job.model.name,
            "bundle": job.model.bundle,
            "state": job.state,
            "stage": job.stage,
            "detail": job.detail,
            "progress": round(job.progress, 3),
            "queue_position": self.position(job),
            "error": job.error,
            "seconds": job.seconds,
            "options": job.options,
        }
        if job.volume is not None:
            out["shape"] = list(job.volume.shape)
            out["spacing"] = list(job.volume.spacing)
            out["views"] = list(job.views)  # pa first
            out["stages"] = [
                {"name": n, "shape": list(v.shape), "spacing": list(v.spacing), "drr_consistency": job.scores.get(n)}
                for n, v in job.stages.items()
            ]
            out["drr_consistency"] = job.scores.get(next(reversed(job.stages))) if job.stages else None
            out["drr_consistency_baseline"] = job.baseline
            out["pe"] = job.pe
            out.update(job.checks or {})
        return out

    def close(self) -> None:
        self._pending.put(None)
        self._worker.join(timeout=30)

    # -- worker side ----------------------------------------------------------------------------
    def _forget_old(self) -> None:
        finished = sorted(
            (j for j in self.jobs.values() if j.state in ("done", "failed")),
            key=lambda j: j.finished or float("inf"),
        )
        now = time.monotonic()
        for k, job in enumerate(finished[: max(0, len(finished) - self.keep)]):
            over_cap = len(finished) - k > self.max_kept
            if over_cap or now - (job.finished or now) >= self.min_keep_s:  # no stamp yet: just finished
                del self.jobs[job.id]
                shutil.rmtree(job.folder, ignore_errors=True)

    def _stage(self, job: Job, stage: str) -> None:
        job.stage, job.progress, job.detail = stage, STAGES[stage], ""

    @staticmethod
    def _model_progress(job: Job):
        """The model's own progress (fraction, text) as the bar between "reconstructing" and the next stage."""
        start, end = STAGES["reconstructing"], STAGES["rendering DRRs"]

        def report(fraction: float, text: str) -> None:
            job.progress = start + (end - start) * min(max(float(fraction), 0.0), 1.0)
            job.detail = str(text)

        return report

    def _run(self) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            start = time.perf_counter()
            job.state = "running"
            try:
                self._execute(job)
                job.stage, job.progress, job.state = "done", 1.0, "done"
            except InputError as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # a bug or out-of-memory must fail this job only, never the server
                logger.exception("job %s failed", job.id)
                job.state, job.error = "failed", f"reconstruction failed: {type(exc).__name__}: {exc}"
            job.seconds = round(time.perf_counter() - start, 3)
            job.finished = time.monotonic()

    def _execute(self, job: Job) -> None:
        model = job.model
        self._stage(job, "preprocessing")
        if not job.views:
            job.views = dict(zip(model.views, model.preprocess(job.pa, job.lateral)))
        views = np.stack(list(job.views.values()))
        self._stage(job, "reconstructing")
        stages = {
            name: volume.to_canonical()
            for name, volume in model.run(views, job.options, self._model_progress(job)).items()
        }
        self._stage(job, "rendering DRRs")
        last = list(stages)[-1]
        for name, volume in stages.items():
            job.scores[name], drrs = score_against_inputs(model, volume, views)
            if drrs:  # none when the model records no DRR geometry
                job.stage_drrs[name] = drrs
        job.baseline = baseline_scores(model, views)
        self._stage(job, "writing")
        final = stages[last]
        written = write_volumes(stages, job.folder)  # the one writer's names (common.predictor)
        files = {"nifti": written.pop("ct"), "hdf5": write_volumes({last: final}, job.folder, fmt="h5")["ct"]}
        if written:
            job.stage_files = written
        from common.domain_gap import domain_gap
        from common.plausibility import plausibility

        reference = ((model.record or {}).get("inputs") or {}).get("drr_statistics")
        job.checks = {"domain_gap": domain_gap(views, model.views, reference), "plausibility": plausibility(final)}
        if job.classifier is not None:
            self._stage(job, "PE classifier")
            job.pe = job.classifier.assess_volume(final, model.contrast_phase, files["nifti"], views[0], job.folder)
        job.stages, job.volume, job.files = stages, final, files
        job.drrs = job.stage_drrs.get(last, {})
