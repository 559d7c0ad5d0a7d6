"""Anatomy metrics, the X-ray extent baseline and the paired bootstrap intervals, against hand computations."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from common.anatomy import ANATOMY_LABELS, AnatomyMetrics, anatomy_metrics, load_label_map
from common.baselines import ExtentScaledMeanCT, body_extent
from common.classification_metrics import bootstrap_mean_ci
from common.errors import InputError
from common.handlers import SAME_SOURCE_NOTE, build_report, difference_intervals, same_source

SPACING = (2.0, 3.0, 4.0)  # mm: one voxel = 24 mm^3 = 0.024 mL
VOXEL_ML = 0.024


def chest(body=(slice(1, 7), slice(1, 7), slice(0, 6)), lung=(slice(2, 4), slice(2, 5), slice(1, 5))):
    """(8, 8, 6) HU: air -1000, a 0 HU body block, a -800 HU lung block inside it."""
    hu = np.full((8, 8, 6), -1000.0, np.float32)
    hu[body] = 0.0
    hu[lung] = -800.0
    return hu


TRUTH = chest()  # body 6*6*6 = 216 voxels, lung 2*3*4 = 24 voxels


def _stray():
    hu = chest()
    hu[0, 0, 0] = 100.0  # a body-HU voxel not connected to the body: the largest component drops it
    hu[7, 7, 5] = -800.0  # lung-HU air outside the body: never lung
    return hu


# name, prediction, expected {metric: value} by hand
CASES = [
    ("identical", chest(), {"body_dice": 1.0, "lung_dice": 1.0, "lung_volume_error_ml": 0.0, "lung_volume_error_pct": 0.0}),
    # body and lung one voxel to +x: body overlap 5*6*6 = 180 of 216 + 216; lung overlap 1*3*4 = 12 of 24 + 24
    (
        "shifted",
        chest((slice(2, 8), slice(1, 7), slice(0, 6)), (slice(3, 5), slice(2, 5), slice(1, 5))),
        {"body_dice": 360 / 432, "lung_dice": 24 / 48, "lung_volume_error_ml": 0.0, "lung_volume_error_pct": 0.0},
    ),
    # lung 3*3*4 = 36 voxels: Dice 2*24 / 60, 12 voxels too many = 0.288 mL = 50 %
    (
        "bigger lung",
        chest(lung=(slice(2, 5), slice(2, 5), slice(1, 5))),
        {"body_dice": 1.0, "lung_dice": 48 / 60, "lung_volume_error_ml": 12 * VOXEL_ML, "lung_volume_error_pct": 50.0},
    ),
    ("stray voxels", _stray(), {"body_dice": 1.0, "lung_dice": 1.0, "lung_volume_error_ml": 0.0}),
    # no lung predicted: Dice 0, the whole true volume missing (24 voxels, 100 %)
    (
        "no lung",
        chest(lung=(slice(0, 0),) * 3),
        {"body_dice": 1.0, "lung_dice": 0.0, "lung_volume_error_ml": 24 * VOXEL_ML, "lung_volume_error_pct": 100.0},
    ),
]


@pytest.mark.parametrize("name,pred,expected", CASES, ids=[c[0] for c in CASES])
def test_anatomy_metrics_by_hand(name, pred, expected):
    got = anatomy_metrics(pred, TRUTH, SPACING)
    for key, value in expected.items():
        # counts are exact; the mL figures are a few float64 products (relative error ~1e-15)
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert "heart_dice" not in got  # heart metrics need a label map


HEART_SPACING = (5.0, 5.0, 4.0)  # 5 mm in-plane: the 5 mm opening is one iteration of the 6-neighbour cross


def _labelled_chest():
    """(14, 10, 5) HU and labels: 40 HU body, lungs at x 2:5 and 9:12 (y 2:8), heart label x 6:9, y 5:8."""
    hu = np.full((14, 10, 5), -1000.0, np.float32)
    labels = np.zeros(hu.shape, np.int16)
    hu[1:13, 1:9, :] = 40.0
    labels[1:13, 1:9, :] = ANATOMY_LABELS["body"]
    for xs in (slice(2, 5), slice(9, 12)):
        hu[xs, 2:8, :] = -800.0
        labels[xs, 2:8, :] = ANATOMY_LABELS["lung"]
    labels[6:9, 5:8, :] = ANATOMY_LABELS["heart"]  # 3*3*5 = 45 voxels, centroid x = 7
    return hu, labels


def test_heart_metrics_with_labels():
    hu, labels = _labelled_chest()
    got = anatomy_metrics(hu, hu, HEART_SPACING, labels)
    # rule: between the lungs x 5:9, anterior to the lungs' centre (y > 4.5) y 5:8, all 5 slices: a 4x3x5 box.
    # Opening by the cross: eroded core x 6..7, y 6, z 1..3 (6 voxels); the crosses back give 12 (x arms,
    # x 5..8 at y 6) + 12 (y arms, y 5 and 7) + 4 (z arms, z 0 and 4) = 28 voxels, centroid x 6.5.
    # Overlap with the label (x 6..8): 9 + 12 + 4 = 25: Dice 50 / 73; centroids 0.5 voxel x 5 mm apart.
    assert got["heart_dice"] == pytest.approx(50 / 73, rel=1e-12)
    assert got["heart_centroid_error_mm"] == pytest.approx(2.5, rel=1e-12)
    assert got["body_dice"] == 1.0 and got["lung_dice"] == 1.0


def test_label_map_from_item_and_bad_values(tmp_path):
    hu, labels = _labelled_chest()
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.diag([*HEART_SPACING, 1.0])), path)
    metric = AnatomyMetrics(spacing=HEART_SPACING)
    got = metric(torch.from_numpy(hu)[None], torch.from_numpy(hu)[None], {"item": {"label": str(path)}})
    assert got["heart_dice"] == pytest.approx(50 / 73, rel=1e-12)
    # a PE class under the same key is not a label map
    assert "heart_dice" not in metric(torch.from_numpy(hu)[None], torch.from_numpy(hu)[None], {"item": {"label": 1}})
    # nearest resampling to a stage's size keeps the labels' values
    assert set(np.unique(load_label_map(path, (6, 4, 2))).tolist()) <= set(ANATOMY_LABELS.values())
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 7, np.int16), np.eye(4)), bad)
    with pytest.raises(InputError, match="bad.nii.gz"):
        load_label_map(bad)


# ----------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_constant_and_two_points():
    ci = bootstrap_mean_ci([1.5, 1.5, 1.5, np.nan], n_resamples=200)
    assert (ci.estimate, ci.low, ci.high) == (1.5, 1.5, 1.5)  # the NaN case is left out
    # two cases 0 and 1: resample means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 (> 2.5 % each end)
    ci = bootstrap_mean_ci([0.0, 1.0], n_resamples=2000, seed=3)
    assert (ci.estimate, ci.low, ci.high) == (0.5, 0.0, 1.0)


def test_bootstrap_matches_the_textbook_loop():
    values = np.random.default_rng(1).normal(size=9)
    rng = np.random.default_rng(7)  # the same draws: one row of case indices per resample
    means = [values[rng.integers(0, 9, size=9)].mean() for _ in range(500)]
    low, high = np.quantile(means, [0.025, 0.975])
    ci = bootstrap_mean_ci(values, n_resamples=500, seed=7, chunk_size=64)
    # means of 9 float64 values summed in two orders: ~1e-16 relative
    assert ci.low == pytest.approx(low, rel=1e-12) and ci.high == pytest.approx(high, rel=1e-12)


def test_report_intervals_and_same_source():
    cases = [
        {"id": f"c{i}", "model": {"psnr": 20.0 + d}, "baselines": {"mean": {"psnr": 20.0}, "extent": {"psnr": 19.0}},
         "baseline": {"psnr": 20.0}, "source": "patient_a"}
        for i, d in enumerate([1.0, 1.0, 1.0])
    ]
    report = build_report(
        "b", "test", cases, baseline={"name": "mean", "description": ""},
        baselines=[{"name": "mean"}, {"name": "extent"}], training_sources=["patient_a"],
    )
    assert report["difference_ci"]["psnr"]["low"] == pytest.approx(1.0)
    assert report["baselines"]["extent"]["difference_ci"]["psnr"]["estimate"] == pytest.approx(2.0)
    assert report["baselines"]["extent"]["difference"]["psnr"] == pytest.approx(2.0)
    assert report["same_source"] is True and report["same_source_note"] == SAME_SOURCE_NOTE
    assert same_source(cases, ["patient_b"])["same_source"] is False
    assert same_source([{"id": "x"}], ["patient_a"])["same_source"] is None
    assert difference_intervals(cases, "extent", primary=False)["psnr"]["n_cases"] == 3


# ----------------------------------------------------------------------------------------------- extent baseline
def test_body_extent_censoring():
    image = np.zeros((8, 10), np.float32)
    image[2:5, 3:7] = 0.5
    assert body_extent(image) == ((2.0, 4.0), (3.0, 6.0))
    image[:, 0] = 0.5  # touches the left border: the horizontal extent is not seen
    assert body_extent(image)[1] is None


def test_extent_scaled_mean_ct_by_hand(tmp_path):
    from common.io import save_volume
    from common.volume import Volume
    from data_prep.render import save_drr

    ct = np.full((16, 16, 16), -1024.0, np.float32)
    ct[6:10, 6:10, :] = 0.0  # body 40 mm wide (X) and deep (Y), centred, 10 mm voxels
    save_volume(Volume.from_spacing(ct, (10.0, 10.0, 10.0)), tmp_path / "ct.nii.gz")
    # magnification 2, 320 mm detector of 32 pixels: 10 mm detector pixel = 5 mm at the isocentre
    geometry = {"name": "t", "sad": 500.0, "sid": 1000.0, "detector_pixels": [32, 32], "detector_size_mm": [320.0, 320.0]}

    def xray(rows, cols):
        image = np.zeros((32, 32), np.float32)
        image[rows, cols] = 0.5
        return image

    save_drr(xray(slice(10, 22), slice(12, 20)), tmp_path / "pa.nii.gz", (10.0, 10.0))
    save_drr(xray(slice(10, 22), slice(13, 19)), tmp_path / "lat.nii.gz", (10.0, 10.0))
    item = {"ct": str(tmp_path / "ct.nii.gz"), "pa": str(tmp_path / "pa.nii.gz"), "lateral": str(tmp_path / "lat.nii.gz")}
    baseline = ExtentScaledMeanCT(geometry, [item])
    # the case: PA twice as wide (16 px), same height; lateral as deep but 2 px further posterior (col +2)
    image = torch.from_numpy(np.stack([xray(slice(10, 22), slice(8, 24)), xray(slice(10, 22), slice(15, 21))]))
    label = torch.zeros(1, 16, 16, 16)
    pred = baseline(label, {"image": image})
    t = baseline.last_transform
    assert t["scale"] == pytest.approx([2.0, 1.0, 1.0], rel=1e-12)
    assert t["shift_mm"] == pytest.approx([0.0, -10.0, 0.0], abs=1e-9)  # 2 px x 5 mm, anterior is +Y
    hu = pred[0].numpy() * 3072.0 - 1024.0
    # X: index i samples 7.5 + (i - 7.5) / 2: body for i = 5..10, air for i <= 2 and >= 13
    line = hu[:, 7, 8]
    assert np.allclose(line[5:11], 0.0, atol=1e-3) and np.allclose(line[[0, 1, 2, 13, 14, 15]], -1024.0, atol=1e-3)
    # Y: a whole-voxel (10 mm) posterior shift: body at 5..8
    line = hu[7, :, 8]
    assert np.allclose(line[5:9], 0.0, atol=1e-3) and np.allclose(line[[4, 9]], -1024.0, atol=1e-3)


def test_learning_table_shows_both_baselines_with_intervals():
    from benchmarks.learning import _format_baselines_table

    ci = {"estimate": 1.0, "low": 0.5, "high": 1.5}
    row = {
        "model": "perx2ct", "data": "cohort", "model_metrics": {"lung_dice": 0.8},
        "baselines": {
            name: {"metrics": {"lung_dice": 0.6}, "difference_ci": {"psnr_xray2ct": ci, "lung_dice": ci}}
            for name in ("mean_training_ct", "extent_scaled_mean_ct")
        },
        "same_source": True, "same_source_note": SAME_SOURCE_NOTE,
    }  # fmt: skip
    text = _format_baselines_table([row])
    assert text.count("+1.00 [+0.50, +1.50]") == 4 and "extent_scaled_mean_ct" in text and "same-source" in text


def test_metrics_report_scores_every_baseline_and_records_the_source():
    from common.baselines import BoxDownUp, MeanTrainingCT
    from common.handlers import MetricsReport
    from common.metrics import CTMetrics

    mean = MeanTrainingCT(paths=[])
    mean._mean = np.full((8, 8, 8), -1000.0, np.float32)
    report = MetricsReport(
        "unused.json", "demo", "test", [CTMetrics(win_size=3), AnatomyMetrics(spacing=(5.0, 5.0, 5.0))], mean,
        baselines=[BoxDownUp(2)], training_sources=["patient_a"], progress=False,
    )  # fmt: skip
    label = torch.from_numpy((chest(lung=(slice(0, 0),) * 3)[:, :, :6].repeat(2, axis=2)[:, :, :8] + 1024.0) / 3072.0)
    out = {"pred": label.clone()[None], "label": label[None], "image": torch.rand(2, 8, 8)}
    case = report.score_case(out, {"id": "c1", "source": "patient_a"}, 0)
    assert set(case["baselines"]) == {"mean_training_ct", "box_down_up"} and case["source"] == "patient_a"
    assert case["baseline"] == case["baselines"]["mean_training_ct"] and case["model"]["body_dice"] == 1.0
    built = build_report("demo", "test", [case], baseline={"name": "mean_training_ct"},
                         baselines=[{"name": n} for n in report.baseline_names], training_sources=["patient_a"])  # fmt: skip
    assert built["same_source"] is True and set(built["baselines"]) == {"mean_training_ct", "box_down_up"}
