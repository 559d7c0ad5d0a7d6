"""PerX2CT bundle end to end on phantom data: configs parse, train/evaluate/infer via `monai.bundle run`,
TorchScript export, verify_net_in_out, the Python API on real radiographs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import check_anatomy_report
from monai.bundle import ConfigParser
from numerics import network_atol

from common.checkpoint import network_state, read_checkpoint, read_record
from common.io import load_volume

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "perx2ct"
CONFIGS = BUNDLE / "configs"
TINY = str(CONFIGS / "cpu_tiny.json")


def cfg(*names: str) -> str:
    return str([str(CONFIGS / n) for n in names] + [TINY])


def bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """8 phantom cases, 32^3 at 12 mm, 32 px DRRs with the PerX2CT camera (data_prep's dataset layout)."""
    from data_prep.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("perx2ct_data")
    make_phantom_dataset(root, n_cases=8, size=32, drr_pixels=32, geometry="perx2ct")
    return root


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory, repo_root) -> dict:
    root = tmp_path_factory.mktemp("perx2ct_bundle")
    out = root / "out"
    common = ["--dataset_dir", str(dataset), "--bundle_root", str(root), "--output_dir", str(out)]
    bundle("run", "training", "--config_file", cfg("train.json"), *common, cwd=repo_root)
    return {"root": root, "out": out, "args": common}


@pytest.mark.parametrize(
    "files,ids",
    [
        (["train.json"], ["training", "run", "validate#evaluator"]),
        (["train.json", "evaluate.json"], ["evaluating", "validate#handlers"]),
        (["inference.json"], ["inference", "run", "predictor"]),
        (["train.json", "multi_gpu_train.json"], ["initialize", "finalize", "train#sampler", "network"]),
    ],
)
def test_configs_parse(files, ids, dataset):
    for overlay in ([], [TINY]):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files] + overlay)
        parser["dataset_dir"] = str(dataset)
        for i in ids:
            assert i in parser, i
        if "train.json" in files and "multi_gpu_train.json" not in files:
            net = parser.get_parsed_content("network_def") if overlay else None
            if net is not None:
                assert net.volume_size == 32 and net.spacing == (12.0, 12.0, 12.0)
                assert net.geometry.sad == 700.0  # read from the dataset's geometry
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] == [128, 128, 128]


@pytest.mark.slow
def test_train_evaluate_infer(trained, dataset, repo_root):
    root, out = trained["root"], trained["out"]
    models = sorted(p.name for p in (root / "models").iterdir())
    assert "model.pt" in models and "model_final.pt" in models
    path = str(root / "models" / "model.pt")
    state = network_state(read_checkpoint(path), path)  # the one reader (perx2ct's own wrapper is gone)
    assert state["spacing_mm"].tolist() == [12.0, 12.0, 12.0]
    record = read_record(root / "models" / "model.pt")
    assert record["bundle"] == "perx2ct" and record["inputs"]["spacing"] == [12.0, 12.0, 12.0]
    assert record["network_def"]["volume_size"] == 32 and record["inputs"]["geometry"]["sad"] == 700.0
    assert any((out / "runs").iterdir())  # TensorBoard events

    bundle(
        "run",
        "evaluating",
        "--config_file",
        cfg("train.json", "evaluate.json"),
        *trained["args"],
        cwd=repo_root,
    )
    report = json.loads((out / "metrics_report.json").read_text())
    for key in (
        "psnr_xray2ct",
        "ssim_xray2ct",
        "mae_hu",
        "psnr_x2ctgan",
        "psnr_axial_x2ctgan",
        "psnr_coronal_x2ctgan",
    ):
        assert np.isfinite(report["metrics"][key]), key
    test_items = json.loads((dataset / "dataset.json").read_text())["test"]
    assert report["n_cases"] == len(test_items) and report["split"] == "test"
    assert sorted(report["case_ids"]) == sorted(i["id"] for i in test_items) and not report["smoke_test"]
    assert report["baseline"]["name"] == "mean_training_ct" and "psnr_xray2ct" in report["difference"]
    assert {"drr_l1", "drr_psnr_pa", "drr_psnr_lateral"} <= set(report["metrics"])
    assert "x2ctgan" in report["conventions"] and report["metrics"]["mae_hu"] > 0
    check_anatomy_report(report)  # anatomy metrics, both baselines, intervals

    inf_out = root / "inference"
    args = ["--dataset_dir", str(dataset), "--bundle_root", str(root), "--output_dir", str(inf_out)]
    bundle("run", "inference", "--config_file", cfg("inference.json"), *args, cwd=repo_root)
    vols = sorted(inf_out.glob("*_ct.nii.gz"))
    assert vols and (inf_out / vols[0].name.replace("_ct.nii.gz", "_preview.png")).exists()
    vol = load_volume(vols[0])
    assert vol.shape == (32, 32, 32) and np.allclose(vol.spacing, 12.0) and vol.orientation == "RAS"
    assert -1024.0 <= vol.array.min() and vol.array.max() <= 2048.0
    assert np.allclose(vol.origin, -15.5 * 12.0)  # centred on the isocenter


