"""The GPU suite (benchmarks/gpu_suite.py, bin/gpu_suite.sh): dry run of every item on CPU, fail-soft runner.

The dry run runs under an import blocker for the packages the lent GPU machine lacks and that the suite does not
carry as wheels (itk, pydicom, the web stack), so an import of one of them anywhere on the
suite's path fails here as it would there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
# Not on the GPU machine's image and not carried by bin/gpu_suite.sh (monai, nibabel, fire, termcolor are).
ABSENT_THERE = ("itk", "pydicom", "fastapi", "uvicorn", "multipart", "python_multipart")


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocking_env(tmp_path: Path) -> dict:
    """Environment whose Pythons cannot import ABSENT_THERE (a sitecustomize on PYTHONPATH)."""
    folder = tmp_path / "blocker"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            class _Absent:
                names = {ABSENT_THERE!r}

                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in self.names:
                        raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
                    return None

            sys.meta_path.insert(0, _Absent())
            """
        )
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)
    return env


def test_blocker_blocks(tmp_path):
    env = _blocking_env(tmp_path)
    res = subprocess.run([sys.executable, "-c", "import pydicom"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "absent on the GPU machine" in res.stderr


@pytest.mark.slow
def test_dry_run_runs_every_item(tmp_path, example_ct):
    """The whole suite on CPU at tiny sizes: every item succeeds and reports its figures."""
    out = tmp_path / "suite.json"
    res = subprocess.run(
        [sys.executable, str(SUITE), "--dry_run", "--out", str(out), "--log_dir", str(tmp_path / "logs")],
        env=_blocking_env(tmp_path), capture_output=True, text=True, cwd=tmp_path, timeout=1500,
    )  # fmt: skip
    report = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in report["items"].items() if v["status"] != "ok"}
    assert res.returncode == 0 and not failed, (failed, res.stdout[-3000:], res.stderr[-3000:])
    suite = _load_suite()
    assert list(report["items"]) == list(suite.ITEMS)
    assert report["dry_run"] is True
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["packages"]["monai"] and env["python"]
    assert env["source_digest"] == suite.source_digest()  # the code the figures came from
    for name, item in report["items"].items():
        assert item["summary"], name
        assert item["params"] == suite.PARAMS[name]["dry_run"]
        assert not set(item["third_party_modules"]) & set(ABSENT_THERE), name
        assert name in res.stdout  # the printed table
    items = report["items"]
    drr = {(r["method"], r["size"]): r for r in items["drr"]["drr_report"]["results"]}
    assert drr[("xray2ct", 32)]["seconds"] > 0 and drr[("siddon", 32)]["seconds"] > 0
    assert drr[("xray2ct", 32)]["rel_diff_vs_siddon"] < 0.05
    vq = {(r["precision"], r["method"]) for r in items["vqgan_sliding_window"]["runs"]}
    assert {("bf16", "network_only"), ("bf16", "monai_gaussian"), ("fp32", "monai_gaussian")} <= vq
    perx = {r["chunk_size"]: r for r in items["perx2ct"]["rows"]}
    assert 1 in perx and len(perx) >= 2
    assert max(r["max_abs_diff_vs_slice_loop"] for r in perx.values()) < 1e-4
    samplers = {r["sampler"] for r in items["latent_ddpm"]["rows"]}
    assert samplers == {"ddim", "ddpm"}
    off, on = items["cascade_memory"]["report"]["rows"]
    assert on["saved_mib"] < off["saved_mib"]
    assert {r["mode"] for r in items["pe_classifier"]["rows"]} == {"inference", "training"}
    from benchmarks.full_size import CASES

    trained = {(r["bundle"], r["network"]): r for r in items["full_size_training"]["rows"]}
    assert set(trained) == {(c.bundle, c.network_id) for c in CASES if c.backward}
    assert all(r["samples_per_s"] > 0 and "error" not in r for r in trained.values())


def test_failing_item_is_recorded(tmp_path):
    """An item that raises is reported with its error; the runner itself carries on."""
    suite = _load_suite()
    entry = suite.run_item_process("no_such_item", "cpu", True, 120, tmp_path)
    assert entry["status"] == "error"
    assert "KeyError" in entry["error"] and "no_such_item" in entry["error"]


def test_item_past_its_budget_is_killed(tmp_path):
    """The backstop: an item still running at budget + 15 s is killed and reported as a timeout."""
    suite = _load_suite()
    entry = suite.run_item_process("pe_classifier", "cpu", True, -14.0, tmp_path)  # 1 s: not even torch loads
    assert entry["status"] == "timeout" and entry["exit_code"] is None
    assert "budget" in entry["error"]


def test_measurement_over_budget_is_skipped(tmp_path):
    suite = _load_suite()
    ctx = suite.ItemContext("latent_ddpm", "cpu", True, {}, 10.0, str(tmp_path / "r.json"))
    assert ctx.fits("cheap", 1.0)
    assert not ctx.fits("DDPM-1000", 100.0)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [s["what"] for s in saved["skipped"]] == ["DDPM-1000"]


def test_unknown_item_is_rejected():
    res = subprocess.run([sys.executable, str(SUITE), "--items", "drr,nope"], capture_output=True, text=True)
    assert res.returncode == 2 and "nope" in res.stderr


def test_real_run_needs_a_gpu(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = subprocess.run(
        [sys.executable, str(SUITE), "--out", str(tmp_path / "x.json")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "no CUDA device" in res.stderr
    assert not (tmp_path / "x.json").exists()


def _dummy_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (what --fetch puts in .whl/), built without network."""
    folder.mkdir(parents=True)
    wheel = folder / "xray2ct_dummy-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("xray2ct_dummy/__init__.py", "VALUE = 42\n")
        z.writestr(
            "xray2ct_dummy-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: xray2ct-dummy\nVersion: 1.0\n",
        )
        z.writestr(
            "xray2ct_dummy-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(
            "xray2ct_dummy-1.0.dist-info/RECORD",
            "xray2ct_dummy/__init__.py,,\nxray2ct_dummy-1.0.dist-info/METADATA,,\n"
            "xray2ct_dummy-1.0.dist-info/WHEEL,,\nxray2ct_dummy-1.0.dist-info/RECORD,,\n",
        )
    (folder / "cache").mkdir()
    return wheel


def test_shell_installs_carried_wheels_without_network(tmp_path):
    """bin/gpu_suite.sh installs the carried wheels offline into a private folder first on PYTHONPATH and points
    the example-data cache at the carried copy."""
    wheels = tmp_path / "wheels"
    _dummy_wheel(wheels)
    site = tmp_path / "site"
    env = dict(os.environ, PYTHON=sys.executable, XRAY2CT_INSTALL_WHEELS="1", XRAY2CT_WHEELS=str(wheels),
               XRAY2CT_SITE=str(site), PIP_NO_INDEX="1")  # fmt: skip
    env.pop("XRAY2CT_CACHE", None)
    res = subprocess.run(["bash", str(REPO / "bin" / "gpu_suite.sh"), "--help"], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (site / "xray2ct_dummy" / "__init__.py").is_file()
    assert "installing xray2ct_dummy-1.0-py3-none-any.whl" in res.stdout
    assert "--dry_run" in res.stdout  # the suite's --help ran after the install


def test_shell_without_wheels_says_what_to_do(tmp_path):
    env = dict(
        os.environ, PYTHON=sys.executable, XRAY2CT_INSTALL_WHEELS="1", XRAY2CT_WHEELS=str(tmp_path / "none")
    )
    res = subprocess.run(["bash", str(REPO / "bin" / "gpu_suite.sh"), "--dry_run"], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "--fetch" in res.stderr
