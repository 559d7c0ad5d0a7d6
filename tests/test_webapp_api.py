"""The web demo's API through FastAPI's TestClient: uploads good and bad, queueing, renders and downloads."""

from __future__ import annotations

import contextlib
import io
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import free_port, save_dicom, wait_for_job  # noqa: E402

from common.drr import DRRGeometry  # noqa: E402
from common.errors import InputError  # noqa: E402
from common.io import load_volume  # noqa: E402
from common.volume import Volume  # noqa: E402
from webapp.app import create_app  # noqa: E402
from webapp.demo_checkpoint import make_random_checkpoint  # noqa: E402
from webapp.jobs import Job  # noqa: E402
from webapp.loaders import LoadedModel, load_models  # noqa: E402

PAIR = "pneumocystis-pneumonia-2"
LOCAL = "http://localhost"  # the app serves loopback host names only (DNS rebinding guard)


def png_bytes(size=(96, 80)) -> bytes:
    """A non-blank grayscale gradient PNG (width, height)."""
    w, h = size
    array = (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def wait(client: TestClient, job_id: str, polls: int = 1200) -> dict:
    return wait_for_job(client, job_id, polls)


# ----------------------------------------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_random_checkpoint(
        str(tmp_path_factory.mktemp("webapp") / "tiny.pt"), spacing=(10.0, 10.0, 8.0)
    )


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    models = load_models(checkpoint, "perx2ct", ["cpu_tiny"])
    app = create_app(models, workdir=str(tmp_path_factory.mktemp("jobs")), max_upload_bytes=2_000_000)
    with TestClient(app, base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def done_job(client, shared_data) -> dict:
    pairs = shared_data / "cxr" / "pairs"
    with open(pairs / f"{PAIR}-PA.png", "rb") as pa, open(pairs / f"{PAIR}-L.png", "rb") as lat:
        response = client.post("/api/jobs", files={"pa": ("pa.png", pa), "lateral": ("l.png", lat)})
    assert response.status_code == 202, response.text
    status = wait(client, response.json()["id"])
    assert status["state"] == "done", status
    return status


def test_models_listed(client):
    info = client.get("/api/models").json()
    assert [m["name"] for m in info["models"]] == ["perx2ct:tiny"]
    model = info["models"][0]
    assert model["needs_lateral"] is True and model["volume_shape"] == [32, 32, 32]
    assert model["spacing"] == [10.0, 10.0, 8.0]
    assert {"lung", "mediastinum", "bone"} <= set(info["windows"])
    assert info["max_upload_mb"] == 2.0


def test_page_is_self_contained(client):
    html = client.get("/").text
    assert 'id="upload"' in html and 'id="viewer"' in html and "<script>" in html
    assert "http://" not in html and "https://" not in html  # no CDN scripts, styles or fonts


def test_good_pair_gives_volume_with_spacing(done_job):
    assert done_job["shape"] == [32, 32, 32]
    assert done_job["spacing"] == [10.0, 10.0, 8.0]
    assert done_job["progress"] == 1.0 and done_job["error"] is None
    assert done_job["views"] == ["pa", "lateral"]


@pytest.mark.parametrize(
    "axis,size", [("axial", (320, 320)), ("coronal", (320, 256)), ("sagittal", (320, 256))]
)
def test_slice_png_keeps_millimetres_square(client, done_job, axis, size):
    response = client.get(f"/api/jobs/{done_job['id']}/slice/{axis}", params={"index": 5, "window": "lung"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    # 32 voxels x 10 mm across, 32 x 8 mm high (superior axis): (width, height) = 320 : 256
    assert image.size == size and image.mode == "L"


def test_windows_change_the_rendering(client, done_job):
    url = f"/api/jobs/{done_job['id']}/slice/axial"
    images = {
        w: np.asarray(Image.open(io.BytesIO(client.get(url, params={"window": w}).content)))
        for w in ("lung", "bone")
    }
    assert not np.array_equal(images["lung"], images["bone"])


def test_slice_matches_downloaded_volume(client, done_job, tmp_path):
    """The rendered slice is the NIfTI's data through the window (server and download agree)."""
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(client.get(f"/api/jobs/{done_job['id']}/download/nifti").content)
    volume = load_volume(str(path))
    from common.intensity import MEDIASTINUM
    from common.preview import oriented_slice

    expected = np.round(MEDIASTINUM.to_unit(oriented_slice(volume.array, "axial", 7)) * 255).astype(np.uint8)
    png = client.get(f"/api/jobs/{done_job['id']}/slice/axial", params={"index": 7, "window": "mediastinum"})
    shown = np.asarray(Image.open(io.BytesIO(png.content)))
    assert shown.shape == (320, 320)  # 32 voxels x 10 mm, one screen pixel per mm
    upsampled = np.asarray(Image.fromarray(expected).resize((320, 320), Image.Resampling.BILINEAR))
    assert np.abs(shown.astype(int) - upsampled.astype(int)).max() <= 1
    assert shown.std() > 0  # a random network's output is not one flat grey


def test_downloads_open_with_spacing(client, done_job, tmp_path):
    nifti = client.get(f"/api/jobs/{done_job['id']}/download/nifti")
    assert nifti.status_code == 200 and "attachment" in nifti.headers["content-disposition"]
    (tmp_path / "ct.nii.gz").write_bytes(nifti.content)
    img = nib.load(str(tmp_path / "ct.nii.gz"))
    assert img.shape == (32, 32, 32)
    assert np.allclose(img.header.get_zooms()[:3], (10.0, 10.0, 8.0))
    data = np.asarray(img.dataobj)
    assert -1024.0 <= data.min() and data.max() <= 2048.0  # HU in the network window
    h5 = client.get(f"/api/jobs/{done_job['id']}/download/hdf5")
    (tmp_path / "ct.h5").write_bytes(h5.content)
    volume = load_volume(str(tmp_path / "ct.h5"))
    assert volume.shape == (32, 32, 32) and np.allclose(volume.spacing, (10.0, 10.0, 8.0))
    assert np.allclose(volume.array, data)


def test_xrays_and_drrs(client, done_job):
    for kind in ("xray", "drr"):
        for view in ("pa", "lateral"):
            response = client.get(f"/api/jobs/{done_job['id']}/{kind}/{view}")
            assert response.status_code == 200, response.text
            assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    assert client.get(f"/api/jobs/{done_job['id']}/drr/axial").status_code == 404


def test_dicom_and_jpeg_uploads(client, shared_data):
    dicom = next((shared_data / "cxr" / "frontal").glob("*.dcm"))
    jpeg = shared_data / "cxr" / "pairs" / "covid-19-pneumonia-7-L.jpg"
    with open(dicom, "rb") as pa, open(jpeg, "rb") as lat:
        response = client.post("/api/jobs", files={"pa": ("x", pa), "lateral": ("y", lat)})
    assert response.status_code == 202, response.text
    assert wait(client, response.json()["id"])["state"] == "done"


@pytest.mark.parametrize(
    "pa,lateral,status,message",
    [
        (b"", png_bytes(), 400, "empty"),
        (b"hello, I am not an image" * 10, png_bytes(), 400, "not a PNG, JPEG or DICOM"),
        (png_bytes((16, 16)), png_bytes(), 400, "16 x 16 pixels"),
        (png_bytes()[:60], png_bytes(), 400, "PA X-ray"),  # truncated: header fine, pixels missing
        (np.zeros(2_100_000, np.uint8).tobytes(), png_bytes(), 413, "limit"),
        (png_bytes(), None, 400, "needs a lateral"),
    ],
    ids=["empty", "text", "tiny", "truncated", "huge", "no-lateral"],
)
def test_bad_uploads_are_explained(client, pa, lateral, status, message):
    files = {"pa": ("pa.png", pa)}
    if lateral is not None:
        files["lateral"] = ("lat.png", lateral)
    response = client.post("/api/jobs", files=files)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert client.get("/api/models").status_code == 200  # still serving


def test_bad_requests(client, done_job):
    job = done_job["id"]
    assert (
        client.post("/api/jobs", files={"pa": ("a.png", png_bytes())}, data={"model": "nope"}).status_code
        == 400
    )
    assert client.get("/api/jobs/unknown").status_code == 404
    assert "index" in client.get(f"/api/jobs/{job}/slice/axial", params={"index": 32}).json()["detail"]
    assert client.get(f"/api/jobs/{job}/slice/axial", params={"window": "rainbow"}).status_code == 400
    assert client.get(f"/api/jobs/{job}/slice/oblique").status_code == 400
    assert client.get(f"/api/jobs/{job}/download/dicom").status_code == 404


def test_unknown_bundle_and_missing_checkpoint(checkpoint, tmp_path):
    with pytest.raises(InputError, match="no web loader"):
        load_models(checkpoint, "nobundle")
    with pytest.raises(InputError, match="file not found"):
        load_models(str(tmp_path / "missing.pt"), "perx2ct", ["cpu_tiny"])


# ----------------------------------------------------------------------------------------------- queueing
class GatedModel:
    """A stand-in model whose reconstruction waits for a gate and records how many run at once."""

    def __init__(self):
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.active = self.max_active = self.calls = 0

    def reconstruct(self, views: np.ndarray) -> Volume:
        with self.lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        self.gate.wait(timeout=60)
        with self.lock:
            self.active -= 1
        return Volume.from_spacing(np.full((8, 8, 6), 40.0 * views.mean(), np.float32), (2.0, 2.0, 3.0))

    def entry(self) -> LoadedModel:
        geometry = DRRGeometry(
            "tiny", sad=700.0, sid=1200.0, detector_pixels=(8, 8), detector_size_mm=(100.0, 100.0)
        )
        return LoadedModel(
            name="fake:pa-only", bundle="fake", needs_lateral=False, image_size=8, volume_shape=(8, 8, 6),
            spacing=(2.0, 2.0, 3.0), geometry=geometry,
            preprocess=lambda pa, lateral: np.full((1, 8, 8), 0.5, np.float32),
            reconstruct=self.reconstruct,
        )  # fmt: skip


def test_concurrent_jobs_queue_on_one_worker(tmp_path):
    fake = GatedModel()
    app = create_app({"fake:pa-only": fake.entry()}, workdir=str(tmp_path), max_pending=2)
    with TestClient(app, base_url=LOCAL) as client:
        ids = [client.post("/api/jobs", files={"pa": ("a.png", png_bytes())}).json()["id"]]
        deadline = time.monotonic() + 60  # wait until the worker has picked the first job up (slow when loaded)
        while client.get(f"/api/jobs/{ids[0]}").json()["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        ids += [client.post("/api/jobs", files={"pa": ("a.png", png_bytes())}).json()["id"] for _ in range(2)]
        states = [client.get(f"/api/jobs/{i}").json() for i in ids]
        assert [s["state"] for s in states] == ["running", "queued", "queued"]
        assert [s["queue_position"] for s in states] == [0, 1, 2]
        busy = client.post("/api/jobs", files={"pa": ("a.png", png_bytes())})
        assert busy.status_code == 503 and "busy" in busy.json()["detail"]
        fake.gate.set()
        finished = [wait(client, i) for i in ids]
        assert [s["state"] for s in finished] == ["done"] * 3
        assert fake.calls == 3 and fake.max_active == 1  # never two reconstructions at once
        assert finished[0]["shape"] == [8, 8, 6] and finished[0]["views"] == ["pa"]
        assert client.get(f"/api/jobs/{ids[0]}/xray/lateral").status_code == 404  # PA-only model


def test_failed_job_reports_and_server_survives(tmp_path):
    def broken(views):
        raise RuntimeError("out of memory (simulated)")

    model = GatedModel().entry()
    model.reconstruct = broken
    with TestClient(create_app({model.name: model}, workdir=str(tmp_path)), base_url=LOCAL) as client:
        job = client.post("/api/jobs", files={"pa": ("a.png", png_bytes())}).json()["id"]
        status = wait(client, job)
        assert status["state"] == "failed" and "out of memory (simulated)" in status["error"]
        assert client.get(f"/api/jobs/{job}/slice/axial").status_code == 409
        assert client.get("/").status_code == 200


def test_cli_splits_checkpoint_lists():
    from webapp.__main__ import as_list

    assert as_list("[/a/b.pt,/c/d.pt]") == ["/a/b.pt", "/c/d.pt"]
    assert as_list("a.pt") == ["a.pt"] and as_list(("x", "y")) == ["x", "y"] and as_list(None) == []


# ----------------------------------------------------------------------------------------------- hostile clients
def png16_bytes(size=(1024, 1024)) -> bytes:
    """A 16-bit grayscale PNG (width, height) with a smooth ramp: small file, big decode."""
    w, h = size
    ramp = (np.add.outer(np.arange(h), np.arange(w)) * 7 % 65536).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


class DecodeProbe:
    """Wraps ``common.xray._load_raster`` (every PNG decode, whoever asks) to count concurrent decodes."""

    def __init__(self, original):
        self.original, self.lock = original, threading.Lock()
        self.active = self.max_active = self.calls = 0
        self.arrived = threading.Condition(self.lock)

    def __call__(self, path):
        with self.lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
            self.arrived.notify_all()
            self.arrived.wait_for(
                lambda: self.active > 1, timeout=1.0
            )  # give a concurrent decode time to show
        try:
            return self.original(path)
        finally:
            with self.lock:
                self.active -= 1


def test_uploads_decoded_one_at_a_time_and_only_when_admitted(tmp_path, monkeypatch):
    """Issue 14 item 11: concurrent uploads never decode in parallel; a refused upload is never decoded."""
    import common.xray
    from common.xray import load_xray

    probe = DecodeProbe(common.xray._load_raster)
    monkeypatch.setattr(common.xray, "_load_raster", probe)
    fake = GatedModel()
    model = fake.entry()
    model.preprocess = lambda pa, lateral: np.full((1, 8, 8), float(load_xray(pa)[0].mean()), np.float32)
    app = create_app({model.name: model}, workdir=str(tmp_path), max_pending=4, max_upload_bytes=8_000_000)
    data = png16_bytes()
    with TestClient(app, base_url=LOCAL) as client:
        first = client.post("/api/jobs", files={"pa": ("a.png", data)}).json()["id"]
        for _ in range(400):  # the worker holds the first job (gated): the next ones wait in the queue
            if client.get(f"/api/jobs/{first}").json()["state"] == "running":
                break
            time.sleep(0.01)
        results = []

        def upload():
            results.append(client.post("/api/jobs", files={"pa": ("a.png", data)}).status_code)

        threads = [threading.Thread(target=upload) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(results) == [202] * 4
        assert probe.max_active == 1, f"{probe.max_active} uploads decoded at once"
        calls = probe.calls
        refused = [client.post("/api/jobs", files={"pa": ("a.png", data)}) for _ in range(3)]
        assert [r.status_code for r in refused] == [503] * 3 and "busy" in refused[0].json()["detail"]
        assert probe.calls == calls  # refused uploads cost no decode
        fake.gate.set()


def test_bomb_png_and_internal_errors_are_json(client, tmp_path, png_bomb):
    """Issue 14 item 13: a PNG declaring 60000 x 60000 pixels, and a bug, both answer JSON with a message."""
    response = client.post(
        "/api/jobs", files={"pa": ("bomb.png", png_bomb()), "lateral": ("l.png", png_bytes())}
    )
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert "PA X-ray (bomb.png)" in response.json()["detail"] and "pixels" in response.json()["detail"]
    model = GatedModel().entry()
    app = create_app({model.name: model}, workdir=str(tmp_path))
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as broken:
        app.state.jobs.new_id = lambda: (_ for _ in ()).throw(RuntimeError("disk on fire (simulated)"))
        response = broken.post("/api/jobs", files={"pa": ("a.png", png_bytes())})
        assert response.status_code == 500 and "disk on fire" in response.json()["detail"]
        response = broken.get("/api/jobs/x/slice/axial", params={"index": "three"})
        assert response.status_code == 422 and "index" in response.json()["detail"]
        assert broken.get("/nowhere").json()["detail"]


def test_cross_origin_and_foreign_host_refused(tmp_path):
    """Issue 14 item 14: CSRF from another site and DNS rebinding (foreign Host) get JSON refusals."""
    model = GatedModel().entry()
    model.reconstruct = lambda views: Volume.from_spacing(np.zeros((8, 8, 6), np.float32), (2.0, 2.0, 3.0))
    app = create_app({model.name: model}, workdir=str(tmp_path))
    files = {"pa": ("a.png", png_bytes())}
    with TestClient(app, base_url=LOCAL) as client:
        for origin in ("http://evil.example", "null", "http://localhost:9999"):
            response = client.post("/api/jobs", files=files, headers={"Origin": origin})
            assert response.status_code == 403 and "refused" in response.json()["detail"], origin
        assert app.state.jobs.jobs == {}  # nothing was queued
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            response = client.get("/api/models", headers={"Host": host})
            assert response.status_code == 400 and "not served" in response.json()["detail"], host
        ok = client.post("/api/jobs", files=files, headers={"Origin": "http://localhost"})
        assert ok.status_code == 202, ok.text
        assert client.post("/api/jobs", files=files).status_code == 202  # no Origin: curl, scripts
        assert client.get("/api/models", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    other = create_app({model.name: model}, workdir=str(tmp_path / "b"), allowed_hosts=["ct.example.org"])
    with TestClient(other, base_url="https://ct.example.org") as client:
        assert client.get("/api/models").status_code == 200
        assert (
            client.post("/api/jobs", files=files, headers={"Origin": "https://ct.example.org"}).status_code
            == 202
        )


def deflated_dicom(rows: int, cols: int) -> bytes:
    """A deflated (transfer syntax 1.2.840.10008.1.2.1.99) 16-bit radiograph: tiny file, big inflation."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ramp = np.tile((np.arange(cols) * 20).astype(np.uint16), (rows, 1))
    ds.PixelData = ramp.tobytes()
    buffer = io.BytesIO()
    save_dicom(ds, buffer)
    return buffer.getvalue()


def test_deflated_dicom_bomb_refused(client):
    """Issue 14 item 12: a deflated DICOM of ~20 KB that inflates to 9 MB (4x the 2 MB limit) is refused."""
    bomb = deflated_dicom(3000, 1500)
    assert len(bomb) < 100_000
    response = client.post("/api/jobs", files={"pa": ("bomb.dcm", bomb), "lateral": ("l.png", png_bytes())})
    assert response.status_code == 400, response.text
    assert "inflates" in response.json()["detail"] and "PA X-ray (bomb.dcm)" in response.json()["detail"]
    small = deflated_dicom(256, 256)  # an honest deflated DICOM still works
    response = client.post("/api/jobs", files={"pa": ("ok.dcm", small), "lateral": ("l.png", png_bytes())})
    assert response.status_code == 202, response.text


@pytest.fixture()
def live_server(tmp_path):
    """The app with a stand-in model behind uvicorn on 127.0.0.1 (a real HTTP/1.1 socket)."""
    import uvicorn

    model = GatedModel().entry()
    app = create_app({model.name: model}, workdir=str(tmp_path), max_upload_bytes=2_000_000)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(30)


def test_chunked_body_limit_enforced_while_streaming(live_server):
    """Issue 14 item 12: a chunked body without Content-Length is cut off near the limit, not spooled whole."""
    import select
    import socket

    total, piece = 64 * 2**20, b"\0" * 65536
    head = (
        f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{live_server}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: multipart/form-data; boundary=XYZ\r\n\r\n"
    ).encode()
    part = b'--XYZ\r\nContent-Disposition: form-data; name="pa"; filename="big.png"\r\n\r\n\x89PNG\r\n\x1a\n'
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", live_server), timeout=30) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        sock.settimeout(0.5)
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered (and stopped reading)
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            except TimeoutError:
                continue  # buffers full: the server no longer reads
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            with contextlib.suppress(OSError):
                end = b"\r\n--XYZ--\r\n"
                sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
        sock.settimeout(30)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                reply += chunk
                if b"}" in reply:
                    break
    assert sent < 32 * 2**20, f"the server read {sent / 2**20:.0f} MiB of a body over the 5 MB limit"
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"application/json" in reply and b"larger than" in reply


def test_finished_jobs_kept_a_minute_under_load(tmp_path):
    """A burst of finished jobs must not evict a result seconds after it finished (soak: 404 on slices)."""
    from webapp.jobs import JobQueue

    queue = JobQueue(max_pending=100, keep=2, min_keep_s=60.0, max_kept=5)
    try:
        now = time.monotonic()
        model = GatedModel().entry()
        for k, age in enumerate([600, 500, 30, 20, 10, 5]):  # two stale, four recent
            job = Job(f"old{k}", model, str(tmp_path / f"j{k}"), "pa.png", None, state="done")
            job.finished = now - age
            queue.jobs[job.id] = job
        queue.reserve(Job("new", model, str(tmp_path / "new"), "pa.png", None))
        assert sorted(queue.jobs) == ["new", "old2", "old3", "old4", "old5"]  # stale ones gone, recent kept
        for k in range(6, 10):  # past max_kept the oldest go whatever their age
            job = Job(f"old{k}", model, str(tmp_path / f"j{k}"), "pa.png", None, state="done")
            job.finished = now - 1
            queue.jobs[job.id] = job
        queue.reserve(Job("newer", model, str(tmp_path / "newer"), "pa.png", None))
        finished = [j for j in queue.jobs.values() if j.state == "done"]
        assert len(finished) == 5 and "old2" not in queue.jobs
    finally:
        queue.close()
