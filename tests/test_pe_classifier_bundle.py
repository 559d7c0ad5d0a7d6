"""pe_classifier bundle: configs parse, networks/export, and train -> evaluate -> compare -> infer on phantoms."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out
from monai.bundle import run as bundle_run

from bundles.pe_classifier.scripts import data, networks
from bundles.pe_classifier.scripts.compare_reports import compare
from common.checkpoint import read_record
from common.classification_metrics import roc_auc
from common.errors import InputError
from common.io import load_volume, save_volume

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "pe_classifier"
CONFIGS = BUNDLE / "configs"
TINY = str(CONFIGS / "cpu_tiny.json")


def cfg(*names: str) -> list[str]:
    return [str(CONFIGS / n) for n in names] + [TINY]


def run(run_id: str, configs: list[str], **override) -> None:
    bundle_run(run_id, config_file=configs, meta_file=str(CONFIGS / "metadata.json"), **override)


def test_every_config_parses():
    for files, ids in [
        (cfg("train.json"), ["training", "run", "initialize", "train#trainer", "validate#evaluator"]),
        (cfg("train.json", "evaluate.json"), ["evaluating", "run", "calibration#evaluator", "write_report"]),
        (cfg("inference.json"), ["run", "evaluator", "collector"]),
        (
            cfg("train.json", "multi_gpu_train.json"),
            ["training", "run", "initialize", "finalize", "train#sampler"],
        ),
    ]:
        parser = ConfigParser()
        parser.read_config(files)
        parser.read_meta(str(CONFIGS / "metadata.json"))
        for key in ids:
            assert key in parser, f"{key} missing from {files}"
        assert parser.get_parsed_content("network_def#ct_width") == 0.125
    parser = ConfigParser()
    parser.read_config(cfg("train.json", "multi_gpu_train.json"))
    assert parser["network"]["_target_"].endswith("DistributedDataParallel")
    assert parser["train#dataloader#shuffle"] is False
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [128, 128, 128]


@pytest.mark.parametrize("modality", ["ct", "xray", "fusion"])
def test_network_shapes_and_torchscript(modality):
    net = networks.build_pe_classifier(modality, "resnet10", "densenet121", 0.125, 0.125).eval()
    ct, xr = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32)
    args = {"ct": (ct,), "xray": (xr,), "fusion": (ct, xr)}[modality]
    with torch.no_grad():
        out = net(*args)
        assert out.shape == (2, 1)
        torch.testing.assert_close(torch.jit.script(net)(*args), out)


def test_local_pretrained_weights(tmp_path):
    src, _ = networks.build_encoder("resnet10", 3, 1, 0.125)
    path = tmp_path / "medicalnet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst, _ = networks.build_encoder("resnet10", 3, 1, 0.125, pretrained_path=str(path))
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)
    with pytest.raises(InputError, match="not found"):
        networks.build_encoder("resnet10", 3, 1, 0.125, pretrained_path=str(tmp_path / "none.pth"))


def test_class_balance_and_generated_matching(tmp_path):
    items = [{"id": f"case_{i}", "label": int(i == 0)} for i in range(4)]
    assert data.positive_weight(items, "loss").item() == pytest.approx(3.0)
    assert data.positive_weight(items, "none") is None
    sampler = data.balanced_sampler(items * 50, "sampler", seed=0)
    drawn = [items[i % 4]["label"] for i in sampler]
    assert abs(np.mean(drawn) - 0.5) < 0.1
    for name in ("case_1_fake.h5", "case_10.nii.gz", "case_1.json"):
        (tmp_path / name).write_text("")
    assert data.find_generated(str(tmp_path), "case_1").endswith("case_1_fake.h5")
    assert data.find_generated(str(tmp_path), "case_10").endswith("case_10.nii.gz")
    with pytest.raises(InputError, match="no generated volume"):
        data.with_generated([{"id": "case_2", "ct": "x"}], str(tmp_path))


@pytest.fixture(scope="module")
def trained(phantom_pairs, tmp_path_factory) -> dict:
    """The tiny CT model trained for 2 epochs on the 8 phantom pairs (shared by the tests below)."""
    root = tmp_path_factory.mktemp("pe_bundle")
    run(
        "training",
        cfg("train.json"),
        dataset_dir=str(phantom_pairs["root"]),
        bundle_root=str(root),
        output_dir=str(root / "out"),
    )
    return {"root": root, "dataset": phantom_pairs["root"]}


def test_training_writes_checkpoints_and_logs(trained):
    models = os.listdir(trained["root"] / "models")
    assert {"model.pt", "model_final.pt"} <= set(models)
    # ignite's Checkpoint stores a one-entry save_dict ({"model": net}) as the bare state dict
    best = torch.load(trained["root"] / "models" / "model.pt", weights_only=True)
    assert best["model"]["head.1.weight"].shape == (1, 64) and set(best) == {"model", "record"}
    final = torch.load(trained["root"] / "models" / "model_final.pt", weights_only=True)
    assert set(final) == {"model", "optimizer", "trainer", "record"}
    record = read_record(trained["root"] / "models" / "model_final.pt")
    assert record["inputs"]["modality"] == "ct" and record["progress"]["iteration"] > 0
    assert any(n.startswith("events.out") for n in os.listdir(trained["root"] / "out" / "runs"))


def test_evaluate_real_and_generated_then_compare(trained, tmp_path, capsys):
    common = dict(dataset_dir=str(trained["dataset"]), bundle_root=str(trained["root"]))
    real = tmp_path / "real"
    run("evaluating", cfg("train.json", "evaluate.json"), output_dir=str(real), **common)
    report = json.loads((real / "metrics_report.json").read_text())
    rows = list(csv.DictReader(open(real / "predictions.csv")))
    test_ids = {i["id"] for i in data.load_split(str(trained["dataset"]), "test")}
    assert {r["id"] for r in rows} == test_ids and report["n_cases"] == len(test_ids) == 2
    y = [int(r["label"]) for r in rows]
    p = [float(r["probability"]) for r in rows]
    assert report["auc"]["estimate"] == pytest.approx(roc_auc(y, p))
    assert report["auc"]["n_resamples"] == 200 and report["threshold"]["method"] == "youden_j_on_validation"
    assert report["source"] == "real CTPA" and (real / "roc_curve.png").stat().st_size > 1000
    assert report["split"] == "test" and sorted(report["case_ids"]) == sorted(test_ids) and not report["smoke_test"]
    train_labels = [i["label"] for i in data.load_split(str(trained["dataset"]), "training")]
    base = report["baseline"]
    assert base["name"] == "prevalence" and base["metrics"]["auc"] == 0.5
    assert all(c["baseline"]["probability"] == pytest.approx(np.mean(train_labels)) for c in report["cases"])
    assert report["difference"]["auc"] == pytest.approx(report["metrics"]["auc"] - 0.5)

    # "generated" CTPA: the real test CTs rewritten as HDF5 / NPY under {id}_fake names -> same probabilities
    gen_dir = tmp_path / "generated"
    for k, item in enumerate(data.load_split(str(trained["dataset"]), "test")):
        save_volume(load_volume(item["ct"]), gen_dir / f"{item['id']}_fake{'.h5' if k == 0 else '.npy'}")
    gen = tmp_path / "gen"
    run(
        "evaluating",
        cfg("train.json", "evaluate.json"),
        output_dir=str(gen),
        generated_dir=str(gen_dir),
        **common,
    )
    gen_report = json.loads((gen / "metrics_report.json").read_text())
    assert gen_report["source"] == "generated CTPA"
    gen_p = {r["id"]: float(r["probability"]) for r in csv.DictReader(open(gen / "predictions.csv"))}
    for r in rows:
        assert gen_p[r["id"]] == pytest.approx(float(r["probability"]), abs=1e-5)

    table = compare(real_ct=str(real), generated_ct=str(gen), out=str(tmp_path / "table.md"))
    assert "real CTPA" in capsys.readouterr().out and "| generated CTPA | 2 (1) |" in table


def test_inference_matches_evaluation(trained, tmp_path):
    item = data.load_split(str(trained["dataset"]), "test")[0]
    run(
        "run",
        cfg("inference.json"),
        input_path=item["ct"],
        bundle_root=str(trained["root"]),
        output_dir=str(tmp_path),
    )
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["probability"]) <= 1.0
    ev = tmp_path / "ev"
    run("evaluating", cfg("train.json", "evaluate.json"), dataset_dir=str(trained["dataset"]),
        bundle_root=str(trained["root"]), output_dir=str(ev))  # fmt: skip
    probs = {r["id"]: float(r["probability"]) for r in csv.DictReader(open(ev / "predictions.csv"))}
    assert float(rows[0]["probability"]) == pytest.approx(probs[item["id"]], abs=1e-5)


def test_export_and_verify_net_in_out(trained, tmp_path):
    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(ts), ckpt_file=str(trained["root"] / "models" / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"), config_file=cfg("inference.json"), key_in_ckpt="model",
    )  # fmt: skip
    loaded = torch.jit.load(str(ts))
    net = ConfigParser.load_config_files(cfg("inference.json"))
    parser = ConfigParser(net)
    eager = parser.get_parsed_content("network_def").eval()
    eager.load_state_dict(torch.load(trained["root"] / "models" / "model.pt", weights_only=True)["model"])
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), eager(x))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=cfg("inference.json"),
        device="cpu",
    )


@pytest.mark.parametrize("modality", ["xray", "fusion"])
def test_xray_and_fusion_train_and_evaluate(phantom_pairs, tmp_path, modality):
    common = dict(dataset_dir=str(phantom_pairs["root"]), bundle_root=str(tmp_path), modality=modality)
    run(
        "training",
        cfg("train.json"),
        output_dir=str(tmp_path / "out"),
        max_epochs=1,
        class_balance="sampler",
        **common,
    )
    run("evaluating", cfg("train.json", "evaluate.json"), output_dir=str(tmp_path / "ev"), **common)
    report = json.loads((tmp_path / "ev" / "metrics_report.json").read_text())
    assert report["modality"] == modality and report["n_cases"] == 2
    assert report["source"] == {"xray": "X-ray", "fusion": "X-ray + CTPA"}[modality]
    if modality == "xray":  # the X-ray-only model's report is the comparison of a CT model on the same cases
        out = tmp_path / "ct_vs_xray"
        run("training", cfg("train.json"), output_dir=str(tmp_path / "ct_out"), max_epochs=1,
            **{**common, "modality": "ct", "bundle_root": str(tmp_path / "ct")})  # fmt: skip
        run("evaluating", cfg("train.json", "evaluate.json"), output_dir=str(out), xray_report=str(tmp_path / "ev"),
            **{**common, "modality": "ct", "bundle_root": str(tmp_path / "ct")})  # fmt: skip
        xray_only = json.loads((out / "metrics_report.json").read_text())["comparisons"]["xray_only"]
        assert xray_only["metrics"]["auc"] == report["metrics"]["auc"] and "auc" in xray_only["difference"]
