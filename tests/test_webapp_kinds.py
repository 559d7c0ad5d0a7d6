"""The web app serving one trained tiny model of each X-ray -> CT kind plus a PE classifier (conftest ``tiny_models``):
run-time options, cascade stages, DRR-consistency scores, PE probability, the comparison endpoint."""

from __future__ import annotations

import io
import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import wait_for_job  # noqa: E402

from common.errors import InputError  # noqa: E402
from common.io import load_volume  # noqa: E402
from webapp.app import create_app  # noqa: E402
from webapp.loaders import load_classifier, load_models  # noqa: E402

PAIR = "pneumocystis-pneumonia-2"
LOCAL = "http://localhost"
KINDS = ("perx2ct", "progressive_cascade", "latent_ddpm")


def wait(client: TestClient, job_id: str, polls: int = 2400) -> dict:
    return wait_for_job(client, job_id, polls)


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    models = load_models([tiny_models[k] for k in KINDS], max_sampling_steps=50)
    app = create_app(models, workdir=str(tmp_path_factory.mktemp("jobs_kinds")), max_pending=3,
                     classifier=load_classifier(tiny_models["pe_classifier"]))  # fmt: skip
    with TestClient(app, base_url=LOCAL) as c:
        c.names = {m.bundle: name for name, m in models.items()}
        yield c


@pytest.fixture(scope="module")
def uploads(shared_data) -> dict:
    pairs = shared_data / "cxr" / "pairs"
    return {"pa": (pairs / f"{PAIR}-PA.png").read_bytes(), "lateral": (pairs / f"{PAIR}-L.png").read_bytes()}


def files(uploads: dict, lateral: bool = True) -> dict:
    out = {"pa": ("pa.png", io.BytesIO(uploads["pa"]))}
    if lateral:
        out["lateral"] = ("l.png", io.BytesIO(uploads["lateral"]))
    return out


def test_models_and_classifier_described(client):
    info = client.get("/api/models").json()
    described = {m["bundle"]: m for m in info["models"]}
    assert set(described) == set(KINDS)
    assert [s["shape"] for s in described["progressive_cascade"]["stages"]] == [[8] * 3, [16] * 3, [32] * 3]
    assert described["latent_ddpm"]["needs_lateral"] is False and described["latent_ddpm"]["views"] == ["pa"]
    steps = described["latent_ddpm"]["options"]["sampling_steps"]
    assert steps["min"] == 1 and steps["max"] == 50 and steps["type"] == "int"
    assert described["perx2ct"]["options"] == {}
    assert info["classifier"]["modality"] == "ct" and info["classifier"]["training_prevalence"] == 0.5
    assert client.get("/compare").status_code == 200 and "/static/viewer.js" in client.get("/compare").text
    assert client.get("/static/viewer.js").status_code == 200


def test_cascade_job_every_stage_scored_and_viewable(client, uploads, tmp_path):
    name = client.names["progressive_cascade"]
    job = client.post("/api/jobs", files=files(uploads), data={"model": name}).json()
    status = wait(client, job["id"])
    assert status["state"] == "done", status
    assert [s["name"] for s in status["stages"]] == ["stage1", "stage2", "stage3"]
    for stage in status["stages"]:
        scores = stage["drr_consistency"]
        assert 0 <= scores["drr_l1"] <= 1 and math.isfinite(scores["drr_psnr"])
    assert status["drr_consistency"] == status["stages"][-1]["drr_consistency"]
    assert math.isfinite(status["drr_consistency_baseline"]["drr_psnr"])
    assert 0 <= status["pe"]["probability"] <= 1 and status["pe"]["modality"] == "ct"
    base = f"/api/jobs/{job['id']}"
    assert client.get(f"{base}/slice/axial?stage=stage1&index=7").status_code == 200
    assert client.get(f"{base}/slice/axial?stage=stage1&index=8").status_code == 400  # 8 slices
    assert client.get(f"{base}/drr/lateral?stage=stage2").status_code == 200
    assert client.get(f"{base}/slice/axial?stage=stage9").status_code == 404
    download = client.get(f"{base}/download/nifti?stage=stage1")
    assert download.status_code == 200
    (tmp_path / "s1.nii.gz").write_bytes(download.content)
    volume = load_volume(tmp_path / "s1.nii.gz")
    assert volume.shape == (8, 8, 8) and volume.spacing == pytest.approx((40.0, 40.0, 40.0))
    assert client.get(f"{base}/download/hdf5?stage=stage1").status_code == 404


