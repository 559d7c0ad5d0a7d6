"""Issue 25 item 4: the web app's routes are small functions of one state, and a model's run-time options come
from its own table (``XrayToCTModel.options``): the web layer names none of them."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import wait_for_job  # noqa: E402
from PIL import Image  # noqa: E402

from common.volume import Volume  # noqa: E402
from webapp import app as web  # noqa: E402
from webapp.loaders import LoadedModel  # noqa: E402

LOCAL = "http://localhost"
OPTIONS = {  # names no bundle uses: the app must not know them in advance
    "strength": {"label": "Strength", "type": "float", "min": 0.0, "max": 2.0, "step": 0.1, "default": 1.0},
    "passes": {"label": "Passes", "type": "int", "min": 1, "max": 9, "step": 1, "default": 2},
}  # fmt: skip


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.add.outer(np.arange(80), np.arange(96)) % 256).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def fake(name: str, options: dict) -> LoadedModel:
    return LoadedModel(
        name=name, bundle="fake", needs_lateral=False, image_size=8, volume_shape=(8, 8, 6), spacing=(2.0, 2.0, 3.0),
        geometry=None, preprocess=lambda pa, lateral: np.full((1, 8, 8), 0.5, np.float32),
        reconstruct=lambda views: Volume.from_spacing(np.zeros((8, 8, 6), np.float32), (2.0, 2.0, 3.0)),
        options=options,
    )  # fmt: skip


@pytest.fixture
def client(tmp_path):
    models = {"fake:knobs": fake("fake:knobs", OPTIONS), "fake:plain": fake("fake:plain", {})}
    with TestClient(web.create_app(models, workdir=str(tmp_path)), base_url=LOCAL) as c:
        yield c


def post(client, url: str, **data):
    return client.post(url, files={"pa": ("a.png", png_bytes())}, data=data)


def test_a_models_own_options_are_form_fields(client):
    response = post(client, "/api/jobs", model="fake:knobs", strength="1.5", passes="3")
    assert response.status_code == 202, response.text
    status = wait_for_job(client, response.json()["id"])
    assert status["state"] == "done" and status["options"] == {"strength": 1.5, "passes": 3}
    defaults = wait_for_job(client, post(client, "/api/jobs", model="fake:knobs", strength="").json()["id"])
    assert defaults["options"] == {"strength": 1.0, "passes": 2}  # an empty field is not given


@pytest.mark.parametrize(
    "model, data, message",
    [("fake:knobs", {"passes": "2.5"}, "passes must be a whole number"),
     ("fake:knobs", {"passes": "many"}, "passes must be a number, got 'many'"),
     ("fake:knobs", {"strength": "3"}, "strength must be in [0.0, 2.0]"),
     ("fake:knobs", {"strength": "nan"}, "strength must be in"),
     ("fake:plain", {"strength": "1"}, "fake:plain has no option strength")],
)  # fmt: skip
def test_bad_options_are_explained(client, model, data, message):
    response = post(client, "/api/jobs", model=model, **data)
    assert response.status_code == 400 and message in response.json()["detail"], response.text


def test_a_comparison_gives_each_model_its_own_options(client):
    response = post(client, "/api/compare", models="fake:knobs,fake:plain", passes="4")
    assert response.status_code == 202, response.text
    jobs = {j["model"]: wait_for_job(client, j["id"]) for j in response.json()["jobs"]}
    assert jobs["fake:knobs"]["options"] == {"strength": 1.0, "passes": 4} and jobs["fake:plain"]["options"] == {}


def test_a_text_field_where_a_file_belongs_is_refused(client):
    response = client.post("/api/jobs", data={"pa": "not a file"})
    assert response.status_code == 400 and "pa: expected a file upload" in response.json()["detail"]


def test_routes_are_small_functions_of_one_state(client):
    paths = {(m, r.path) for r in client.app.routes for m in getattr(r, "methods", ())}
    for method, path, handler, _ in web.ROUTES:
        assert (method, path) in paths
        assert len(inspect.getsource(handler).splitlines()) <= 25, handler.__name__
    assert len(inspect.getsource(web.create_app).splitlines()) <= 50
    assert client.app.state.web.jobs is client.app.state.jobs
    for name in ("sampling_steps", "guidance_scale", "seed"):  # latent_ddpm's options live in its loader
        assert name not in inspect.getsource(web)
