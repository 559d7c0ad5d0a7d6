"""common.handlers: the one metrics report (model beside baseline, by hand), CT metric transforms, the JSON rule,
the non-finite-loss stop and the DDP handler filter."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import IgniteMetricHandler, MeanAbsoluteError, PeakSignalToNoiseRatio, StatsHandler
from monai.metrics import SSIMMetric

from common.baselines import BoxDownUp, CopyInput, MeanTrainingCT
from common.handlers import (
    CTPair,
    MetricsReport,
    NonFiniteLossError,
    StopOnNonFiniteLoss,
    build_report,
    rank_handlers,
    write_json,
)
from common.intensity import XRAY2CT
from common.io import save_volume
from common.metrics import CTMetrics, X2CTGANPSNRMetric, X2CTGANSSIMMetric, compute_ct_metrics
from common.volume import Volume


def _luminance_ssim(a: float, b: float, data_range: float = 1.0) -> float:
    c1 = (0.01 * data_range) ** 2
    return (2 * a * b + c1) / (a * a + b * b + c1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ct_pair_metrics_in_supervised_evaluator(symmetric):
    """The ignite CT metrics the configs wire, on network intensities of either convention, by hand."""
    label_unit, pred_unit = 0.5, 0.75  # 512 HU and 1280 HU: exact in float32 on the [0, 1] scale
    scale = (lambda v: 2 * v - 1) if symmetric else (lambda v: v)
    data = [
        {"image": torch.full((1, 8, 8, 8), scale(pred_unit)), "label": torch.full((1, 8, 8, 8), scale(label_unit))}
        for _ in range(3)
    ]

    def pair(kind):
        return CTPair(kind, symmetric=symmetric)

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2),
        network=torch.nn.Identity(),
        key_val_metric={"mae_hu": MeanAbsoluteError(output_transform=pair("clipped_hu"))},
        additional_metrics={
            "psnr_xray2ct": PeakSignalToNoiseRatio(max_val=1.0, output_transform=pair("unit")),
            "ssim_xray2ct": IgniteMetricHandler(SSIMMetric(3, data_range=1.0, win_size=7), output_transform=pair("unit")),
            "psnr_x2ctgan": IgniteMetricHandler(X2CTGANPSNRMetric(), output_transform=pair("hu")),
            "ssim_x2ctgan": IgniteMetricHandler(X2CTGANSSIMMetric(), output_transform=pair("hu")),
        },
    )
    evaluator.run()
    got = evaluator.state.metrics
    assert got["mae_hu"] == pytest.approx(768.0, abs=1e-3)
    assert got["psnr_xray2ct"] == pytest.approx(20 * math.log10(1 / 0.25), abs=1e-4)
    assert got["psnr_x2ctgan"] == pytest.approx(20 * math.log10(4095 / 768), abs=1e-4)
    assert got["ssim_xray2ct"] == pytest.approx(_luminance_ssim(0.75, 0.5), abs=2e-3)  # MONAI float32 noise
    assert got["ssim_x2ctgan"] == pytest.approx(_luminance_ssim(2304 / 2500, 1536 / 2500), abs=1e-6)


def test_write_json_writes_non_finite_values_as_null(tmp_path):
    path = tmp_path / "reports" / "metrics.json"
    target = np.random.default_rng(5).integers(-900, 1000, (8, 8, 8)).astype(np.float32)
    metrics = compute_ct_metrics(target, target)
    write_json(path, {"metrics": metrics, "n": np.int64(1), "t": torch.tensor(2.0), "nan": float("nan")})
    report = json.loads(path.read_text())
    assert report["metrics"]["psnr_xray2ct"] is None  # inf: strict JSON has no Infinity
    assert report["metrics"]["psnr_x2ctgan"] == 100.0 and report["nan"] is None
    assert report["n"] == 1 and report["t"] == 2.0
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # written atomically
    with pytest.raises(ValueError, match="reuse"):
        build_report("b", "test", [], {}, extra={"split": "x"})


def _ct(rng, shape=(8, 8, 8)) -> np.ndarray:
    return rng.uniform(-1000, 1500, shape).astype(np.float32)


def test_metrics_report_scores_model_and_baseline_by_hand(tmp_path):
    """Identity network on [0, 1] CTs: the model predicts its input; the baseline is the mean training CT."""
    rng = np.random.default_rng(0)
    train = [save_volume(Volume.from_spacing(_ct(rng)), tmp_path / f"t{i}" / "ct.nii.gz") for i in range(2)]
    mean_hu = np.mean([np.asarray(nib.load(p).dataobj) for p in train], axis=0)
    cases = []
    for i in range(3):
        truth, guess = _ct(rng), _ct(rng)
        cases.append({"id": f"case_{i}", "image": XRAY2CT.to_unit(guess)[None], "label": XRAY2CT.to_unit(truth)[None]})
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(cases, batch_size=2),
        network=torch.nn.Identity(),
        key_val_metric={"psnr_xray2ct": PeakSignalToNoiseRatio(max_val=1.0, output_transform=CTPair("unit"))},
        decollate=False,
    )
    report_handler = MetricsReport(
        tmp_path / "metrics_report.json", "demo", "test", [CTMetrics()], MeanTrainingCT(paths=train),
        training_cases=["case_2", "t0"], extra={"checkpoint": "x.pt"}, progress=False,
    )  # fmt: skip
    report_handler.attach(evaluator)
    evaluator.run()
    report = json.loads((tmp_path / "metrics_report.json").read_text())
    assert report["bundle"] == "demo" and report["split"] == "test" and report["n_cases"] == 3
    assert report["case_ids"] == ["case_0", "case_1", "case_2"] and report["checkpoint"] == "x.pt"
    assert report["smoke_test"] and report["training_cases_evaluated"] == ["case_2"]
    for case, item in zip(report["cases"], cases):
        pred, truth = XRAY2CT.from_unit(item["image"][0]), XRAY2CT.from_unit(item["label"][0])
        by_hand = compute_ct_metrics(pred, truth)
        assert case["model"]["psnr_xray2ct"] == pytest.approx(by_hand["psnr_xray2ct"], abs=1e-4)
        assert case["model"]["mae_hu"] == pytest.approx(by_hand["mae_hu"], rel=1e-4)
        baseline = compute_ct_metrics(np.clip(mean_hu, -1024, 2048), truth)
        assert case["baseline"]["psnr_xray2ct"] == pytest.approx(baseline["psnr_xray2ct"], abs=1e-3)
    model_mean = np.mean([c["model"]["psnr_xray2ct"] for c in report["cases"]])
    base_mean = np.mean([c["baseline"]["psnr_xray2ct"] for c in report["cases"]])
    assert report["metrics"]["psnr_xray2ct"] == report["model"]["psnr_xray2ct"] == pytest.approx(model_mean)
    assert report["baseline"]["name"] == "mean_training_ct" and "training split" in report["baseline"]["description"]
    assert report["baseline"]["metrics"]["psnr_xray2ct"] == pytest.approx(base_mean)
    assert report["difference"]["psnr_xray2ct"] == pytest.approx(model_mean - base_mean)
    assert report["model_better"]["mae_hu"] == (report["model"]["mae_hu"] < report["baseline"]["metrics"]["mae_hu"])
    assert report["engine_metrics"]["psnr_xray2ct"] == pytest.approx(model_mean, abs=1e-3)
    assert "xray2ct" in report["conventions"] and report["conventions"]["json"].startswith("NaN")


def test_codec_inferer_in_report_scores_the_latent_path():
    """MetricsReport's extra predictions (the VQ-GAN's per-window path) are scored without a baseline."""
    out = {"pred": torch.full((1, 8, 8, 8), 0.5), "label": torch.full((1, 8, 8, 8), 0.5), "pred_per_window": torch.full((1, 8, 8, 8), 0.25)}
    report = MetricsReport("unused.json", "demo", "test", [CTMetrics()], BoxDownUp(2), extra_predictions={"_per_window": "pred_per_window"}, progress=False)
    case = report.score_case(out, {}, 3)
    assert case["id"] == "case_0003" and case["model"]["mae_hu"] == 0.0
    assert case["model"]["mae_hu_per_window"] == pytest.approx(0.25 * 3072) and "mae_hu_per_window" not in case["baseline"]


def test_metrics_report_per_stage_and_other_baselines():
    """Dict outputs (cascade stages) give <metric>_<stage> and the last stage unsuffixed; box/copy baselines."""
    torch.manual_seed(0)
    label = {"stage1": torch.rand(1, 8, 8, 8), "stage2": torch.rand(1, 16, 16, 16)}
    out = {"pred": {k: v.clamp(0.1, 0.9) for k, v in label.items()}, "label": label, "image": torch.rand(2, 8, 8)}
    report = MetricsReport("unused.json", "demo", "test", [CTMetrics(win_size=5)], MeanTrainingCT(paths=[]), progress=False)
    report.baseline = BoxDownUp(2)
    case = report.score_case(out, {"id": "p1"}, 0)
    assert case["id"] == "p1" and case["model"]["psnr_xray2ct"] == case["model"]["psnr_xray2ct_stage2"]
    assert {"psnr_xray2ct_stage1", "ssim_xray2ct_stage2", "psnr_xray2ct"} <= set(case["model"]) == set(case["baseline"])
    boxed = BoxDownUp(2)(label["stage1"])
    by_hand = compute_ct_metrics(XRAY2CT.from_unit(boxed), XRAY2CT.from_unit(label["stage1"]), win_size=5)
    assert case["baseline"]["psnr_xray2ct_stage1"] == pytest.approx(by_hand["psnr_xray2ct"], abs=1e-4)
    image = torch.rand(1, 4, 4, 4)
    assert torch.equal(CopyInput()(torch.zeros(1, 4, 4, 4), {"image": image}), image)
    resized = MeanTrainingCT(paths=[])
    resized._mean = np.full((8, 8, 8), 2048.0, np.float32)
    assert resized(torch.zeros(1, 4, 4, 4)).shape == (1, 4, 4, 4) and float(resized(torch.zeros(1, 4, 4, 4)).min()) == 1.0


def test_metrics_report_previews_show_model_baseline_and_truth(tmp_path):
    """``previews`` draws the first cases' model, baseline and ground truth rows (+ the X-ray input)."""
    from PIL import Image

    torch.manual_seed(0)
    label = {"stage1": torch.rand(1, 8, 8, 8), "stage2": torch.rand(1, 16, 16, 16)}
    out = {"pred": {k: v.clamp(0.1, 0.9) for k, v in label.items()}, "label": label, "image": torch.rand(2, 16, 16)}
    report = MetricsReport(
        tmp_path / "metrics_report.json", "demo", "test", [CTMetrics(win_size=5)], BoxDownUp(2), previews=1,
        progress=False,
    )  # fmt: skip
    report.score_case(out, {"id": "p1", "spacing": [10.0, 10.0, 10.0]}, 0)
    report.score_case(out, {"id": "p2"}, 1)
    assert report.written == [str(tmp_path / "previews" / "p1_preview.png")]  # one preview asked for, one naming
    with Image.open(report.written[0]) as image:  # 4 rows: ground truth, model, baseline, the two X-rays
        assert image.height > 3.5 * image.width / 3 and image.width > 3 * 200


def test_stop_on_non_finite_loss_names_the_batch_cases():
    """One NaN voxel makes the loss NaN: training stops with an error naming the cases (ignite's
    TerminateOnNan would stop silently and the run would exit 0)."""
    data = [{"id": f"/data/case_{i}", "image": torch.rand(1, 4, 4), "label": torch.rand(1, 4, 4)} for i in range(4)]
    data[2]["image"][0, 1, 1] = float("nan")
    net = torch.nn.Conv2d(1, 1, 1)
    trainer = SupervisedTrainer(
        "cpu", 2, DataLoader(data, batch_size=2), net, torch.optim.SGD(net.parameters(), 0.1), torch.nn.L1Loss(),
        train_handlers=[StopOnNonFiniteLoss()],
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, iteration 2; batch cases: \['case_2', 'case_3'\]"):
        trainer.run()


def test_rank_handlers_keep_writers_on_rank_zero_only():
    stats, stop = StatsHandler(), StopOnNonFiniteLoss()
    handlers = [stats, stop, None]
    assert rank_handlers(handlers, rank=0) == [stats, stop]
    assert rank_handlers(handlers, rank=1) == [stop]