def test_diffusion_options_and_progress(client, uploads):
    name = client.names["latent_ddpm"]
    job = client.post("/api/jobs", files=files(uploads, lateral=False),
                      data={"model": name, "sampling_steps": 7, "guidance_scale": 2.0, "seed": 3}).json()  # fmt: skip
    status = wait(client, job["id"])
    assert status["state"] == "done", status
    assert status["options"] == {"sampling_steps": 7, "guidance_scale": 2.0, "seed": 3}
    assert status["views"] == ["pa"] and status["shape"] == [32, 32, 32]
    assert set(status["drr_consistency"]) == {"drr_l1_pa", "drr_psnr_pa", "drr_l1", "drr_psnr"}
    for bad, message in [({"sampling_steps": 51}, "sampling_steps must be in [1, 50]"),
                         ({"guidance_scale": -1}, "guidance_scale must be in")]:  # fmt: skip
        response = client.post("/api/jobs", files=files(uploads, False), data={"model": name, **bad})
        assert response.status_code == 400 and message in response.json()["detail"]
    response = client.post("/api/jobs", files=files(uploads), data={"model": client.names["perx2ct"], "seed": 1})
    assert response.status_code == 400 and "has no option seed" in response.json()["detail"]


def test_comparison_runs_every_model_on_the_same_xrays(client, uploads):
    response = client.post("/api/compare", files=files(uploads), data={"sampling_steps": 3})
    assert response.status_code == 202, response.text
    jobs = response.json()["jobs"]
    assert sorted(j["bundle"] for j in jobs) == sorted(KINDS)
    finished = [wait(client, j["id"]) for j in jobs]
    assert all(s["state"] == "done" for s in finished), finished
    by_kind = {s["bundle"]: s for s in finished}
    assert by_kind["latent_ddpm"]["options"]["sampling_steps"] == 3 and by_kind["perx2ct"]["options"] == {}
    for status in finished:
        assert math.isfinite(status["drr_consistency"]["drr_psnr"]) and 0 <= status["pe"]["probability"] <= 1
    # the same PA went into every model: the model-domain PA views are identical (same size here)
    pas = {client.get(f"/api/jobs/{s['id']}/xray/pa").content for s in finished}
    assert len(pas) == 1


def test_comparison_refusals(client, uploads):
    one = client.post("/api/compare", files=files(uploads), data={"models": client.names["perx2ct"]})
    assert one.status_code == 400 and "two or more" in one.json()["detail"]
    unknown = client.post("/api/compare", files=files(uploads), data={"models": "perx2ct:model,nope"})
    assert unknown.status_code == 400 and "unknown model 'nope'" in unknown.json()["detail"]
    no_lateral = client.post("/api/compare", files=files(uploads, lateral=False))
    assert no_lateral.status_code == 400 and "needs a lateral view" in no_lateral.json()["detail"]


def test_contradicting_config_refused_by_the_web_loader(tiny_models, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(InputError, match="contradicts|differ"):
        load_models(tiny_models["perx2ct"], configs=[str(empty)], baseline=False)
    with pytest.raises(InputError, match="is a 'latent_ddpm' checkpoint, not 'perx2ct'"):
        load_models(tiny_models["latent_ddpm"], bundle="perx2ct", baseline=False)
