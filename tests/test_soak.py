"""Soak tests on loopback (issue 14): the PerX2CT server and the web app under load and hostile clients.

Each runs the real CLI in a subprocess (tiny random PerX2CT, CPU) and samples its resident memory from
``/proc/<pid>/status`` while clients hammer it. Every good request must be answered correctly, memory must
stay bounded (no growth between the warm-up and the end). Bounded in count and time for CI; scale up by
hand with ``XRAY2CT_SOAK_SCALE=4`` (counts x4) and ``XRAY2CT_SOAK_BIG=1`` (adds four concurrent
8192 x 8192 16-bit PNG uploads). Figures are printed (``pytest -s``) and, with ``XRAY2CT_SOAK_OUT=<dir>``,
written there as JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port
from PIL import Image

pytestmark = pytest.mark.slow
SCALE = float(os.environ.get("XRAY2CT_SOAK_SCALE", "1"))


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()[-3000:] if proc.stderr else proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"port {port} never opened")


class MemorySampler:
    """VmRSS of a process every ``period`` s in a thread; ``peak`` also from the kernel's VmHWM."""

    def __init__(self, pid: int, period: float = 0.1):
        self.pid, self.period, self.samples = pid, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.status("VmRSS"))
            except (OSError, KeyError):
                return
            time.sleep(self.period)

    def now(self) -> int:
        return self.status("VmRSS")

    def stop(self) -> int:
        peak = self.status("VmHWM")
        self._stop.set()
        self._thread.join(5)
        return peak


def run_all(threads: list[threading.Thread], timeout: float = 1800) -> float:
    """Start every thread, wait for all; returns the wall time in seconds."""
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return time.perf_counter() - t0


def report(name: str, figures: dict) -> None:
    print(f"\nSOAK {name}: " + json.dumps(figures))
    out = os.environ.get("XRAY2CT_SOAK_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


MB = 2**20


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    from webapp.demo_checkpoint import make_random_checkpoint

    return make_random_checkpoint(
        str(tmp_path_factory.mktemp("soak") / "tiny.pt"), spacing=(10.0, 10.0, 10.0)
    )


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY2CT_SERVER_KEY")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


# ----------------------------------------------------------------------------------------------- inference server
def test_server_soak(tiny_checkpoint, tmp_path, repo_root):
    from bundles.perx2ct.scripts.server import PerX2CTClient, write_key_file

    n_sequential, n_clients, per_client = int(120 * SCALE), 8, int(15 * SCALE)
    key_file = write_key_file(tmp_path / "server.key")
    bundle = repo_root / "bundles" / "perx2ct" / "configs"
    configs = str([str(bundle / "inference.json"), str(bundle / "cpu_tiny.json")])
    port = free_port()
    cmd = [sys.executable, "-m", "bundles.perx2ct.scripts.server", "--port", str(port),
           "--checkpoint", tiny_checkpoint, "--config_files", configs, "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=repo_root,
        env=child_env(XRAY2CT_SERVER_KEY_FILE=key_file),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, proc)
        assert str(key_file) not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0"))
        memory = MemorySampler(proc.pid)
        rng = np.random.default_rng(0)
        views = [rng.random((48, 40), dtype=np.float32) for _ in range(4)]
        key = Path(key_file).read_text().strip()
        failures: list[str] = []
        answered = [0]
        lock = threading.Lock()

        def good_request(client: PerX2CTClient, i: int) -> None:
            try:
                volume, spacing = client.reconstruct(views[i % 4], views[(i + 1) % 4])
                ok = volume.shape == (32, 32, 32) and np.all(np.isfinite(volume)) and spacing == [10.0] * 3
            except Exception as e:  # counted, not raised: the figure must include every failure
                ok, spacing = False, f"{type(e).__name__}: {e}"
            with lock:
                answered[0] += ok
                if not ok:
                    failures.append(str(spacing))

        # 1. sequential clients, a fresh connection (and handshake) for each request
        t0 = time.perf_counter()
        for i in range(n_sequential):
            with PerX2CTClient(port=port, authkey=key, timeout=120) as client:
                good_request(client, i)
            if i == min(20, n_sequential - 1):
                warm_rss = memory.now()
        sequential_s = time.perf_counter() - t0

        # 2. concurrent clients, with hostile ones connected at the same time
        hostile = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2)]  # silent
        garbage = PerX2CTClient(port=port, authkey=key, timeout=60)
        garbage.conn.sendall(b"\x80\x04" + os.urandom(200))  # a pickle-ish blob: refused, connection closed
        trickle = PerX2CTClient(port=port, authkey=key, timeout=60)
        spec = json.dumps({"arrays": [{"name": "frontal", "dtype": "uint8", "shape": [1 << 20]}]}).encode()
        trickle.conn.sendall(b"X2CT" + struct.pack("!IQ", len(spec), 1 << 20) + spec + b"0" * 100)

        def worker(k: int) -> None:
            with PerX2CTClient(port=port, authkey=key, timeout=300) as client:
                for j in range(per_client):
                    good_request(client, k + j)

        concurrent_s = run_all([threading.Thread(target=worker, args=(k,)) for k in range(n_clients)])
        end_rss = memory.now()
        with PerX2CTClient(port=port, authkey=key, timeout=60) as client:
            client.shutdown()
        peak = memory.stop()
        assert proc.wait(60) == 0
        for s in hostile + [garbage.conn, trickle.conn]:
            s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    requests = n_sequential + n_clients * per_client
    figures = {
        "requests": requests,
        "answered_ok": answered[0],
        "failures": len(failures),
        "sequential_requests": n_sequential,
        "concurrent_clients": n_clients,
        "requests_per_client": per_client,
        "hostile_connections": 4,
        "sequential_s": round(sequential_s, 1),
        "concurrent_s": round(concurrent_s, 1),
        "rss_after_warmup_mb": round(warm_rss / MB, 1),
        "rss_end_mb": round(end_rss / MB, 1),
        "peak_rss_mb": round(peak / MB, 1),
    }
    report("server", figures)
    assert failures == [] and answered[0] == requests, failures[:5]
    assert end_rss - warm_rss < 100 * MB, figures  # no growth with the number of requests
    assert peak < 2048 * MB, figures


