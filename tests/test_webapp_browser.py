"""End to end in headless Chromium: upload a real PA + lateral pair on the page, wait, check the viewer.

Driven through chromedriver's W3C WebDriver HTTP API with httpx (already a web dependency) rather than
selenium, to avoid one more package. Skips when /usr/bin/chromium or /usr/bin/chromedriver is missing
(CI installs them: ``apt-get install -y chromium chromium-driver``). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

CHROMIUM = os.environ.get("XRAY2CT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("XRAY2CT_CHROMEDRIVER", "/usr/bin/chromedriver")
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(
        f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )

PAIR = "pneumocystis-pneumonia-2"
KINDS = ("perx2ct", "progressive_cascade", "latent_ddpm")
SHOTS = os.environ.get("XRAY2CT_SCREENSHOTS")  # a folder to keep the screenshots in (default: pytest's tmp_path)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1100",
]  # fmt: skip


def wait_for(predicate, what: str, polls: int = 600, pause: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (a bounded loop, not a timing assertion)."""
    for _ in range(polls):
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"gave up waiting for {what}")


class WebDriver:
    """The few W3C WebDriver commands the test needs."""

    def __init__(self, url: str, user_data_dir: str):
        self.http = httpx.Client(base_url=url, timeout=120.0, trust_env=False)
        options = {"binary": CHROMIUM, "args": [*FLAGS, f"--user-data-dir={user_data_dir}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        response = self.http.request(method, path, json=body)
        value = response.json()["value"]
        if response.status_code != 200:
            raise RuntimeError(f"WebDriver {method} {path}: {value}")
        return value

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def element(self, css: str) -> str:
        found = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def send_file(self, css: str, path: str) -> None:
        self.cmd("POST", f"/element/{self.element(css)}/value", {"text": path})

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.element(css)}/click", {})

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        return path

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.http.close()


@contextlib.contextmanager
def serving(app):
    """``app`` served by uvicorn on 127.0.0.1 in a thread; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with a random tiny PerX2CT."""
    from webapp.app import create_app
    from webapp.demo_checkpoint import make_random_checkpoint
    from webapp.loaders import load_models

    root = tmp_path_factory.mktemp("webapp_e2e")
    checkpoint = make_random_checkpoint(str(root / "tiny.pt"))
    app = create_app(load_models(checkpoint, "perx2ct", ["cpu_tiny"]), workdir=str(root / "jobs"))
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def every_kind_server(tiny_models, tmp_path_factory):
    """The app with one trained tiny model of each X-ray -> CT kind and a PE classifier (conftest ``tiny_models``)."""
    from webapp.app import create_app
    from webapp.loaders import load_classifier, load_models

    checkpoints = [tiny_models[k] for k in KINDS]
    models = load_models(checkpoints, max_sampling_steps=400)
    app = create_app(
        models,
        workdir=str(tmp_path_factory.mktemp("webapp_kinds") / "jobs"),
        classifier=load_classifier(tiny_models["pe_classifier"]),
    )
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver_proc = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1", f"--log-path={log}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(url + "/status", trust_env=False).json()["value"]["ready"]
        except httpx.HTTPError:
            return False

    profile = tmp_path_factory.mktemp("chromium-profile")
    try:
        wait_for(ready, "chromedriver to start")
        driver = WebDriver(url, str(profile))
        yield driver
        driver.quit()
    finally:
        driver_proc.terminate()
        driver_proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def test_upload_pair_and_browse_slices(server, browser, shared_data, tmp_path):
    pairs = shared_data / "cxr" / "pairs"
    browser.get(server + "/")
    wait_for(lambda: browser.js("return document.getElementById('model').options.length"), "the model list")
    assert browser.js("return document.getElementById('model').value") == "perx2ct:tiny"
    browser.send_file("#pa", str(pairs / f"{PAIR}-PA.png"))
    browser.send_file("#lateral", str(pairs / f"{PAIR}-L.png"))
    browser.click("#submit")
    state = wait_for(
        lambda: browser.js(
            "const s = document.body.dataset.state; return ['done','failed','error'].includes(s) && s"
        ),
        "the reconstruction",
    )
    assert state == "done", browser.js("return document.getElementById('error').textContent")
    widths_js = "return ['axial','coronal','sagittal'].map(a => Number(document.getElementById('slice-' + a).dataset.loaded || 0))"
    widths = wait_for(lambda: all(browser.js(widths_js)) and browser.js(widths_js), "the slices to load")
    assert widths == [320, 320, 320]  # 32^3 at 10 mm, drawn 320 px wide
    radiographs_js = "return ['xray-pa','xray-lateral','drr-pa','drr-lateral'].map(i => document.getElementById(i).naturalWidth)"
    assert wait_for(lambda: all(browser.js(radiographs_js)), "the X-rays and DRRs")
    assert browser.js("return document.getElementById('viewer').hidden") is False
    assert browser.js("return document.getElementById('download-nifti').href").endswith("/download/nifti")

    # Move the axial slider and switch to the bone window: the image is fetched again with both.
    browser.js(
        "const s = document.getElementById('index-axial'); s.value = 3; s.dispatchEvent(new Event('input'));"
        "document.querySelector('input[name=window][value=bone]').click();"
    )
    src = browser.js("return document.getElementById('slice-axial').src")
    assert "index=3" in src and "window=bone" in src
    wait_for(lambda: browser.js("return document.getElementById('slice-axial').complete"), "the new slice")
    shot = browser.screenshot(tmp_path / "webapp_e2e.png")
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_bad_upload_shows_message(server, browser, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not an X-ray\n" * 20)
    browser.get(server + "/")
    wait_for(lambda: browser.js("return document.getElementById('model').options.length"), "the model list")
    browser.send_file("#pa", str(bogus))
    browser.send_file("#lateral", str(bogus))
    browser.click("#submit")
    wait_for(lambda: browser.js("return document.body.dataset.state") == "error", "the error")
    message = browser.js("return document.getElementById('error').textContent")
    assert "not a PNG, JPEG or DICOM" in message
    assert browser.js("return document.getElementById('error').hidden") is False


def _shot(browser: WebDriver, tmp_path: Path, name: str) -> Path:
    folder = Path(SHOTS) if SHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    height = browser.js("return document.documentElement.scrollHeight")
    browser.cmd("POST", "/window/rect", {"width": 1400, "height": min(4000, int(height) + 140)})
    shot = browser.screenshot(folder / name)
    browser.cmd("POST", "/window/rect", {"width": 1400, "height": 1100})
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    return shot


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return float(found.group(1))


def _job(server: str, browser: WebDriver) -> dict:
    job_id = browser.js("return new URLSearchParams(location.search).get('job')")
    return httpx.get(f"{server}/api/jobs/{job_id}", trust_env=False).json()


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_shows_volume_score_and_probability(kind, every_kind_server, browser, shared_data, tmp_path):
    server, pairs = every_kind_server, shared_data / "cxr" / "pairs"
    browser.get(server + "/")
    wait_for(lambda: browser.js("return document.getElementById('model').options.length") == 3, "the model list")
    name = browser.js(
        "const s = document.getElementById('model'); const o = [...s.options].find(o => o.value.startsWith(arguments[0] + ':'));"
        "s.value = o.value; s.dispatchEvent(new Event('change')); return s.value", kind
    )
    lateral_shown = browser.js("return document.getElementById('lateral-field').offsetParent !== null")
    assert lateral_shown == (kind != "latent_ddpm")
    browser.send_file("#pa", str(pairs / f"{PAIR}-PA.png"))
    if lateral_shown:
        browser.send_file("#lateral", str(pairs / f"{PAIR}-L.png"))
    if kind == "latent_ddpm":  # the diffusion's controls are on the page; enough steps to watch the bar move
        assert browser.js("return document.getElementById('options').hidden") is False
        browser.js("document.getElementById('opt-sampling_steps').value = 100;"
                   "document.getElementById('opt-guidance_scale').value = 1.5")  # fmt: skip
    browser.click("#submit")
    seen = set()

    def finished():
        seen.add(browser.js("return document.getElementById('stage').textContent"))
        state = browser.js("return document.body.dataset.state")
        return state in ("done", "failed", "error") and state

    state = wait_for(finished, "the reconstruction", polls=3000)
    assert state == "done", browser.js("return document.getElementById('error').textContent")
    job = _job(server, browser)
    assert job["model"] == name and job["bundle"] == kind
    if kind == "latent_ddpm":
        assert job["options"] == {"sampling_steps": 100, "guidance_scale": 1.5, "seed": 0}
        steps = [s for s in seen if "diffusion step" in s]
        assert steps, f"no diffusion progress seen: {sorted(seen)}"
        assert re.search(r"diffusion step \d+/100", steps[0])

    # the volume: three slices at 320 px (32^3 at 10 mm)
    widths_js = "return ['axial','coronal','sagittal'].map(a => Number(document.getElementById('slice-' + a).dataset.loaded || 0))"
    assert wait_for(lambda: all(browser.js(widths_js)) and browser.js(widths_js), "the slices") == [320, 320, 320]
    views = ["pa", "lateral"] if kind != "latent_ddpm" else ["pa"]
    images_js = "return arguments[0].map(i => document.getElementById(i).naturalWidth)"
    ids = [f"{k}-{v}" for v in views for k in ("xray", "drr")]
    assert wait_for(lambda: all(browser.js(images_js, ids)), "the X-rays and DRRs")

    # the DRR-consistency score beside them, the number the API reports; the PE probability
    score = browser.js("return document.getElementById('drr-score').textContent")
    assert _number(r"PSNR (-?[\d.]+) dB", score) == pytest.approx(job["drr_consistency"]["drr_psnr"], abs=0.01)
    assert "mean training CT" in score
    assert browser.js("return document.getElementById('psnr-pa').textContent") != "n/a"
    pe = browser.js("const e = document.getElementById('pe'); return e.hidden ? '' : e.textContent")
    assert _number(r"PE probability ([\d.]+)", pe) == pytest.approx(job["pe"]["probability"], abs=1e-3)

    stage_field = browser.js("return document.getElementById('stage-field').offsetParent !== null")
    assert stage_field == (kind == "progressive_cascade")
    if kind == "progressive_cascade":  # every stage viewable: its slices, DRRs and score
        stages = browser.js("return [...document.getElementById('stage-select').options].map(o => o.value)")
        assert stages == ["stage1", "stage2", "stage3"]
        browser.js("const s = document.getElementById('stage-select'); s.value = 'stage1'; s.dispatchEvent(new Event('change'))")
        assert "stage=stage1" in browser.js("return document.getElementById('slice-axial').src")
        assert "stage=stage1" in browser.js("return document.getElementById('drr-pa').src")
        wait_for(lambda: browser.js("return Number(document.getElementById('slice-axial').dataset.loaded || 0)"),
                 "the stage-1 slice")  # fmt: skip
        stage1 = browser.js("return document.getElementById('drr-score').textContent")
        assert _number(r"PSNR (-?[\d.]+) dB", stage1) == pytest.approx(
            job["stages"][0]["drr_consistency"]["drr_psnr"], abs=0.01
        )
        assert "8 x 8 x 8 voxels" in browser.js("return document.getElementById('geometry').textContent")
    _shot(browser, tmp_path, f"webapp_{kind}.png")


def test_comparison_page_synchronises_slices(every_kind_server, browser, shared_data, tmp_path):
    server, pairs = every_kind_server, shared_data / "cxr" / "pairs"
    browser.get(server + "/compare")
    wait_for(lambda: browser.js("return document.querySelectorAll('.model-choice').length") == 3, "the models")
    browser.send_file("#pa", str(pairs / f"{PAIR}-PA.png"))
    browser.send_file("#lateral", str(pairs / f"{PAIR}-L.png"))
    browser.js("document.getElementById('opt-sampling_steps').value = 5")
    browser.click("#submit")
    state = wait_for(
        lambda: browser.js("const s = document.body.dataset.state; return ['done','failed','error'].includes(s) && s"),
        "the three reconstructions",
        polls=3000,
    )
    assert state == "done", browser.js("return document.getElementById('error').textContent")
    ids = browser.js("return [0, 1, 2].map(k => document.getElementById('column-' + k).querySelector('h3').textContent)")
    assert sorted(i.split(":")[0] for i in ids) == sorted(KINDS)
    for k in range(3):  # each model's DRR-consistency score and PE probability, as the API reports them
        job = httpx.get(f"{server}/api/jobs/{browser.js(f'return jobs[{k}].id')}", trust_env=False).json()
        score = browser.js(f"return document.getElementById('score-{k}').textContent")
        assert _number(r"PSNR (-?[\d.]+) dB", score) == pytest.approx(job["drr_consistency"]["drr_psnr"], abs=0.01)
        pe = browser.js(f"return document.getElementById('pe-{k}').textContent")
        assert _number(r"PE probability ([\d.]+)", pe) == pytest.approx(job["pe"]["probability"], abs=1e-3)
    loaded_js = "return [...document.querySelectorAll('[id^=slice-]')].map(i => Number(i.dataset.loaded || 0))"
    assert wait_for(lambda: (lambda w: len(w) == 9 and all(w))(browser.js(loaded_js)), "nine slices")

    # one axial slider moves every model's axial slice to the same millimetre position
    browser.js("const s = document.getElementById('index-axial'); s.value = 60; s.dispatchEvent(new Event('input'))")
    jobs = json.loads(browser.js("return JSON.stringify(jobs)"))
    for k, job in enumerate(jobs):
        expected = min(job["shape"][2] - 1, max(0, round(60 / job["spacing"][2] + (job["shape"][2] - 1) / 2)))
        src = browser.js(f"return document.getElementById('slice-{k}-axial').src")
        assert f"index={expected}&" in src
    wait_for(lambda: all(browser.js(loaded_js)), "the moved slices")
    _shot(browser, tmp_path, "webapp_compare.png")
