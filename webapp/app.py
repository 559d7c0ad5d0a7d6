"""The FastAPI app: a static page, an upload endpoint that queues a job, status polling, PNG renders and downloads.

Every bad request gets a JSON ``{"detail": message}`` the page shows as is; nothing a client sends can stop
the server (reconstructions run on the single worker of :class:`webapp.jobs.JobQueue`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from common.errors import InputError
from webapp.jobs import Job, JobQueue, QueueFull
from webapp.loaders import LoadedModel
from webapp.render import WINDOW_PRESETS, slice_count, slice_png, xray_png
from webapp.uploads import MAX_UPLOAD_BYTES, store_upload

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DOWNLOADS = {"nifti": ("ct.nii.gz", "application/gzip"), "hdf5": ("ct.h5", "application/x-hdf5")}
PNG = "image/png"


def create_app(
    models: dict[str, LoadedModel],
    workdir: str | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pending: int = 4,
) -> FastAPI:
    """Build the app serving ``models`` (name -> :class:`LoadedModel`); job files live under ``workdir``."""
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

    @app.middleware("http")
    async def refuse_huge_bodies(request: Request, call_next):
        """Two uploads at the limit plus form overhead; bigger bodies are refused before they are read."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > 2 * max_upload_bytes + (1 << 20):
            mb = max_upload_bytes / 1e6
            return JSONResponse({"detail": f"upload too large: each file must be at most {mb:.0f} MB"}, 413)
        return await call_next(request)

    def find_job(job_id: str, finished: bool = True) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"unknown job {job_id!r} (finished jobs are kept for a while only)")
        if finished and job.state != "done":
            raise HTTPException(409, f"job {job_id} is {job.state}, not done")
        return job

    def read_upload(upload: UploadFile | None, label: str, folder: str, stem: str) -> str:
        if upload is None or not upload.filename:
            raise HTTPException(400, f"{label}: no file chosen")
        data = upload.file.read(max_upload_bytes + 1)
        name = f"{label} ({upload.filename})"
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: larger than the {max_upload_bytes / 1e6:.0f} MB limit")
        try:
            return store_upload(data, name, folder, stem, max_upload_bytes)
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

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
            "windows": list(WINDOW_PRESETS),
            "max_upload_mb": max_upload_bytes / 1e6,
        }

    @app.post("/api/jobs", status_code=202)
    def submit(
        pa: UploadFile | None = File(None),
        lateral: UploadFile | None = File(None),
        model: str | None = Form(None),
    ) -> dict:
        name = model or next(iter(models))
        if name not in models:
            raise HTTPException(400, f"unknown model {name!r}; loaded: {sorted(models)}")
        chosen = models[name]
        job_id = jobs.new_id()
        folder = os.path.join(workdir, job_id)
        os.makedirs(folder)
        try:
            pa_path = read_upload(pa, "PA X-ray", folder, "pa")
            lateral_path = None
            if chosen.needs_lateral or (lateral is not None and lateral.filename):
                if chosen.needs_lateral and (lateral is None or not lateral.filename):
                    raise HTTPException(
                        400, f"lateral X-ray: model {name} is biplanar and needs a lateral view"
                    )
                lateral_path = read_upload(lateral, "lateral X-ray", folder, "lateral")
            job = jobs.submit(Job(job_id, chosen, folder, pa_path, lateral_path))
        except QueueFull as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(503, str(exc)) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return jobs.status(job)

    @app.get("/api/jobs/{job_id}")
    def status(job_id: str) -> dict:
        return jobs.status(find_job(job_id, finished=False))

    @app.get("/api/jobs/{job_id}/slice/{axis}")
    def slice_image(job_id: str, axis: str, index: int | None = None, window: str = "lung") -> Response:
        job = find_job(job_id)
        try:
            n = slice_count(job.volume, axis)
            return Response(
                slice_png(job.volume, axis, n // 2 if index is None else index, window), media_type=PNG
            )
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    def radiograph(job: Job, kind: str, view: str) -> Response:
        images = job.views if kind == "xray" else job.drrs
        if view not in images:
            raise HTTPException(404, f"no {kind} image {view!r}; have {sorted(images)}")
        return Response(xray_png(images[view]), media_type=PNG)

    @app.get("/api/jobs/{job_id}/xray/{view}")
    def input_xray(job_id: str, view: str) -> Response:
        """The radiograph as the model saw it (preprocessed)."""
        return radiograph(find_job(job_id), "xray", view)

    @app.get("/api/jobs/{job_id}/drr/{view}")
    def output_drr(job_id: str, view: str) -> Response:
        """The DRR of the generated volume, with the model's camera: compare it with the input."""
        return radiograph(find_job(job_id), "drr", view)

    @app.get("/api/jobs/{job_id}/download/{fmt}")
    def download(job_id: str, fmt: str) -> FileResponse:
        job = find_job(job_id)
        if fmt not in DOWNLOADS:
            raise HTTPException(404, f"format must be one of {sorted(DOWNLOADS)}")
        filename, media = DOWNLOADS[fmt]
        return FileResponse(job.files[fmt], media_type=media, filename=f"{job.id}_{filename}")

    return app
