"""PerX2CT tools: batch synthesis CLI (missing views, resume, shards) and the inference server."""

from __future__ import annotations

import contextlib
import csv
import json
import operator
import os
import pickle
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port

from bundles.perx2ct.scripts.inference import PerX2CTInference
from bundles.perx2ct.scripts.networks import PerX2CTNet
from bundles.perx2ct.scripts.server import PerX2CTClient, serve
from bundles.perx2ct.scripts.synthesize import select_part, synthesize
from common.errors import InputError
from common.io import load_volume

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "perx2ct"
TINY_NET = dict(
    volume_size=32, spacing=(12.0,) * 3, image_size=32, feature_res=8, encoder_block="basic",
    encoder_layers=(1, 1), encoder_inplanes=(16, 32), latent_dim=32, pe_multires=6,
    decoder_channels=(16, 32, 32), decoder_res_blocks=1, norm_num_groups=8, attention=False, chunk_size=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def predictor() -> PerX2CTInference:
    torch.manual_seed(0)
    return PerX2CTInference(PerX2CTNet(**TINY_NET), device="cpu")


@pytest.fixture()
def collection(tmp_path, shared_data) -> dict:
    """Indiana-style CSVs: u1 complete, u2 without lateral, u3 with an unreadable frontal, u4 complete."""
    images = tmp_path / "images"
    images.mkdir()
    pairs = shared_data / "cxr" / "pairs"
    shutil.copy(pairs / "pneumocystis-pneumonia-2-PA.png", images / "1_pa.png")
    shutil.copy(pairs / "pneumocystis-pneumonia-2-L.png", images / "1_lat.png")
    shutil.copy(pairs / "covid-19-pneumonia-7-PA.jpg", images / "2_pa.jpg")
    (images / "3_pa.png").write_bytes(b"not a png at all")
    shutil.copy(pairs / "covid-19-pneumonia-7-L.jpg", images / "3_lat.jpg")
    reports = tmp_path / "reports.csv"
    reports.write_text("uid,findings\nu1,a\nu2,b\nu3,c\nu4,d\n")
    proj = tmp_path / "projections.csv"
    rows = [("u1", "1_pa.png", "Frontal"), ("u1", "1_lat.png", "Lateral"), ("u2", "2_pa.jpg", "Frontal"),
            ("u3", "3_pa.png", "Frontal"), ("u3", "3_lat.jpg", "Lateral"),
            ("u4", "2_pa.jpg", "Frontal"), ("u4", "3_lat.jpg", "Lateral")]  # fmt: skip
    proj.write_text("uid,filename,projection\n" + "".join(f"{u},{f},{p}\n" for u, f, p in rows))
    return {"reports": str(reports), "projections": str(proj), "images": str(images), "out": tmp_path / "out"}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_synthesize_skips_missing_views_and_resumes(collection, predictor):
    c = collection
    kw = dict(
        reports_csv=c["reports"], projections_csv=c["projections"], image_dir=c["images"], predictor=predictor
    )
    summary = synthesize(output_dir=str(c["out"]), format="h5", **kw)
    assert summary == {"uids": 4, "written": 2, "already_done": 0, "skipped": 2}
    out = c["out"]
    vol = load_volume(out / "u1_ct.h5")
    assert vol.shape == (32, 32, 32) and np.allclose(vol.spacing, 12.0)
    assert [r["uid"] for r in read_csv(out / "projections_synth.csv")] == ["u1", "u4"]
    assert read_csv(out / "projections_synth.csv")[0]["volume"] == "u1_ct.h5"
    skipped = {r["uid"]: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert set(skipped) == {"u2", "u3"} and "lateral" in skipped["u2"] and "3_pa.png" in skipped["u3"]
    assert json.loads((out / "skipped.json").read_text())[0]["uid"] == "u2"
    assert not list(out.glob("*.part*")) and not (out / "u2_ct.h5").exists()
    mtime = os.path.getmtime(out / "u1_ct.h5")
    again = synthesize(output_dir=str(out), format="h5", **kw)  # resume: nothing recomputed
    assert again["already_done"] == 2 and again["written"] == 0
    assert os.path.getmtime(out / "u1_ct.h5") == mtime
    os.rename(out / "u1_ct.h5", out / "u1_ct_synthetic.h5")  # written before the one writer's naming
    legacy = synthesize(output_dir=str(out), format="h5", **kw)
    assert legacy["already_done"] == 2 and legacy["written"] == 0 and not (out / "u1_ct.h5").exists()
    assert read_csv(out / "projections_synth.csv")[0]["volume"] == "u1_ct_synthetic.h5"
    # a shard of the range [1, 4): uids u2, u3, u4 -> part 1 of 2 is u3 only
    assert select_part(["u1", "u2", "u3", "u4"], 1, 4, 1, 2) == ["u3"]
    part = synthesize(output_dir=str(tmp := out / "shard"), format="npy", start_from=1, end_at=4,
                      part_index=0, total_parts=2, **kw)  # fmt: skip
    assert (
        part["uids"] == 2
        and (tmp / "u4_ct.npy").exists()
        and (tmp / "u4_ct.json").exists()
    )
    assert [r["uid"] for r in read_csv(tmp / "skipped.part0of2.csv")] == ["u2"]


@pytest.mark.slow
def test_synthesize_cli(collection, predictor, tmp_path, repo_root):
    ckpt = tmp_path / "model.pt"
    torch.save({"model": predictor.net.state_dict()}, ckpt)
    configs = str([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "cpu_tiny.json")])
    c = collection
    cmd = [sys.executable, "-m", "bundles.perx2ct.scripts.synthesize", "--reports_csv", c["reports"],
           "--projections_csv", c["projections"], "--image_dir", c["images"], "--output_dir", str(c["out"]),
           "--checkpoint", str(ckpt), "--config_files", configs, "--format", "nii.gz", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in c["out"].glob("*.nii.gz")) == [
        "u1_ct.nii.gz",
        "u4_ct.nii.gz",
    ]
    got = load_volume(c["out"] / "u1_ct.nii.gz")
    pairs = Path(c["images"])
    want = predictor.predict(str(pairs / "1_pa.png"), str(pairs / "1_lat.png"))
    np.testing.assert_allclose(got.array, want.array, atol=1e-3)


def test_synthesize_reports_any_per_uid_error_and_goes_on(collection, predictor, png_bomb):
    """Issue 14 item 5: a 60000 x 60000 PNG (PIL DecompressionBombError) and a crashing decoder are skipped."""
    c = collection
    images = Path(c["images"])
    (images / "bomb.png").write_bytes(png_bomb())
    assert len(png_bomb()) < 100
    with open(c["reports"], "a") as f:
        f.write("ubomb,e\nu5,f\n")
    with open(c["projections"], "a") as f:
        f.write(
            "ubomb,bomb.png,Frontal\nubomb,1_lat.png,Lateral\nu5,1_pa.png,Frontal\nu5,1_lat.png,Lateral\n"
        )
    kw = dict(reports_csv=c["reports"], projections_csv=c["projections"], image_dir=c["images"])
    summary = synthesize(output_dir=str(c["out"]), format="npy", predictor=predictor, **kw)
    assert summary == {"uids": 6, "written": 3, "already_done": 0, "skipped": 3}
    skipped = {r["uid"]: r["reason"] for r in read_csv(c["out"] / "skipped.csv")}
    assert "bomb.png" in skipped["ubomb"] and "pixels" in skipped["ubomb"]
    assert (c["out"] / "u5_ct.npy").exists()  # the uid after the bomb was synthesised
    resumed = synthesize(output_dir=str(c["out"]), format="npy", predictor=predictor, **kw)
    assert resumed == {"uids": 6, "written": 0, "already_done": 3, "skipped": 3}  # no stop at the bomb

    class Flaky:  # any exception type, not only InputError, goes to the skip report
        def infer(self, inputs):
            if "1_pa" in str(inputs["pa"]):
                raise RuntimeError("CUDA error: an illegal memory access (simulated)")
            return predictor.infer(inputs)

    again = synthesize(output_dir=str(c["out"] / "flaky"), format="npy", predictor=Flaky(), **kw)
    assert again["skipped"] == 5 and again["written"] == 1  # u1 and u5 crash, u4 is written
    reasons = json.loads((c["out"] / "flaky" / "skipped.json").read_text())
    assert {r["uid"] for r in reasons} == {"u1", "u2", "u3", "ubomb", "u5"}
    assert any("RuntimeError: CUDA error" in r["reason"] for r in reasons if r["uid"] == "u5")


def test_synthesize_keeps_outputs_inside_output_dir(tmp_path, collection, predictor):
    """Issue 14 item 6: uids ``../../escaped`` and ``sub/dir`` never write outside or into subfolders."""
    c = collection
    out = tmp_path / "deep" / "out"
    uids = ["../../escaped", "sub/dir", "/abs/path", "..", "u1"]
    Path(c["reports"]).write_text("uid\n" + "".join(f"{u}\n" for u in uids))
    Path(c["projections"]).write_text(
        "uid,filename,projection\n" + "".join(f"{u},1_pa.png,Frontal\n{u},1_lat.png,Lateral\n" for u in uids)
    )
    kw = dict(reports_csv=c["reports"], projections_csv=c["projections"], image_dir=c["images"])
    summary = synthesize(output_dir=str(out), format="h5", predictor=predictor, **kw)
    assert summary["written"] == 5 and summary["skipped"] == 0
    assert not (tmp_path / "escaped_ct.h5").exists() and not list(tmp_path.glob("*.h5"))
    assert not [p for p in out.rglob("*") if p.is_dir()]  # no subfolder for "sub/dir"
    rows = read_csv(out / "projections_synth.csv")
    assert [r["uid"] for r in rows] == uids
    names = [r["volume"] for r in rows]
    assert len(set(names)) == 5 and names[-1] == "u1_ct.h5"
    for name in names:  # the CSV names the file that exists, inside output_dir
        assert "/" not in name and (out / name).is_file()
    from bundles.perx2ct.scripts.synthesize import safe_uid_name

    assert safe_uid_name("sub/dir") != safe_uid_name("sub-dir") and safe_uid_name("a.b_c-1") == "a.b_c-1"
    again = synthesize(output_dir=str(out), format="h5", predictor=predictor, **kw)  # resume finds them
    assert again["already_done"] == 5


KEY = "test-key-0123456789abcdef"


@pytest.fixture()
def server(predictor):
    """Start ``serve`` in a thread with the given options; yields its port; shuts it down afterwards."""
    started = []

    def start(**options) -> int:
        port = free_port()
        ready = threading.Event()
        result = {}
        thread = threading.Thread(
            target=lambda: result.update(n=serve(predictor, "127.0.0.1", port, KEY, ready, **options)),
            daemon=True,
        )
        thread.start()
        assert ready.wait(30)
        started.append((port, thread, result))
        return port

    yield start

    def stop(port: int) -> None:
        with contextlib.suppress(OSError, ConnectionError), PerX2CTClient(port=port, authkey=KEY) as c:
            c.shutdown()

    for port, thread, _ in started:
        if thread.is_alive():
            threading.Thread(target=stop, args=(port,), daemon=True).start()
            thread.join(30)


def send_raw(client: PerX2CTClient, data: bytes) -> None:
    """Bytes straight onto an authenticated connection, whatever the transport."""
    conn = client.conn
    (conn.send_bytes if hasattr(conn, "send_bytes") else conn.sendall)(data)


def frame(header, payload: bytes = b"", declared: int | None = None) -> bytes:
    """One wire frame; ``declared`` payload length (default: the payload's) to send the data separately."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(payload) if declared is None else declared
    return b"X2CT" + struct.pack("!IQ", len(text), size) + text + payload


def read_reply(client: PerX2CTClient) -> dict:
    from bundles.perx2ct.scripts.server import CLIENT_LIMITS, read_message

    return read_message(client.conn, CLIENT_LIMITS, 30, 30)


def test_server_serves_clients_and_survives_garbage(predictor, server):
    port = server()
    rng = np.random.default_rng(0)
    pa, lat = rng.random((48, 48), dtype=np.float32), rng.random((48, 48), dtype=np.float32)
    expected = predictor.predict(pa, lat).array
    for _ in range(2):  # several clients in turn, each gets the same answer
        with PerX2CTClient(port=port, authkey=KEY) as client:
            assert client.ping()
            volume, spacing = client.reconstruct(pa, lat)
            assert volume.shape == (32, 32, 32) and volume.dtype == np.float32 and spacing == [12.0] * 3
            np.testing.assert_allclose(volume, expected, atol=1e-5)
            assert (
                client.reconstruct(pa.astype(np.float64), (lat * 65535).astype(np.uint16))[0].shape[0] == 32
            )
    with PerX2CTClient(port=port, authkey=KEY) as client:
        bad = [
            {"frontal": pa},  # a single view
            {"frontal": pa, "lateral": np.zeros((4, 4, 4))},  # wrong shape
            {"frontal": pa, "lateral": np.full((48, 48), np.nan)},
            {"frontal": [1, 2], "lateral": lat},
            {"cmd": "format c:"},
        ]
        for message in bad:
            reply = client.request(message)
            assert reply["ok"] is False and reply["error"], message
        with pytest.raises(InputError, match="NaN"):
            client.reconstruct(pa, np.full((48, 48), np.nan))
        with pytest.raises(TypeError, match="dtype"):  # refused on the client side already
            client.request({"frontal": np.array([["x"] * 8] * 8), "lateral": lat})
        wire = [  # well-framed but wrong: answered, and the connection stays usable
            frame(b"garbage"),
            frame(b"[" * 60000),  # nesting deep enough to overflow a recursive parser
            frame(b"[1, 2]"),
            frame({"arrays": [{"name": "frontal", "dtype": "object", "shape": [2]}]}, b"\0" * 16),
            frame({"arrays": [{"name": "frontal", "dtype": "float32", "shape": [4, 4]}]}, b"\0" * 10),
            frame({"arrays": [{"name": "frontal", "dtype": "uint8", "shape": [-4, -4]}]}, b"\0" * 16),
            frame({"arrays": [{"name": "frontal", "dtype": "uint8", "shape": [4, 4]}] * 2}, b"\0" * 32),
        ]
        for data in wire:
            send_raw(client, data)
            reply = read_reply(client)
            assert reply["ok"] is False and reply["error"], data[:80]
        assert client.ping()
    mid = PerX2CTClient(port=port, authkey=KEY)  # announces 4096 payload bytes, sends 10, hangs up
    spec = {"arrays": [{"name": "x", "dtype": "uint8", "shape": [4096]}]}
    send_raw(mid, frame(spec, b"0" * 10, declared=4096))
    mid.close()
    with PerX2CTClient(port=port, authkey=KEY) as client:  # the server is still there
        assert client.reconstruct(pa, lat)[0].shape == (32, 32, 32)
    with pytest.raises(ConnectionError, match="refused|authentication"):
        PerX2CTClient(port=port, authkey="wrong-key-0123456789", timeout=30)


class Exploit:
    """Unpickling this runs ``os.system``: what any key holder could do to the old pickle protocol."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Divide:
    def __reduce__(self):
        return (operator.truediv, (1, 0))  # ZeroDivisionError while unpickling


def test_server_never_unpickles(server, tmp_path):
    """Issue 14 item 1: pickles (code execution, or one that raises while loading) are inert bytes."""
    port = server()
    marker = tmp_path / "pwned"
    with PerX2CTClient(port=port, authkey=KEY) as client:
        send_raw(client, pickle.dumps(Exploit(marker)))
    with PerX2CTClient(port=port, authkey=KEY) as client:
        send_raw(client, pickle.dumps(Divide()))
    time.sleep(1.0)
    assert not marker.exists(), "the server ran code sent by a client"
    assert within(60, lambda: PerX2CTClient(port=port, authkey=KEY).ping()), "the server died"
    with PerX2CTClient(port=port, authkey=KEY) as client:  # the pickle as a header, then as array data
        send_raw(client, frame(pickle.dumps(Exploit(marker))))
        assert read_reply(client)["ok"] is False
    with PerX2CTClient(port=port, authkey=KEY) as client:
        blob = np.frombuffer(pickle.dumps({"frontal": Exploit(marker)}), np.uint8)
        assert client.request({"frontal": blob, "lateral": blob})["ok"] is False
        assert client.ping()
    assert not marker.exists()


def test_server_refuses_oversized_views_before_allocating(server):
    """Issue 14 item 4: (2, 60000) would be padded to a 13 GiB square; refused, nothing big allocated."""
    port = server()
    lat = np.random.default_rng(1).random((48, 48), dtype=np.float32)
    with PerX2CTClient(port=port, authkey=KEY) as client:
        tracemalloc.start()
        try:
            strip = np.linspace(0, 1, 120000, dtype=np.float32).reshape(2, 60000)  # not blank: really padded
            reply = client.request({"frontal": strip, "lateral": lat})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert reply["ok"] is False and "60000 x 60000" in reply["error"] and "limit" in reply["error"]
        assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB traced"
        # declared in the header only: refused without storing the payload, connection kept
        big = {"arrays": [{"name": "frontal", "dtype": "float32", "shape": [4097, 4097]}]}
        send_raw(client, frame(big, declared=4097 * 4097 * 4))
        send_raw(client, b"\0" * (4097 * 4097 * 4))
        assert "limit" in read_reply(client)["error"]
        assert client.ping()
        # a payload over the byte limit is refused from the 16-byte frame header alone
        huge = {"arrays": [{"name": "frontal", "dtype": "uint8", "shape": [60000, 60000]}]}
        send_raw(client, frame(huge, declared=60000 * 60000)[:16])
        assert "limit" in read_reply(client)["error"]


def within(seconds: float, fn):
    """``fn()`` in a thread; fails when it is still blocked after ``seconds`` (a hung server)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def trickle(port: int) -> PerX2CTClient:
    """An authenticated client that announced 1 MiB of payload, sent 10 bytes and stalls."""
    client = PerX2CTClient(port=port, authkey=KEY)
    send_raw(
        client,
        frame({"arrays": [{"name": "x", "dtype": "uint8", "shape": [1 << 20]}]}, b"0" * 10, declared=1 << 20),
    )
    return client


def test_silent_idle_and_slow_clients_do_not_block_others(server):
    """Issue 14 item 3: a silent TCP connection, an idle client and a trickling upload starve no one."""
    port = server()
    silent = socket.create_connection(("127.0.0.1", port), timeout=30)  # never answers the handshake
    lat = np.random.default_rng(2).random((48, 48), dtype=np.float32)

    def others() -> tuple:
        idle, slow = PerX2CTClient(port=port, authkey=KEY), trickle(port)
        with PerX2CTClient(port=port, authkey=KEY) as client:
            return idle, slow, client.ping(), client.reconstruct(lat, lat)[0].shape

    idle, slow, pong, shape = within(60, others)
    assert pong and shape == (32, 32, 32)
    for stale in (silent, idle.conn, slow.conn):
        stale.close()

    # and they are dropped after their timeouts
    port = server(handshake_timeout=1.0, idle_timeout=2.0, transfer_timeout=3.0)
    silent = socket.create_connection(("127.0.0.1", port), timeout=30)
    idle, slow = PerX2CTClient(port=port, authkey=KEY), trickle(port)
    t0 = time.monotonic()
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := silent.recv(4096):  # the challenge, then EOF once the handshake times out
            received += chunk
    assert received.startswith(b"X2CT") and time.monotonic() - t0 < 20
    for stale in (idle, slow):
        stale.conn.settimeout(30)
        with contextlib.suppress(ConnectionError):
            assert stale.conn.recv(1 << 16) == b""  # closed by the server after its timeout
        stale.close()
    silent.close()


def test_server_cli_refuses_key_on_command_line(predictor, tmp_path, repo_root):
    """Issue 14 item 2: ``--authkey`` (visible in /proc/PID/cmdline) is refused before anything starts."""
    ckpt = tmp_path / "model.pt"
    torch.save({"model": predictor.net.state_dict()}, ckpt)
    configs = str([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "cpu_tiny.json")])
    cmd = [sys.executable, "-m", "bundles.perx2ct.scripts.server", "--authkey", "0123456789abcdef-secret",
           "--port", str(free_port()), "--checkpoint", str(ckpt), "--config_files", configs, "--device", "cpu"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the server started with its key on the command line")
    assert proc.returncode != 0 and "command line" in proc.stderr


def test_server_key_from_environment_or_private_file(tmp_path, monkeypatch):
    from bundles.perx2ct.scripts.server import read_key_file, resolve_key, write_key_file

    monkeypatch.delenv("XRAY2CT_SERVER_KEY", raising=False)
    monkeypatch.delenv("XRAY2CT_SERVER_KEY_FILE", raising=False)
    with pytest.raises(InputError, match="no server key"):
        resolve_key()
    path = write_key_file(tmp_path / "key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(read_key_file(path)) == 64
    with pytest.raises(InputError, match="exists"):
        write_key_file(path)
    monkeypatch.setenv("XRAY2CT_SERVER_KEY_FILE", path)
    assert resolve_key() == read_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(InputError, match="mode 0644"):
        resolve_key()
    monkeypatch.setenv("XRAY2CT_SERVER_KEY", "short")
    with pytest.raises(InputError, match="at least 16"):
        resolve_key()
    monkeypatch.setenv("XRAY2CT_SERVER_KEY", "x" * 32)
    assert resolve_key() == b"x" * 32
