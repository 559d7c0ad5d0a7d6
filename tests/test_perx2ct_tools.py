"""PerX2CT tools: batch synthesis CLI (missing views, resume, shards) and the inference server."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

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
    vol = load_volume(out / "u1_ct_synthetic.h5")
    assert vol.shape == (32, 32, 32) and np.allclose(vol.spacing, 12.0)
    assert [r["uid"] for r in read_csv(out / "projections_synth.csv")] == ["u1", "u4"]
    assert read_csv(out / "projections_synth.csv")[0]["volume"] == "u1_ct_synthetic.h5"
    skipped = {r["uid"]: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert set(skipped) == {"u2", "u3"} and "lateral" in skipped["u2"] and "3_pa.png" in skipped["u3"]
    assert json.loads((out / "skipped.json").read_text())[0]["uid"] == "u2"
    assert not list(out.glob("*.part*")) and not (out / "u2_ct_synthetic.h5").exists()
    mtime = os.path.getmtime(out / "u1_ct_synthetic.h5")
    again = synthesize(output_dir=str(out), format="h5", **kw)  # resume: nothing recomputed
    assert again["already_done"] == 2 and again["written"] == 0
    assert os.path.getmtime(out / "u1_ct_synthetic.h5") == mtime
    # a shard of the range [1, 4): uids u2, u3, u4 -> part 1 of 2 is u3 only
    assert select_part(["u1", "u2", "u3", "u4"], 1, 4, 1, 2) == ["u3"]
    part = synthesize(output_dir=str(tmp := out / "shard"), format="npy", start_from=1, end_at=4,
                      part_index=0, total_parts=2, **kw)  # fmt: skip
    assert (
        part["uids"] == 2
        and (tmp / "u4_ct_synthetic.npy").exists()
        and (tmp / "u4_ct_synthetic.json").exists()
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
        "u1_ct_synthetic.nii.gz",
        "u4_ct_synthetic.nii.gz",
    ]
    got = load_volume(c["out"] / "u1_ct_synthetic.nii.gz")
    pairs = Path(c["images"])
    want = predictor.predict(str(pairs / "1_pa.png"), str(pairs / "1_lat.png"))
    np.testing.assert_allclose(got.array, want.array, atol=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_serves_clients_in_turn_and_survives_garbage(predictor):
    port, key = free_port(), "test-key"
    ready = threading.Event()
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(n=serve(predictor, "127.0.0.1", port, key, ready)), daemon=True
    )
    thread.start()
    assert ready.wait(30)
    rng = np.random.default_rng(0)
    pa, lat = rng.random((48, 48), dtype=np.float32), rng.random((48, 48), dtype=np.float32)
    expected = predictor.predict(pa, lat).array

    for _ in range(2):  # several clients in turn, each gets the same answer
        with PerX2CTClient(port=port, authkey=key) as client:
            assert client.ping()
            volume, spacing = client.reconstruct(pa, lat)
            assert volume.shape == (32, 32, 32) and spacing == [12.0, 12.0, 12.0]
            np.testing.assert_allclose(volume, expected, atol=1e-5)

    with PerX2CTClient(port=port, authkey=key) as client:
        bad = [
            "garbage",
            {"frontal": pa},  # a single view
            {"frontal": pa, "lateral": np.zeros((4, 4, 4))},  # wrong shape
            {"frontal": pa, "lateral": np.full((48, 48), np.nan)},
            {"frontal": pa, "lateral": np.array([["x"] * 8] * 8)},  # wrong dtype
            {"frontal": [1, 2], "lateral": lat},
        ]
        for message in bad:
            reply = client.request(message)
            assert reply["ok"] is False and reply["error"], message
        with pytest.raises(InputError, match="NaN"):
            client.reconstruct(pa, np.full((48, 48), np.nan))
        client.conn.send_bytes(b"\x80\x04truncated pickle")
        assert client.conn.recv()["ok"] is False

    mid = PerX2CTClient(port=port, authkey=key)  # announces 4096 bytes, sends 10, hangs up
    mid.conn._send(struct.pack("!i", 4096) + b"0123456789")
    mid.close()
    with PerX2CTClient(port=port, authkey=key) as client:  # the server is still there
        volume, _ = client.reconstruct(pa, lat)
        assert volume.shape == (32, 32, 32)
        client.shutdown()
    thread.join(30)
    assert not thread.is_alive() and result["n"] >= 10
