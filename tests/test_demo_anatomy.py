"""Issue 21 items 5 and 6: the demo trains the X-ray -> CT bundles on the cohort and prints both baselines
with intervals, the anatomy metrics and the same-source wording; the PE row has a generated-CT classifier."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "bin" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_xray_to_ct_bundles_train_on_the_cohort_at_a_320_mm_field():
    demo = _demo()
    for name in ("vqgan_3d_patch", "perx2ct", "progressive_cascade", "latent_ddpm"):
        assert demo.STEPS[name]["data"] == "cohort", name
    assert demo.STEPS["pe_classifier"]["data"] == "phantoms_pe"  # its datalist label is the PE flag
    c = demo.COHORT
    assert c["size"] * c["spacing"] == 320.0 and c["drr_pixels"] >= 64 and c["geometry"] == "perx2ct"
    # 24 / 12 / 12 like the phantom sets: the training cost (and so the 15-minute budget) is unchanged
    n_test = round(c["n_cases"] * c["test_fraction"])
    assert n_test >= 12 and c["n_cases"] - n_test - round(c["n_cases"] * c["val_fraction"]) == 24


ROW = {
    "bundle": "perx2ct", "status": "ok", "metric": "psnr_xray2ct", "split": "test", "n_cases": 12, "model": 25.0,
    "baseline": 23.0, "difference": 2.0, "baseline_name": "mean_training_ct", "seconds": 60.0, "smoke_test": False,
}  # fmt: skip
REPORT = {  # the parts of a MetricsReport that the summary reads
    "baselines": {
        "mean_training_ct": {
            "description": "mean CT", "metrics": {"psnr_xray2ct": 23.0, "lung_dice": 0.70, "body_dice": 0.9},
            "difference": {"psnr_xray2ct": 2.0},
            "difference_ci": {"psnr_xray2ct": {"estimate": 2.0, "low": 1.5, "high": 2.5, "n": 12},
                              "lung_dice": {"estimate": 0.1, "low": 0.05, "high": 0.15}},
        },
        "extent_scaled_mean_ct": {
            "description": "scaled", "metrics": {"psnr_xray2ct": 24.5, "heart_centroid_error_mm": 12.5},
            "difference": {"psnr_xray2ct": 0.5},
            "difference_ci": {"psnr_xray2ct": {"estimate": 0.5, "low": -0.25, "high": 1.25}},
        },
    }
}  # fmt: skip


def test_summary_rows_give_both_baselines_with_intervals_anatomy_and_same_source():
    demo = _demo()
    baselines = demo.baseline_rows(REPORT, "psnr_xray2ct")
    assert list(baselines) == ["mean_training_ct", "extent_scaled_mean_ct"]
    assert baselines["mean_training_ct"]["difference_ci"] == {"estimate": 2.0, "low": 1.5, "high": 2.5}
    assert baselines["mean_training_ct"]["lung_dice_difference_ci"]["low"] == 0.05
    assert baselines["extent_scaled_mean_ct"]["heart_centroid_error_mm"] == 12.5
    assert baselines["extent_scaled_mean_ct"]["lung_dice_difference_ci"] is None  # absent stays absent
    row = {**ROW, "baselines": baselines, "same_source": True, "same_source_note": "they share a patient",
           "anatomy": {"lung_dice": 0.8, "body_dice": 0.95, "heart_centroid_error_mm": 9.0}}  # fmt: skip
    text = demo.format_row(row)
    for expected in ("+2.00 [+1.50, +2.50]dB", "+0.50 [-0.25, +1.25]dB", "vs extent_scaled_mean_ct",
                     "lung Dice 0.800", "heart centroid error 9.0 mm", "same-source: they share a patient",
                     "lung Dice 0.700 (diff +0.100 [+0.050, +0.150])", "heart centroid 12.5 mm"):  # fmt: skip
        assert expected in text, (expected, text)
    assert "same-source" not in demo.format_row({**row, "same_source": False, "same_source_note": "cross-source"})


def test_pe_row_prints_the_generated_ct_classifier_and_what_to_expect():
    demo = _demo()
    row = {**ROW, "bundle": "pe_classifier", "metric": "auc", "model": 0.97, "baseline": 0.5, "difference": 0.47,
           "baseline_name": "prevalence", "accuracy": {"model": 0.9, "baseline": 0.5},
           "xray_only": {"auc": 0.53, "accuracy": 0.5}}  # fmt: skip
    gen = {"status": "ok", "source": "generated CTPA", "n_cases": 32, "expected": demo.PE_EXPECTED,
           "auc": {"estimate": 0.52, "low": 0.31, "high": 0.72}, "accuracy": {"estimate": 0.5},
           "xray_only_metrics": {"auc": 0.53}}  # fmt: skip
    text = demo.format_row({**row, "generated_ct": gen})
    assert "generated-CT classifier (generated CTPA): AUC 0.520 [0.310, 0.720]" in text
    assert "X-ray-only AUC 0.530 on the same 32 cases" in text and "chance" in text
    failed = demo.format_row({**row, "generated_ct": {"status": "failed: boom", "expected": demo.PE_EXPECTED}})
    assert "generated-CT classifier: failed: boom" in failed and "chance" in failed


@pytest.mark.slow
def test_pe_generated_ct_row_runs_end_to_end(tmp_path, monkeypatch):
    """The generator trains on the PE pairs, generates every case's CT, and the classifier trained on them is
    compared with the X-ray-only classifier on the same test cases (1 epoch each: wiring, not figures)."""
    from data_prep.phantom import make_pe_dataset

    demo = _demo()
    pe = tmp_path / "data" / "phantoms_pe"
    make_pe_dataset(pe, n_patients=(3, 2, 2), size=32, spacing=4.0, emboli=3, geometry="x2ctgan", drr_pixels=32)
    fast = {"max_epochs": 1, "val_interval": 1, "save_interval": 1, "stage_epochs": [1, 1, 1], "batch_size": 2}
    from xray2ct import driver

    monkeypatch.setattr(demo, "runner", lambda log, threads: lambda run_id, files, over: driver.Subprocess(
        log, threads)(run_id, files, {**over, **fast}))  # fmt: skip
    work = tmp_path / "pe_classifier"
    work.mkdir()
    log = work / "demo.log"
    driver.train_and_evaluate("pe_classifier", pe, work / "xray_only", overrides=driver.ids(modality="xray"),
                              runner=demo.runner(log, 1), require_unseen=False)  # fmt: skip
    gen = demo.run_pe_generated(tmp_path, {"phantoms_pe": pe}, work / "xray_only" / "eval", log, 1)
    assert gen["status"] == "ok" and gen["n_cases"] == 4, gen
    real = json.loads((pe / "dataset.json").read_text())
    made = json.loads((tmp_path / "data" / "phantoms_pe_generated" / "dataset.json").read_text())
    for split in ("training", "validation", "test"):  # same patients, same labels, generated CTs
        assert [(e["id"], e["label"]) for e in made[split]] == [(e["id"], e["label"]) for e in real[split]]
        for e in made[split]:
            assert (tmp_path / "data" / "phantoms_pe_generated" / e["ct"]).is_file()
    report = json.loads(Path(gen["report"]).read_text())
    assert report["source"].startswith("generated CTPA") and "xray_only" in report["comparisons"]
    assert sorted(gen["case_ids"]) == sorted(e["id"] for e in real["test"])
    assert "generated-CT classifier" in demo.format_generated(gen)


def test_learning_benchmark_has_64_rows_with_cpu_64_overlays_at_a_320_mm_field():
    """Issue 21 item 3: perx2ct, progressive_cascade and latent_ddpm (with its VQ-GAN) at 64^3 / 5 mm with
    X-rays >= 128^2, on the cohort and on phantoms; each overlay names sizes that fit those datasets."""
    from benchmarks import learning

    for data, settings in (("cohort64", learning.COHORT64), ("phantoms64", learning.PHANTOMS64)):
        assert settings["size"] == 64 and settings["spacing"] * settings["size"] == 320.0
        assert settings["drr_pixels"] >= 128 and settings["geometry"] == "perx2ct"
        for model in ("perx2ct", "cascade", "vqgan", "latent_ddpm"):
            assert f"{model}_{data}" in learning.ROWS
        assert learning.NEEDS_VQGAN[f"latent_ddpm_{data}"] == f"vqgan_{data}"
        assert learning.ROWS.index(f"vqgan_{data}") < learning.ROWS.index(f"latent_ddpm_{data}")
    overlays = {b: json.loads((REPO / "bundles" / b / "configs" / "cpu_64.json").read_text())
                for b in ("perx2ct", "progressive_cascade", "vqgan_3d_patch", "latent_ddpm")}  # fmt: skip
    assert overlays["perx2ct"]["volume_size"] == 64 and overlays["perx2ct"]["image_size"] >= 128
    assert overlays["progressive_cascade"]["volume_sizes"][-1] == 64
    assert overlays["progressive_cascade"]["xray_size"] >= 128
    assert overlays["progressive_cascade"]["feature_sizes"][-1] == overlays["progressive_cascade"]["xray_size"]
    assert overlays["vqgan_3d_patch"]["val_roi_size"] == [64, 64, 64]
    assert overlays["latent_ddpm"]["vqgan_roi"] == [64, 64, 64] and overlays["latent_ddpm"]["xray_size"] >= 128
    # the latent model decodes with the cpu_64 VQ-GAN (its architecture comes from that checkpoint's record)
    assert overlays["latent_ddpm"]["latent_channels"] == overlays["vqgan_3d_patch"]["embedding_dim"]
    assert not any(k.startswith("vqgan_def") for k in overlays["latent_ddpm"])
