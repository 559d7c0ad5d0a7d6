"""The FastAPI app: a static page, an upload endpoint that queues a job, status polling, PNG renders and downloads.

Every error, a bad request or a bug, gets a JSON ``{"detail": message}`` the page shows as is; nothing a
client sends can stop the server (reconstructions run on the single worker of :class:`webapp.jobs.JobQueue`).

Memory stays bounded whatever clients send: bodies are limited while they stream and Host / Origin are
checked (:mod:`webapp.security`); an upload is only copied to disk and its header read; a job takes its
place in the queue (or the client hears "busy") *before* its images are decoded, and at most
``decode_workers`` uploads are decoded at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import InputError
from common.xray import MAX_PIXELS
from webapp.jobs import Job, JobQueue, QueueFull
from webapp.loaders import LoadedModel
from webapp.render import WINDOW_PRESETS, slice_count, slice_png, xray_png
from webapp.security import RequestGuard, allowed_hosts_for
from webapp.uploads import MAX_UPLOAD_BYTES, UploadTooLarge, save_upload
from xray2ct.models import PEModel

logger = logging.getLogger(__name__)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DOWNLOADS = {"nifti": ("ct.nii.gz", "application/gzip"), "hdf5": ("ct.h5", "application/x-hdf5")}
PNG = "image/png"


def create_app(
    models: dict[str, LoadedModel],
    workdir: str | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pending: int = 4,
    allowed_hosts: list[str] | None = None,
    decode_workers: int = 1,
    decode_wait_s: float = 120.0,
    max_pixels: int = MAX_PIXELS,
    classifier: PEModel | None = None,
) -> FastAPI:
    """Build the app serving ``models`` (name -> :class:`LoadedModel`); job files live under ``workdir``.

    ``allowed_hosts``: host names the ``Host`` header may carry (default: loopback names, see
    :func:`webapp.security.allowed_hosts_for`). ``decode_workers`` uploads are decoded at a time; a request
    waits up to ``decode_wait_s`` for a turn, then hears "busy". ``max_pixels`` per uploaded image.
    ``classifier``: a PE classifier applied to every generated CT (its probability is shown with the CT).
    """
    if not models:
        raise InputError(None, "no model to serve")
    own_workdir = workdir is None
    workdir = tempfile.mkdtemp(prefix="xray2ct-web-") if workdir is None else workdir
    os.makedirs(workdir, exist_ok=True)
    jobs = JobQueue(max_pending=max_pending)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        jobs.close()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    app = FastAPI(title="xray2ct web demo", lifespan=lifespan)
    app.state.jobs, app.state.models, app.state.workdir = jobs, models, workdir
    app.state.classifier = classifier
    hosts = allowed_hosts_for("127.0.0.1", allowed_hosts or ())
    # two uploads at the limit plus form overhead
    app.add_middleware(RequestGuard, allowed_hosts=hosts, max_body_bytes=2 * max_upload_bytes + (1 << 20))
    decode_slots = threading.BoundedSemaphore(max(1, int(decode_workers)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        )
        return JSONResponse({"detail": f"bad request: {problems}"}, 422)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return JSONResponse({"detail": f"internal server error: {type(exc).__name__}: {exc}"}, 500)

    def find_job(job_id: str, finished: bool = True) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"unknown job {job_id!r} (finished jobs are kept for a while only)")
        if finished and job.state != "done":
            raise HTTPException(409, f"job {job_id} is {job.state}, not done")
        return job

    def read_upload(upload: UploadFile | None, label: str, folder: str, stem: str) -> tuple[str, str]:
        """(path on disk, the name messages use); header checks only, nothing decoded."""
        if upload is None or not upload.filename:
            raise HTTPException(400, f"{label}: no file chosen")
        name = f"{label} ({upload.filename})"
        try:
            return save_upload(upload.file, name, folder, stem, max_upload_bytes, max_pixels), name
        except UploadTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    def decode(chosen: list[LoadedModel], uploads: list[tuple[str, str]]) -> list:
        """Each model's input views, decoded by at most ``decode_workers`` requests at a time."""
        if not decode_slots.acquire(timeout=decode_wait_s):
            raise HTTPException(503, "server busy decoding other uploads; try again in a minute")
        try:
            paths = [p for p, _ in uploads]
            lateral = paths[1] if len(paths) > 1 else None
            return [m.preprocess(paths[0], lateral if m.needs_lateral else None) for m in chosen]
        except InputError as exc:  # name the upload, not the server's temporary path
            name = next((n for p, n in uploads if exc.path == p), None)
            if name is None and exc.path is None:  # a step after loading that knew no file
                name = " / ".join(n for _, n in uploads)
            raise HTTPException(400, f"{name}: {exc.problem}" if name else str(exc)) from None
        finally:
            decode_slots.release()

    def checked_options(model: LoadedModel, options: dict, only_known: bool = False) -> dict:
        if only_known:  # a comparison sends the same controls to every model: each takes its own
            options = {k: v for k, v in options.items() if k in model.options}
        try:
            return model.check_options(options)
        except InputError as exc:
            raise HTTPException(400, f"{model.name}: {exc.problem}") from None

    def run_jobs(chosen: list[LoadedModel], options: dict, pa, lateral) -> list[Job]:
        """Save the uploads once, reserve a queue place per model (all or none), decode, start."""
        settings = [checked_options(m, options, only_known=len(chosen) > 1) for m in chosen]
        ids = [jobs.new_id() for _ in chosen]
        folder = os.path.join(workdir, ids[0])
        os.makedirs(folder)
        reserved: list[Job] = []
        try:
            uploads = [read_upload(pa, "PA X-ray", folder, "pa")]
            biplanar = [m.name for m in chosen if m.needs_lateral]
            if biplanar or (lateral is not None and lateral.filename):
                if biplanar and (lateral is None or not lateral.filename):
                    raise HTTPException(
                        400, f"lateral X-ray: model {', '.join(biplanar)} is biplanar and needs a lateral view"
                    )
                uploads.append(read_upload(lateral, "lateral X-ray", folder, "lateral"))
            paths = [p for p, _ in uploads] + [None]
            group = [
                Job(i, m, os.path.join(workdir, i), paths[0], paths[1], options=o, classifier=classifier)
                for i, m, o in zip(ids, chosen, settings)
            ]  # the uploads stay in the first job's folder; every job's views are decoded before it starts
            reserved = jobs.reserve_all(group)
            for job in group[1:]:
                os.makedirs(job.folder)
            for job, views in zip(group, decode(chosen, uploads)):
                jobs.start(job, views)
        except QueueFull as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(503, str(exc)) from None
        except BaseException:
            for job in reserved:
                jobs.discard(job)
                shutil.rmtree(job.folder, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return group

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/compare", include_in_schema=False)
    def compare_page() -> FileResponse:
        return FileResponse(os.path.join(STATIC, "compare.html"), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = os.path.join(STATIC, os.path.basename(name))
        if not os.path.isfile(path):
            raise HTTPException(404, "not found")
        return FileResponse(path)

    @app.get("/api/models")
    def list_models() -> dict:
        return {
            "models": [m.describe() for m in models.values()],
            "classifier": None if classifier is None else classifier.describe(),
            "windows": list(WINDOW_PRESETS),
            "max_upload_mb": max_upload_bytes / 1e6,
            "max_pending": jobs.max_pending,
        }

    def options_of(sampling_steps, guidance_scale, seed) -> dict:
        values = {"sampling_steps": sampling_steps, "guidance_scale": guidance_scale, "seed": seed}
        return {k: v for k, v in values.items() if v is not None}

    @app.post("/api/jobs", status_code=202)
    def submit(
        pa: UploadFile | None = File(None),
        lateral: UploadFile | None = File(None),
        model: str | None = Form(None),
        sampling_steps: int | None = Form(None),
        guidance_scale: float | None = Form(None),
        seed: int | None = Form(None),
    ) -> dict:
        name = model or next(iter(models))
        if name not in models:
            raise HTTPException(400, f"unknown model {name!r}; loaded: {sorted(models)}")
        (job,) = run_jobs([models[name]], options_of(sampling_steps, guidance_scale, seed), pa, lateral)
        return jobs.status(job)

    @app.post("/api/compare", status_code=202)
    def compare(
        pa: UploadFile | None = File(None),
        lateral: UploadFile | None = File(None),
        models_: str | None = Form(None, alias="models"),
        sampling_steps: int | None = Form(None),
        guidance_scale: float | None = Form(None),
        seed: int | None = Form(None),
    ) -> dict:
        """The same X-rays through several loaded models (comma-separated names; default: all of them)."""
        names = [n.strip() for n in (models_ or "").split(",") if n.strip()] or list(models)
        unknown = [n for n in names if n not in models]
        if unknown:
            raise HTTPException(400, f"unknown model {', '.join(map(repr, unknown))}; loaded: {sorted(models)}")
        names = list(dict.fromkeys(names))
        if len(names) < 2:
            raise HTTPException(400, "a comparison needs two or more models")
        group = run_jobs([models[n] for n in names], options_of(sampling_steps, guidance_scale, seed), pa, lateral)
        return {"jobs": [jobs.status(job) for job in group]}

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str) -> dict:
        return jobs.status(find_job(job_id, finished=False))

    def stage_volume(job: Job, stage: str | None):
        if stage is None:
            return job.volume
        if stage not in job.stages:
            raise HTTPException(404, f"no stage {stage!r}; have {list(job.stages)}")
        return job.stages[stage]

    @app.get("/api/jobs/{job_id}/slice/{axis}")
    def slice_image(
        job_id: str, axis: str, index: int | None = None, window: str = "lung", stage: str | None = None
    ) -> Response:
        job = find_job(job_id)
        volume = stage_volume(job, stage)
        try:
            n = slice_count(volume, axis)
            return Response(slice_png(volume, axis, n // 2 if index is None else index, window), media_type=PNG)
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    def radiograph(job: Job, kind: str, view: str, stage: str | None = None) -> Response:
        if kind == "xray":
            images = job.views
        else:
            stage_volume(job, stage)
            images = job.drrs if stage is None else job.stage_drrs.get(stage, {})
        if view not in images:
            raise HTTPException(404, f"no {kind} image {view!r}; have {sorted(images)}")
        return Response(xray_png(images[view]), media_type=PNG)

    @app.get("/api/jobs/{job_id}/xray/{view}")
    def input_xray(job_id: str, view: str) -> Response:
        """The radiograph as the model saw it (preprocessed)."""
        return radiograph(find_job(job_id), "xray", view)

    @app.get("/api/jobs/{job_id}/drr/{view}")
    def output_drr(job_id: str, view: str, stage: str | None = None) -> Response:
        """The DRR of the generated volume (or of one stage), with the model's camera: compare it with the input."""
        return radiograph(find_job(job_id), "drr", view, stage)

    @app.get("/api/jobs/{job_id}/download/{fmt}")
    def download(job_id: str, fmt: str, stage: str | None = None) -> FileResponse:
        job = find_job(job_id)
        if fmt not in DOWNLOADS:
            raise HTTPException(404, f"format must be one of {sorted(DOWNLOADS)}")
        filename, media = DOWNLOADS[fmt]
        if stage is not None and stage != list(job.stages)[-1]:
            stage_volume(job, stage)
            if fmt != "nifti":
                raise HTTPException(404, "stages download as NIfTI; the final CT also as HDF5")
            return FileResponse(job.stage_files[stage], media_type=media, filename=f"{job.id}_{stage}.nii.gz")
        return FileResponse(job.files[fmt], media_type=media, filename=f"{job.id}_{filename}")

    return app
