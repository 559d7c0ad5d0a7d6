"""Progressive cascade bundle: configs parse; train (3 stages), evaluate, infer, export through monai.bundle."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import check_anatomy_report
from monai.bundle import ConfigParser, ckpt_export, run, verify_net_in_out
from numerics import network_atol

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "progressive_cascade"
CONFIGS = BUNDLE / "configs"


def _weights(path) -> dict:
    """A checkpoint's model state dict (ignite saves a lone object without the "model" key)."""
    state = torch.load(path, weights_only=True)
    return state.get("model", state)


def _files(*names: str) -> list[str]:
    return [str(CONFIGS / "train.json"), *(str(CONFIGS / n) for n in names), str(CONFIGS / "cpu_tiny.json")]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    from data_prep.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("cascade_bundle_ds")
    make_phantom_dataset(root, n_cases=6, size=32, drr_pixels=32)
    return str(root)


@pytest.mark.parametrize("overlay", [(), ("evaluate.json",), ("inference.json",), ("multi_gpu_train.json",)])
def test_configs_parse(overlay):
    parser = ConfigParser()
    parser.read_config(_files(*overlay))
    parser.parse()
    for key in (
        "training",
        "run",
        "network_def",
        "stage",
        "dataset_dir",
        "bundle_root",
        "output_dir",
        "device",
    ):
        assert key in parser
    if overlay == ("evaluate.json",):
        assert "evaluating" in parser and parser["run"] == "@evaluating"


@pytest.mark.slow
def test_train_three_stages_evaluate_infer_export(dataset_dir, tmp_path):
    root, out = tmp_path / "bundle", tmp_path / "out"
    common = dict(dataset_dir=dataset_dir, bundle_root=str(root), output_dir=str(out), device="cpu")
    models = root / "models"
    for stage in (1, 2, 3):
        run("training", config_file=_files(), stage=stage, **common)
        assert (models / f"stage{stage}_model.pt").is_file() and (models / f"stage{stage}_final.pt").is_file()
    # stage-1 weights are bit-identical after training stages 2 and 3 (loaded from stage 1's best)
    s1 = _weights(models / "stage1_model.pt")
    s3 = _weights(models / "stage3_final.pt")
    frozen = [k for k in s1 if k.startswith(("encoder.", "stages.0."))]
    assert frozen and all(torch.equal(s1[k], s3[k]) for k in frozen)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1 if k.startswith("stages.2."))

    run("evaluating", config_file=_files("evaluate.json"), **{**common, "output_dir": str(out / "eval")})
    report = json.loads((out / "eval" / "metrics_report.json").read_text())
    test_ids = [i["id"] for i in json.loads((Path(dataset_dir) / "dataset.json").read_text())["test"]]
    assert report["split"] == "test" and sorted(report["case_ids"]) == sorted(test_ids) and not report["smoke_test"]
    assert report["baseline"]["name"] == "mean_training_ct"
    for k in (1, 2, 3):  # every stage beside the mean training CT resized to that stage
        assert np.isfinite(report["metrics"][f"ssim_xray2ct_stage{k}"])
        assert f"psnr_xray2ct_stage{k}" in report["baseline"]["metrics"] and f"psnr_xray2ct_stage{k}" in report["difference"]
    assert report["metrics"]["psnr_xray2ct"] == report["metrics"]["psnr_xray2ct_stage3"]
    assert 0 < report["metrics"]["psnr_xray2ct"] < 60 and report["metrics"]["drr_l1"] > 0
    assert "xray2ct" in report["conventions"] and "drr_consistency" in report["conventions"]
    check_anatomy_report(report)  # anatomy metrics, both baselines, intervals
    assert len(list((out / "eval" / "previews").glob("*_preview_stages.png"))) == 2

    case = Path(dataset_dir) / "phantom_000"
    run(
        "inference",
        config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "cpu_tiny.json")],  # inference.json alone
        pa_file=str(case / "pa.nii.gz"),
        lateral_file=str(case / "lateral.nii.gz"),
        case_id="p0",
        **{**common, "output_dir": str(out / "infer")},
    )
    img = nib.load(out / "infer" / "p0_ct.nii.gz")
    spacing = json.loads((Path(dataset_dir) / "dataset.json").read_text())["spacing"]
    assert img.shape == (32, 32, 32) and np.allclose(img.header.get_zooms(), spacing)
    assert nib.load(out / "infer" / "p0_stage1.nii.gz").header.get_zooms() == pytest.approx(
        [4 * s for s in spacing]
    )
    hu = np.asarray(img.dataobj)
    assert hu.min() >= -1024 and hu.max() <= 2048
    assert (out / "infer" / "p0_preview.png").is_file() and (out / "infer" / "p0_axial.gif").is_file()

    ts = tmp_path / "cascade.ts"
    export_args = dict(
        config_file=_files(),
        ckpt_file=str(models / "stage3_model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        key_in_ckpt="model",
    )
    ckpt_export(
        "network_def",
        filepath=str(ts),
        use_trace=True,
        input_shape=[1, 2, 32, 32],
        stage=3,
        **export_args,
        **common,
    )
    scripted = torch.jit.load(str(ts))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    fmt["inputs"]["image"]["spatial_shape"] = [32, 32]
    fmt["outputs"]["pred"]["spatial_shape"] = [32, 32, 32]
    tiny_meta = tmp_path / "metadata_tiny.json"
    tiny_meta.write_text(json.dumps(meta))
    verify_net_in_out("network_def", meta_file=str(tiny_meta), config_file=_files(), stage=3, n=1, **common)
    x = torch.rand(1, 2, 32, 32)
    parser = ConfigParser()
    parser.read_config(_files())
    parser.update({**common, "stage": 3})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(_weights(models / "stage3_model.pt"))
    net.eval()
    with torch.no_grad():
        want = net(x)  # TorchScript may fuse and reorder float32 sums (tests/numerics.py)
        torch.testing.assert_close(scripted(x), want, rtol=0, atol=network_atol(net, want, torch.float32))