# ----------------------------------------------------------------------------------------------- web app
def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def chunked_upload(total: int):
    """A valid start of a multipart upload, then zeros: sent chunked (no Content-Length)."""
    yield b'--XYZ\r\nContent-Disposition: form-data; name="pa"; filename="big.png"\r\n\r\n\x89PNG\r\n\x1a\n'
    for _ in range(total // 65536):
        yield b"\0" * 65536


def test_webapp_soak(tiny_checkpoint, tmp_path, repo_root, png_bomb):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    n_uploads = int(50 * SCALE)
    port = free_port()
    cmd = [sys.executable, "-m", "webapp", "--checkpoint", tiny_checkpoint, "--config", "cpu_tiny",
           "--port", str(port), "--workdir", str(tmp_path / "jobs"), "--max_upload_mb", "20",
           "--max_connections_per_client", "0"]  # fmt: skip  (all these clients share 127.0.0.1)
    proc = subprocess.Popen(
        cmd, cwd=repo_root, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    images = [png_bytes((rng.random((256, 224)) * 255).astype(np.uint8)) for _ in range(4)]
    counts = {"posts": 0, "accepted": 0, "busy_503": 0, "done": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def add(key: str, n: int = 1) -> None:
        with lock:
            counts[key] += n

    def fail(message: str) -> None:
        with lock:
            failures.append(message)

    def client_job(k: int) -> None:
        """Upload a pair (retrying while the server says busy), wait for the volume, fetch a slice."""
        files = {"pa": ("pa.png", images[k % 4]), "lateral": ("lat.png", images[(k + 1) % 4])}
        with httpx.Client(base_url=base, timeout=120, trust_env=False) as http:
            for attempt in range(400):
                response = http.post("/api/jobs", files=files)
                add("posts")
                if response.status_code == 503:
                    add("busy_503")
                    time.sleep(0.2 + 0.05 * (attempt % 10))
                    continue
                break
            if response.status_code != 202:
                return fail(f"upload {k}: {response.status_code} {response.text[:200]}")
            add("accepted")
            job = response.json()["id"]
            for _ in range(3000):
                polled = http.get(f"/api/jobs/{job}")
                status = polled.json()
                if polled.status_code != 200 or status["state"] in ("done", "failed"):
                    break
                time.sleep(0.1)
            if status.get("state") != "done":
                return fail(f"job {k}: {status}")
            png = http.get(f"/api/jobs/{job}/slice/axial")
            if png.status_code != 200 or not png.content.startswith(b"\x89PNG"):
                return fail(f"slice {k}: {png.status_code}")
            add("done")

    def hostile(k: int) -> None:
        """A refused request of each kind; each must get its JSON answer."""
        with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
            cases = [
                (http.post, "/api/jobs", {"files": {"pa": ("b.png", png_bomb()), "lateral": ("l.png", images[0])}}, 400),
                (http.post, "/api/jobs", {"files": {"pa": ("a.png", images[0])}, "headers": {"Origin": "http://evil.example"}}, 403),
                (http.get, "/api/models", {"headers": {"Host": "rebound.evil.example"}}, 400),
                (http.post, "/api/jobs", {"content": chunked_upload(64 * MB),
                                          "headers": {"Content-Type": "multipart/form-data; boundary=XYZ"}}, 413),
            ]  # fmt: skip
            method, url, kwargs, expected = cases[k % len(cases)]
            try:
                response = method(url, **kwargs)
                if response.status_code != expected or not response.json().get("detail"):
                    fail(f"hostile {k}: {response.status_code} {response.text[:200]}")
            except httpx.HTTPError as e:  # the 413 may close the connection while we still send
                if expected != 413:
                    fail(f"hostile {k}: {type(e).__name__}: {e}")

    try:
        wait_for_port(port, proc)
        memory = MemorySampler(proc.pid)
        for k in range(2):  # warm-up: model, page, first jobs
            client_job(100 + k)
        assert failures == [] and counts["done"] == 2, failures
        counts.update(posts=0, accepted=0, busy_503=0, done=0)
        warm_rss = memory.now()
        threads = [threading.Thread(target=client_job, args=(k,)) for k in range(n_uploads)]
        wall = run_all(threads + [threading.Thread(target=hostile, args=(k,)) for k in range(8)])
        end_rss = memory.now()
        peak = memory.status("VmHWM")
        big = {}
        if os.environ.get("XRAY2CT_SOAK_BIG"):
            big = big_uploads(base, httpx, images[0])
            big["peak_rss_after_big_uploads_mb"] = round(memory.status("VmHWM") / MB, 1)
            big["rss_before_big_uploads_mb"] = round(end_rss / MB, 1)
        memory.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    figures = {
        "concurrent_uploads": n_uploads,
        **counts,
        "hostile_requests": 8,
        "failures": len(failures),
        "wall_s": round(wall, 1),
        "rss_after_warmup_mb": round(warm_rss / MB, 1),
        "rss_end_mb": round(end_rss / MB, 1),
        "peak_rss_mb": round(peak / MB, 1),
        **big,
    }
    report("webapp", figures)
    assert failures == [] and counts["done"] == n_uploads, (failures[:5], figures)
    assert end_rss - warm_rss < 300 * MB, figures
    assert peak < 3072 * MB, figures


def big_uploads(base: str, httpx, lateral: bytes, n: int = 4) -> dict:
    """Item 11's attack: ``n`` concurrent uploads of 16-bit 8192 x 8192 PNGs (each 0.6 MB)."""
    side = 8192
    ramp = np.add.outer(np.arange(side, dtype=np.uint32), np.arange(side, dtype=np.uint32)) * 7 % 65536
    data = png_bytes(ramp.astype(np.uint16))
    del ramp
    codes: list[int] = []

    def upload() -> None:
        with httpx.Client(base_url=base, timeout=1800, trust_env=False) as http:
            files = {"pa": ("big.png", data), "lateral": ("l.png", lateral)}
            codes.append(http.post("/api/jobs", files=files).status_code)

    run_all([threading.Thread(target=upload) for _ in range(n)])
    return {"big_uploads": n, "big_upload_bytes": len(data), "big_upload_codes": sorted(codes)}


# ----------------------------------------------------------------------------------------------- slow headers
def open_files_limit(n: int):
    """``preexec_fn`` for the server: its open-file limit, as in issue 23's attack (256)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def test_webapp_survives_slow_header_attack(tiny_checkpoint, tmp_path, repo_root):
    """Issue 23 item 5: 260 connections that never finish their headers, under an open-file limit of 256.

    Before, they exhausted the file descriptors (accept failed with EMFILE) and good requests timed out. The
    attacker (127.0.0.2) opens ``n_slow`` connections, drips a header line into each every 0.5 s and reopens
    every one the server closes, for ``attack_s`` seconds; meanwhile a good client (127.0.0.1) sends requests
    one after another, each on a new connection. Every good request must be answered 200 well within its
    10 s timeout; the attacker keeps at most ``--max_connections_per_client`` sockets, each for at most
    ``--head_timeout`` s.
    """
    import selectors

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    n_slow, attack_s, head_timeout, per_client, fd_limit = int(260 * SCALE), 10.0 * SCALE, 2.0, 8, 256
    port = free_port()
    cmd = [sys.executable, "-m", "webapp", "--checkpoint", tiny_checkpoint, "--config", "cpu_tiny",
           "--port", str(port), "--workdir", str(tmp_path / "jobs"), "--head_timeout", str(head_timeout),
           "--max_connections_per_client", str(per_client)]  # fmt: skip
    log_path = tmp_path / "server.log"  # a file: a pipe nobody reads would block the server once full
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=repo_root, env=child_env(), stdout=subprocess.DEVNULL, stderr=log_file,
            preexec_fn=open_files_limit(fd_limit),
        )  # fmt: skip
    counts = {"opened": 0, "refused_503": 0, "closed_408": 0, "closed_other": 0, "connect_errors": 0}
    most_fds, latencies, statuses = [0], [], []
    stop = threading.Event()

    def open_one(selector) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind(("127.0.0.2", 0))
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_READ)
            counts["opened"] += 1
        except OSError:
            counts["connect_errors"] += 1
            sock.close()

    def attacker() -> None:
        selector = selectors.DefaultSelector()
        for _ in range(n_slow):
            open_one(selector)
        started, next_drip = time.monotonic(), 0.0
        while time.monotonic() - started < attack_s:
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                try:
                    answer = sock.recv(4096)
                except OSError:
                    answer = b""
                kind = {b"HTTP/1.1 503": "refused_503", b"HTTP/1.1 408": "closed_408"}.get(answer[:12])
                counts[kind or "closed_other"] += 1
                selector.unregister(sock)
                sock.close()
                if counts["opened"] < 20 * n_slow:
                    open_one(selector)  # keep the pressure up: every refused or closed one comes back
            if time.monotonic() >= next_drip:
                next_drip = time.monotonic() + 0.5
                for key in list(selector.get_map().values()):
                    with contextlib.suppress(OSError):  # not connected yet, or closed meanwhile
                        sent = key.data or 0
                        key.fileobj.send(HEAD if sent == 0 else b"X-Slow-%d: y\r\n" % sent)
                        selector.modify(key.fileobj, selectors.EVENT_READ, sent + 1)
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()

    def watch_fds() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                most_fds[0] = max(most_fds[0], len(os.listdir(f"/proc/{proc.pid}/fd")))
            time.sleep(0.1)

    try:
        wait_for_port(port, proc)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/api/models", timeout=60, trust_env=False).status_code == 200  # warm
        memory = MemorySampler(proc.pid)
        threads = [threading.Thread(target=attacker), threading.Thread(target=watch_fds, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the attack is in place
        while threads[0].is_alive():
            t0 = time.perf_counter()
            try:
                statuses.append(httpx.get(base + "/api/models", timeout=10, trust_env=False).status_code)
            except httpx.HTTPError as e:
                statuses.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
        threads[0].join(60)
        stop.set()
        peak = memory.stop()
        alive = proc.poll() is None
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = log_path.read_text(errors="replace")
    ok = sum(s == 200 for s in statuses)
    figures = {
        "slow_connections": n_slow,
        "attack_s": attack_s,
        "open_file_limit": fd_limit,
        **{f"attacker_{k}": v for k, v in counts.items()},
        "server_fds_max": most_fds[0],
        "good_requests": len(statuses),
        "good_answered_200": ok,
        "good_latency_median_ms": round(1000 * float(np.median(latencies)), 1) if latencies else None,
        "good_latency_max_ms": round(1000 * max(latencies), 1) if latencies else None,
        "peak_rss_mb": round(peak / MB, 1),
    }
    report("webapp_slow_headers", figures)
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
    assert alive, figures
    assert statuses and ok == len(statuses), ([s for s in statuses if s != 200][:5], figures)
    assert max(latencies) < 5.0, figures  # half the client's timeout; EMFILE made them time out
    assert counts["refused_503"] >= n_slow - per_client, figures  # the per-client cap
    assert counts["closed_408"] >= 1, figures  # the head deadline
    assert most_fds[0] < fd_limit, figures


HEAD = b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
