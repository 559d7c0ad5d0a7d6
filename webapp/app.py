"""The FastAPI app: a static page, an upload endpoint that queues a job, status polling, PNG renders and downloads.

The routes are small module-level functions of one :class:`WebState` (the models, the queue, the limits),
listed in :data:`ROUTES`; a model's run-time options are the form fields its
:attr:`~xray2ct.models.XrayToCTModel.options` declares (nothing here names them).

Every error, a bad request or a bug, gets a JSON ``{"detail": message}`` the page shows as is; nothing a
client sends can stop the server (reconstructions run on the single worker of :class:`webapp.jobs.JobQueue`).

Memory stays bounded whatever clients send: bodies are limited while they stream and Host / Origin are
checked (:mod:`webapp.security`); an upload is only copied to disk and its header read; a job takes its
place in the queue (or the client hears "busy") *before* its images are decoded, and at most
``decode_workers`` uploads are decoded at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile
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
FORM_FIELDS = ("pa", "lateral", "model", "models")  # every other form field is a model option


@dataclasses.dataclass
class WebState:
    """What the routes share: the served models, the job queue, where job files live and the upload limits."""

    models: dict[str, LoadedModel]
    workdir: str
    jobs: JobQueue
    classifier: PEModel | None = None
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS
    decode_workers: int = 1
    decode_wait_s: float = 120.0
    own_workdir: bool = False  # a temporary folder, removed at shutdown
    decode_slots: threading.BoundedSemaphore = dataclasses.field(init=False)

    def __post_init__(self):
        self.decode_slots = threading.BoundedSemaphore(max(1, int(self.decode_workers)))

    def find_job(self, job_id: str, finished: bool = True) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"unknown job {job_id!r} (finished jobs are kept for a while only)")
        if finished and job.state != "done":
            raise HTTPException(409, f"job {job_id} is {job.state}, not done")
        return job

    def model(self, name: str | None) -> LoadedModel:
        """The model called ``name`` (default: the first loaded)."""
        name = name or next(iter(self.models))
        if name not in self.models:
            raise HTTPException(400, f"unknown model {name!r}; loaded: {sorted(self.models)}")
        return self.models[name]

    def read_upload(self, upload: UploadFile | None, label: str, folder: str, stem: str) -> tuple[str, str]:
        """(path on disk, the name messages use); header checks only, nothing decoded."""
        if upload is None or not upload.filename:
            raise HTTPException(400, f"{label}: no file chosen")
        name = f"{label} ({upload.filename})"
        try:
            return save_upload(upload.file, name, folder, stem, self.max_upload_bytes, self.max_pixels), name
        except UploadTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    def decode(self, chosen: list[LoadedModel], uploads: list[tuple[str, str]]) -> list:
        """Each model's input views, decoded by at most ``decode_workers`` requests at a time."""
        if not self.decode_slots.acquire(timeout=self.decode_wait_s):
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
            self.decode_slots.release()

    @staticmethod
    def checked_options(model: LoadedModel, options: dict, only_known: bool = False) -> dict:
        if only_known:  # a comparison sends the same controls to every model: each takes its own
            options = {k: v for k, v in options.items() if k in model.options}
        try:
            return model.check_options(options)
        except InputError as exc:
            raise HTTPException(400, f"{model.name}: {exc.problem}") from None

    def run_jobs(self, chosen: list[LoadedModel], options: dict, pa, lateral) -> list[Job]:
        """Save the uploads once, reserve a queue place per model (all or none), decode, start."""
        settings = [self.checked_options(m, options, only_known=len(chosen) > 1) for m in chosen]
        ids = [self.jobs.new_id() for _ in chosen]
        folder = os.path.join(self.workdir, ids[0])
        os.makedirs(folder)
        reserved: list[Job] = []
        try:
            uploads = [self.read_upload(pa, "PA X-ray", folder, "pa")]
            biplanar = [m.name for m in chosen if m.needs_lateral]
            if biplanar or (lateral is not None and lateral.filename):
                if biplanar and (lateral is None or not lateral.filename):
                    raise HTTPException(
                        400, f"lateral X-ray: model {', '.join(biplanar)} is biplanar and needs a lateral view"
                    )
                uploads.append(self.read_upload(lateral, "lateral X-ray", folder, "lateral"))
            paths = [p for p, _ in uploads] + [None]
            group = [
                Job(i, m, os.path.join(self.workdir, i), paths[0], paths[1], options=o, classifier=self.classifier)
                for i, m, o in zip(ids, chosen, settings)
            ]  # the uploads stay in the first job's folder; every job's views are decoded before it starts
            reserved = self.jobs.reserve_all(group)
            for job in group[1:]:
                os.makedirs(job.folder)
            for job, views in zip(group, self.decode(chosen, uploads)):
                self.jobs.start(job, views)
        except QueueFull as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(503, str(exc)) from None
        except BaseException:
            for job in reserved:
                self.jobs.discard(job)
                shutil.rmtree(job.folder, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return group


def web_state(request: Request) -> WebState:
    return request.app.state.web


# ----------------------------------------------------------------------------------------------- forms
def form_upload(form: FormData, field: str) -> UploadFile | None:
    value = form.get(field)
    if value is None or isinstance(value, UploadFile):
        return value
    raise HTTPException(400, f"{field}: expected a file upload, got a text field")


def form_options(form: FormData) -> dict[str, int | float]:
    """The run-time options of a form: every field but :data:`FORM_FIELDS`, as numbers (empty: not given).

    Which names and ranges a model takes is its own table (:meth:`LoadedModel.check_options` checks them)."""
    options: dict[str, int | float] = {}
    for key, value in form.multi_items():
        if key in FORM_FIELDS:
            continue
        if isinstance(value, UploadFile):
            raise HTTPException(400, f"{key}: expected a number, got a file upload")
        text = value.strip()
        if not text:
            continue
        try:
            options[key] = int(text)
        except ValueError:
            try:
                options[key] = float(text)
            except ValueError:
                raise HTTPException(400, f"{key} must be a number, got {text!r}") from None
    return options


# ----------------------------------------------------------------------------------------------- routes
def index() -> FileResponse:
    return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")


def compare_page() -> FileResponse:
    return FileResponse(os.path.join(STATIC, "compare.html"), media_type="text/html")


def static(name: str) -> FileResponse:
    path = os.path.join(STATIC, os.path.basename(name))
    if not os.path.isfile(path):
        raise HTTPException(404, "not found")
    return FileResponse(path)


def list_models(state: WebState = Depends(web_state)) -> dict:
    return {
        "models": [m.describe() for m in state.models.values()],
        "classifier": None if state.classifier is None else state.classifier.describe(),
        "windows": list(WINDOW_PRESETS),
        "max_upload_mb": state.max_upload_bytes / 1e6,
        "max_pending": state.jobs.max_pending,
    }


async def submit(request: Request) -> dict:
    """One model (form field ``model``, default: the first loaded) on the uploaded X-rays; its options."""
    state = web_state(request)
    async with request.form() as form:
        model = state.model(form.get("model") if isinstance(form.get("model"), str) else None)
        options, pa, lateral = form_options(form), form_upload(form, "pa"), form_upload(form, "lateral")
        (job,) = await run_in_threadpool(state.run_jobs, [model], options, pa, lateral)
    return state.jobs.status(job)


async def compare(request: Request) -> dict:
    """The same X-rays through several loaded models (comma-separated names; default: all of them)."""
    state = web_state(request)
    async with request.form() as form:
        text = form.get("models") if isinstance(form.get("models"), str) else ""
        names = [n.strip() for n in text.split(",") if n.strip()] or list(state.models)
        unknown = [n for n in names if n not in state.models]
        if unknown:
            raise HTTPException(400, f"unknown model {', '.join(map(repr, unknown))}; loaded: {sorted(state.models)}")
        names = list(dict.fromkeys(names))
        if len(names) < 2:
            raise HTTPException(400, "a comparison needs two or more models")
        chosen = [state.models[n] for n in names]
        options, pa, lateral = form_options(form), form_upload(form, "pa"), form_upload(form, "lateral")
        group = await run_in_threadpool(state.run_jobs, chosen, options, pa, lateral)
    return {"jobs": [state.jobs.status(job) for job in group]}


def status(job_id: str, state: WebState = Depends(web_state)) -> dict:
    return state.jobs.status(state.find_job(job_id, finished=False))


def stage_volume(job: Job, stage: str | None):
    if stage is None:
        return job.volume
    if stage not in job.stages:
        raise HTTPException(404, f"no stage {stage!r}; have {list(job.stages)}")
    return job.stages[stage]


def slice_image(
    job_id: str,
    axis: str,
    index: int | None = None,
    window: str = "lung",
    stage: str | None = None,
    state: WebState = Depends(web_state),
) -> Response:
    volume = stage_volume(state.find_job(job_id), stage)
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


def input_xray(job_id: str, view: str, state: WebState = Depends(web_state)) -> Response:
    """The radiograph as the model saw it (preprocessed)."""
    return radiograph(state.find_job(job_id), "xray", view)


def output_drr(job_id: str, view: str, stage: str | None = None, state: WebState = Depends(web_state)) -> Response:
    """The DRR of the generated volume (or of one stage), with the model's camera: compare it with the input."""
    return radiograph(state.find_job(job_id), "drr", view, stage)


def download(job_id: str, fmt: str, stage: str | None = None, state: WebState = Depends(web_state)) -> FileResponse:
    job = state.find_job(job_id)
    if fmt not in DOWNLOADS:
        raise HTTPException(404, f"format must be one of {sorted(DOWNLOADS)}")
    filename, media = DOWNLOADS[fmt]
    if stage is not None and stage != list(job.stages)[-1]:
        stage_volume(job, stage)
        if fmt != "nifti":
            raise HTTPException(404, "stages download as NIfTI; the final CT also as HDF5")
        return FileResponse(job.stage_files[stage], media_type=media, filename=f"{job.id}_{stage}.nii.gz")
    return FileResponse(job.files[fmt], media_type=media, filename=f"{job.id}_{filename}")


HIDDEN = {"include_in_schema": False}
# (method, path, handler, add_api_route arguments)
ROUTES: tuple[tuple[str, str, Callable, dict], ...] = (
    ("GET", "/", index, HIDDEN),
    ("GET", "/compare", compare_page, HIDDEN),
    ("GET", "/static/{name}", static, HIDDEN),
    ("GET", "/api/models", list_models, {}),
    ("POST", "/api/jobs", submit, {"status_code": 202}),
    ("POST", "/api/compare", compare, {"status_code": 202}),
    ("GET", "/api/jobs/{job_id}", status, {}),
    ("GET", "/api/jobs/{job_id}/slice/{axis}", slice_image, {}),
    ("GET", "/api/jobs/{job_id}/xray/{view}", input_xray, {}),
    ("GET", "/api/jobs/{job_id}/drr/{view}", output_drr, {}),
    ("GET", "/api/jobs/{job_id}/download/{fmt}", download, {}),
)


# ----------------------------------------------------------------------------------------------- errors
async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(exc.detail)}, exc.status_code, headers=exc.headers)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
    )
    return JSONResponse({"detail": f"bad request: {problems}"}, 422)


async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return JSONResponse({"detail": f"internal server error: {type(exc).__name__}: {exc}"}, 500)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    state: WebState = app.state.web
    state.jobs.close()
    if state.own_workdir:
        shutil.rmtree(state.workdir, ignore_errors=True)


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
    state = WebState(models, workdir, JobQueue(max_pending=max_pending), classifier, max_upload_bytes, max_pixels,
                     decode_workers, decode_wait_s, own_workdir)  # fmt: skip
    app = FastAPI(title="xray2ct web demo", lifespan=lifespan)
    app.state.web = state
    app.state.jobs, app.state.models, app.state.workdir = state.jobs, models, workdir
    app.state.classifier = classifier
    hosts = allowed_hosts_for("127.0.0.1", allowed_hosts or ())
    # two uploads at the limit plus form overhead
    app.add_middleware(RequestGuard, allowed_hosts=hosts, max_body_bytes=2 * max_upload_bytes + (1 << 20))
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    for method, path, handler, extra in ROUTES:
        app.add_api_route(path, handler, methods=[method], **extra)
    return app
