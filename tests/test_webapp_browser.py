"""End to end in headless Chromium: upload a real PA + lateral pair on the page, wait, check the viewer.

Driven through chromedriver's W3C WebDriver HTTP API with httpx (already a web dependency) rather than
selenium, to avoid one more package. Skips when /usr/bin/chromium or /usr/bin/chromedriver is missing
(CI installs them: ``apt-get install -y chromium chromium-driver``). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

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
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1100",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with a random tiny PerX2CT, served by uvicorn on 127.0.0.1 in a thread."""
    import uvicorn

    from webapp.app import create_app
    from webapp.demo_checkpoint import make_random_checkpoint
    from webapp.loaders import load_models

    root = tmp_path_factory.mktemp("webapp_e2e")
    checkpoint = make_random_checkpoint(str(root / "tiny.pt"))
    app = create_app(load_models(checkpoint, "perx2ct", ["cpu_tiny"]), workdir=str(root / "jobs"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


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