@pytest.mark.slow
def test_resume_continues_from_the_final_checkpoint(trained, dataset, tmp_path, repo_root):
    """perx2ct could not resume before: --resume_from restores model, optimizer and trainer state."""
    import shutil

    from common.checkpoint import read_record

    root = tmp_path / "bundle"
    shutil.copytree(trained["root"] / "models", root / "models")
    before = read_record(root / "models" / "model_final.pt")["progress"]["iteration"]
    args = ["--dataset_dir", str(dataset), "--bundle_root", str(root), "--output_dir", str(tmp_path / "out")]
    bundle("run", "training", "--config_file", cfg("train.json"), *args, "--max_epochs", "3",
           "--resume_from", str(root / "models" / "model_final.pt"), cwd=repo_root)  # fmt: skip
    after = read_record(root / "models" / "model_final.pt")["progress"]
    assert after["epoch"] == 3 and after["iteration"] == before * 3 // 2  # 2 epochs restored + 1 run


@pytest.mark.slow
def test_export_and_verify(trained, dataset, tmp_path, repo_root):
    root = trained["root"]
    ts = tmp_path / "model.ts"
    bundle(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(root / "models" / "model.pt"),
        "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", cfg("inference.json"),
        "--bundle_root", str(root), "--dataset_dir", str(dataset), "--use_trace", "True", "--key_in_ckpt", "model",
        "--input_shape", "[1, 2, 32, 32]", cwd=repo_root,
    )  # fmt: skip
    scripted = torch.jit.load(str(ts))
    from bundles.perx2ct.scripts.inference import PerX2CTInference

    api = PerX2CTInference.from_bundle(
        str(BUNDLE), str(root / "models" / "model.pt"), [str(CONFIGS / "inference.json"), TINY]
    )
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        want = api.net(x)  # TorchScript may fuse and reorder float32 sums (tests/numerics.py)
        torch.testing.assert_close(scripted(x), want, rtol=0, atol=network_atol(api.net, want, torch.float32))

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = [32, 32]
    meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] = [32, 32, 32]
    tiny_meta = tmp_path / "metadata.json"
    tiny_meta.write_text(json.dumps(meta))
    bundle(
        "verify_net_in_out", "network_def", "--meta_file", str(tiny_meta), "--config_file", cfg("inference.json"),
        "--bundle_root", str(root), "--dataset_dir", str(dataset), "--n", "1", cwd=repo_root,
    )  # fmt: skip


@pytest.mark.slow
def test_api_on_real_radiographs(trained, shared_data, tmp_path):
    from bundles.perx2ct.scripts.inference import PerX2CTInference
    from common.predictor import write_prediction

    root = trained["root"]
    api = PerX2CTInference.from_bundle(
        str(BUNDLE), str(root / "models" / "model.pt"), [str(CONFIGS / "inference.json"), TINY]
    )
    pairs = shared_data / "cxr" / "pairs"
    for pa in sorted(pairs.glob("*-PA.*")):
        lateral = next(pairs.glob(pa.name.replace("-PA.", "-L.").rsplit(".", 1)[0] + ".*"))
        vol = api.predict(str(pa), str(lateral))
        assert vol.shape == (32, 32, 32) and np.allclose(vol.spacing, 12.0)
        assert np.isfinite(vol.array).all()
        x = api.preprocess(str(pa), str(lateral))
        assert x.shape == (1, 2, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        files = write_prediction(api.infer({"pa": str(pa), "lateral": str(lateral)}), tmp_path, pa.stem)
        assert [os.path.basename(files[k]) for k in ("ct", "preview", "gif")] == [
            f"{pa.stem}_ct.nii.gz", f"{pa.stem}_preview.png", f"{pa.stem}_axial.gif"]  # the one naming
        assert all(os.path.getsize(f) > 0 for f in files.values())
    # arrays work too, and a single view is refused with a clear error
    vol = api.predict(np.random.rand(40, 40), np.random.rand(40, 40).astype(np.float32))
    assert vol.shape == (32, 32, 32)
    from common.errors import InputError

    with pytest.raises(InputError, match="both"):
        api.predict(np.random.rand(40, 40), None)
