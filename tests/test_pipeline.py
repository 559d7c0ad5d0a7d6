"""``xray2ct-pipeline`` end to end: tiny models of every kind (conftest ``tiny_models``) on a real PA + lateral pair.

The models are trained for one epoch on phantom data with the bundles' ``cpu_tiny.json`` overlays (a few
seconds each, through ``monai.bundle run`` as a user trains them); their CTs are smoke-test output, so the
checks are on the pipeline's outputs (files, shapes, spacing, report keys, finite scores), not on quality.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REAL_PAIR as PAIR
from PIL import Image

from common.errors import InputError
from common.io import load_volume
from xray2ct import pipeline as pl
from xray2ct.models import REPO_ROOT, load_model, load_pe_model

REPO = Path(REPO_ROOT)
REPORT_KEYS = {
    "format", "case", "created", "inputs", "model", "options", "ct", "stages", "drr_consistency",
    "drr_consistency_baseline", "drr_consistency_note", "pe", "previews", "conventions", "seconds", "software",
    "preparation", "agreement", "domain_gap", "plausibility",
}  # fmt: skip


def _finite_scores(scores: dict, views: list[str]) -> None:
    for view in views:
        assert 0.0 <= scores[f"drr_l1_{view}"] <= 1.0
        assert math.isfinite(scores[f"drr_psnr_{view}"])
    assert scores["drr_l1"] == pytest.approx(np.mean([scores[f"drr_l1_{v}"] for v in views]))


EXPECTED = {  # bundle -> (views, stage shapes, final spacing mm): the cpu_tiny sizes on the 32^3, 10 mm phantoms
    "perx2ct": (["pa", "lateral"], [(32, 32, 32)], (10.0, 10.0, 10.0)),
    "progressive_cascade": (["pa", "lateral"], [(8, 8, 8), (16, 16, 16), (32, 32, 32)], (10.0, 10.0, 10.0)),
    "latent_ddpm": (["pa"], [(32, 32, 32)], (10.0, 10.0, 10.0)),
}


@pytest.mark.parametrize("bundle", list(EXPECTED))
def test_every_kind_on_a_real_pair(bundle, tiny_models, pair, tmp_path):
    views, shapes, spacing = EXPECTED[bundle]
    fmt = "h5" if bundle == "perx2ct" else "nii.gz"
    options = {"sampling_steps": 3, "seed": 1} if bundle == "latent_ddpm" else {}
    summary = pl.main(
        checkpoint=tiny_models[bundle], pa=pair["pa"], lateral=pair["lateral"], output_dir=str(tmp_path),
        pe_checkpoint=tiny_models["pe_classifier"], format=fmt, **options,
    )  # fmt: skip
    assert summary["written"] == 1 and summary["failed"] == 0
    case = tmp_path / PAIR
    report = json.loads((case / "report.json").read_text())
    assert set(report) == REPORT_KEYS and report["case"] == PAIR and report["model"]["bundle"] == bundle
    assert report["model"]["has_record"] and report["model"]["views"] == views
    assert report["inputs"]["pa"]["file"] == pair["pa"] and len(report["inputs"]["pa"]["sha256"]) == 64
    assert (report["inputs"]["lateral"] is None) == (bundle == "latent_ddpm")
    if bundle == "latent_ddpm":
        assert report["options"] == {"sampling_steps": 3, "guidance_scale": pytest.approx(1.0), "seed": 1}

    # the CT file: the shape and spacing the report states, HU
    ct = load_volume(case / report["ct"]["file"])
    assert report["ct"]["file"] == "ct." + fmt
    assert ct.shape == shapes[-1] == tuple(report["ct"]["shape"])
    assert ct.spacing == pytest.approx(spacing) and report["ct"]["spacing_mm"] == pytest.approx(spacing)
    assert -1024.5 <= ct.array.min() <= ct.array.max() <= 3072.5
    assert report["ct"]["hu"]["mean"] == pytest.approx(float(np.mean(ct.array)), abs=0.5)

    # every stage: shape, spacing covering the same field of view, its own score
    assert [tuple(s["shape"]) for s in report["stages"]] == shapes
    for stage in report["stages"]:
        fov = np.array(stage["shape"]) * np.array(stage["spacing_mm"])
        assert fov == pytest.approx(np.array(shapes[-1]) * np.array(spacing))
        _finite_scores(stage["drr_consistency"], views)
        if len(shapes) > 1:
            assert load_volume(case / stage["file"]).shape == tuple(stage["shape"])

    # DRR consistency of the CT and of the mean-training-CT baseline on the same views, finite
    _finite_scores(report["drr_consistency"], views)
    baseline = report["drr_consistency_baseline"]
    assert baseline["name"] == "mean_training_ct" and baseline["n_cases"] >= 1
    _finite_scores(baseline["scores"], views)
    assert "data range 1" in report["conventions"]["drr_consistency"]

    # PE probability from the classifier, with its trivial baseline
    pe = report["pe"]
    assert 0.0 <= pe["probability"] <= 1.0 and pe["modality"] == "ct" and pe["threshold"] is None
    assert pe["training_prevalence"] == pytest.approx(0.5) and len(pe["classifier"]["sha256"]) == 64

    # previews: montage (a row per stage + the X-rays), GIF, X-ray/DRR sheet; nothing half-written left
    assert set(report["previews"]) == {"montage", "gif", "drr"}
    montage = Image.open(case / "preview.png")
    assert montage.width >= 3 * 64 and montage.height >= (len(shapes) + 1) * 64
    assert Image.open(case / "drr.png").width >= 2 * len(views) * 128
    assert Image.open(case / "axial.gif").n_frames >= 1  # PIL merges identical frames (an all-air CT)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    assert all(v >= 0 for v in report["seconds"].values())


def test_batch_over_a_folder_resumes_and_reports_bad_cases(tiny_models, pair, tmp_path):
    inputs = tmp_path / "xrays"
    inputs.mkdir()
    for path in sorted(pair["folder"].iterdir()):
        shutil.copy(path, inputs / path.name)
    (inputs / "broken-PA.png").write_bytes(b"not a png")
    shutil.copy(pair["lateral"], inputs / "broken-L.png")
    shutil.copy(pair["pa"], inputs / "alone-PA.png")  # no lateral
    out = tmp_path / "out"
    summary = pl.pipeline(tiny_models["perx2ct"], str(out), inputs=str(inputs))
    real = {p.name.rsplit("-", 1)[0] for p in pair["folder"].iterdir()}
    assert summary["cases"] == len(real) + 2 and summary["written"] == len(real) and summary["failed"] == 2
    failed = {r["case"]: r["error"] for r in summary["cases_detail"] if r["status"] == "failed"}
    assert "broken-PA.png" in failed["broken"] and "no lateral" in failed["alone"]
    with open(out / "errors.csv", newline="") as f:
        assert {row["case"] for row in csv.DictReader(f)} == {"broken", "alone"}
    for name in real:
        assert json.loads((out / name / "report.json").read_text())["case"] == name
    assert json.loads((out / "pipeline_summary.json").read_text())["written"] == len(real)

    # a rerun skips the finished cases; a case whose report is gone is redone
    (out / PAIR / "report.json").unlink()
    again = pl.pipeline(tiny_models["perx2ct"], str(out), inputs=str(inputs))
    assert again["already_done"] == len(real) - 1 and again["written"] == 1 and again["failed"] == 2

    # the same folder with another model is refused, not mixed
    with pytest.raises(InputError, match="another model"):
        pl.pipeline(tiny_models["progressive_cascade"], str(out), inputs=str(inputs))


def test_csv_batch_with_one_view_model(tiny_models, pair, tmp_path):
    table = tmp_path / "cases.csv"
    table.write_text(f"case,pa\nfirst,{pair['pa']}\nmissing,{tmp_path / 'nope.png'}\n")
    summary = pl.pipeline(tiny_models["latent_ddpm"], str(tmp_path / "out"), inputs=str(table),
                          sampling_steps=2)  # fmt: skip
    assert summary["written"] == 1 and summary["failed"] == 1
    failed = next(r for r in summary["cases_detail"] if r["status"] == "failed")
    assert failed["case"] == "missing" and "nope.png" in failed["error"]
    assert load_volume(tmp_path / "out" / "first" / "ct.nii.gz").shape == (32, 32, 32)


def test_bad_input_is_named(tiny_models, pair, tmp_path):
    with pytest.raises(SystemExit, match="needs a PA \\+ lateral pair"):
        pl.main(checkpoint=tiny_models["perx2ct"], pa=pair["pa"], output_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="missing.pt"):
        pl.main(checkpoint=str(tmp_path / "missing.pt"), pa=pair["pa"], output_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="either --pa"):
        pl.main(checkpoint=tiny_models["perx2ct"], output_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="sampling_steps must be in"):
        pl.main(checkpoint=tiny_models["latent_ddpm"], pa=pair["pa"], output_dir=str(tmp_path), sampling_steps=0)
    with pytest.raises(SystemExit, match="no option sampling_steps"):
        pl.main(checkpoint=tiny_models["perx2ct"], pa=pair["pa"], lateral=pair["lateral"],
                output_dir=str(tmp_path), sampling_steps=5)  # fmt: skip
    with pytest.raises(SystemExit, match="is a 'pe_classifier' checkpoint"):
        pl.main(checkpoint=tiny_models["pe_classifier"], pa=pair["pa"], output_dir=str(tmp_path))


@pytest.mark.parametrize("bundle", list(EXPECTED))
def test_contradicting_config_is_refused(bundle, tiny_models, tmp_path):
    """The full-size inference.json (no cpu_tiny overlay) contradicts a tiny checkpoint's record."""
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(InputError, match="contradicts|differ"):
        load_model(tiny_models[bundle], configs=[str(empty)], baseline=False)
    model = load_model(tiny_models[bundle], configs=["cpu_tiny"], baseline=False)  # agrees: accepted
    assert model.bundle == bundle


def test_record_less_checkpoint_loads_through_the_config_with_a_warning(tiny_models, tmp_path):
    state = torch.load(tiny_models["perx2ct"], weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({"model": state["model"]}, old)
    with pytest.warns(UserWarning, match="record"):
        model = load_model(str(old), bundle="perx2ct", configs=["cpu_tiny"], baseline=False)
    assert model.record is None and model.volume_shape == (32, 32, 32)


def test_pe_model_alone(tiny_models, tmp_path, pair):
    pe = load_pe_model(tiny_models["pe_classifier"])
    assert pe.api.modality == "ct" and pe.describe()["training_prevalence"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="needs a ct"):
        pe.api.probability(xray=pair["pa"])


def test_xray_pe_classifier_reads_the_input_pa(tiny_models, pair, tmp_path):
    pl.pipeline(tiny_models["latent_ddpm"], str(tmp_path), pa=pair["pa"], sampling_steps=2,
                pe_checkpoint=tiny_models["pe_classifier_xray"])  # fmt: skip
    pe = json.loads((tmp_path / PAIR / "report.json").read_text())["pe"]
    assert pe["modality"] == "xray" and pe["input"] == "the input PA X-ray" and 0 <= pe["probability"] <= 1


def test_cascade_reads_dataset_drrs_like_any_radiograph(tiny_models):
    """The config's preprocessing chain (DRR NIfTI files) and common.xray.load_view give the same views."""
    from bundles.progressive_cascade.scripts.inference import CascadePredictor
    from common.xray import load_view

    cascade = CascadePredictor.from_checkpoint(tiny_models["progressive_cascade"])
    case = tiny_models["root"] / "data" / "phantom_000"
    pa, lateral = str(case / "pa.nii.gz"), str(case / "lateral.nii.gz")
    through_config = cascade.preprocess(pa, lateral)[0].numpy()
    through_load_view = np.stack([load_view(pa, cascade.xray_size, "pa"), load_view(lateral, cascade.xray_size, "lateral")])
    np.testing.assert_allclose(through_config, through_load_view, atol=1e-6)


def test_record_checks_inputs_and_allows_run_time_settings(tiny_models):
    """An HU window other than the recorded one is refused by name; a decoder's chunk size may differ."""
    from bundles.perx2ct.scripts.inference import BUNDLE_ROOT, PerX2CTInference
    from xray2ct.models import config_paths

    configs = config_paths("perx2ct", ["cpu_tiny"])
    with pytest.raises(InputError, match=r"hu_window=.*\(checkpoint\) vs .*x2ctgan.*\(config\)"):
        PerX2CTInference.from_bundle(BUNDLE_ROOT, tiny_models["perx2ct"], configs, hu_window="x2ctgan")
    api = PerX2CTInference.from_bundle(BUNDLE_ROOT, tiny_models["perx2ct"], configs, **{"network_def#chunk_size": 3})
    assert api.net.chunk_size == 3


def test_dicom_frontal_through_the_one_view_model(tiny_models, shared_data, tmp_path):
    dicoms = sorted((shared_data / "cxr" / "frontal").glob("*.dcm"))
    if not dicoms:
        pytest.skip("no real DICOM chest X-ray under ../shared/data/cxr/frontal")
    summary = pl.main(checkpoint=tiny_models["latent_ddpm"], pa=str(dicoms[0]), case="cr_dicom",
                      output_dir=str(tmp_path), sampling_steps=2)  # fmt: skip
    assert summary["written"] == 1
    report = json.loads((tmp_path / "cr_dicom" / "report.json").read_text())
    assert report["inputs"]["pa"]["file"] == str(dicoms[0]) and report["ct"]["shape"] == [32, 32, 32]
    assert math.isfinite(report["drr_consistency"]["drr_psnr_pa"])


def test_perx2ct_server_refuses_a_contradicting_config(tiny_models, tmp_path, monkeypatch):
    """The inference server builds from the record too, and stops with the differing arguments named."""
    from bundles.perx2ct.scripts.server import main, write_key_file

    monkeypatch.delenv("XRAY2CT_SERVER_KEY", raising=False)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    key = write_key_file(tmp_path / "key")
    full_size = str(REPO / "bundles" / "perx2ct" / "configs" / "inference.json")
    with pytest.raises(SystemExit, match="cannot start the server: .*contradicts the checkpoint's record: .*image_size"):
        main(key_file=key, checkpoint=tiny_models["perx2ct"], config_files=[full_size], device="cpu")
    with pytest.raises(SystemExit, match="empty.json: config defines no 'network_def'"):
        main(key_file=key, checkpoint=tiny_models["perx2ct"], config_files=[str(empty)], device="cpu")


def test_drr_consistency_matches_a_hand_computation():
    """Views = the CT's own DRRs + 0.1: L1 is 0.1 and PSNR (data range 1) is -10 log10(0.1^2) = 20 dB per view."""
    from common.drr import DRRGeometry
    from common.volume import Volume
    from xray2ct.models import XrayToCTModel, score_against_inputs

    geometry = DRRGeometry("tiny", sad=700.0, sid=1200.0, detector_pixels=(16, 16), detector_size_mm=(300.0, 300.0))
    model = XrayToCTModel(
        name="hand", bundle="hand", needs_lateral=True, image_size=16, volume_shape=(16, 16, 16),
        spacing=(12.0, 12.0, 12.0), geometry=geometry, preprocess=None, reconstruct=None,
    )  # fmt: skip
    hu = np.full((16, 16, 16), -1000.0, np.float32)
    hu[4:12, 5:11, 3:13] = 300.0
    volume = Volume.from_spacing(hu, (12.0, 12.0, 12.0))
    _, drrs = score_against_inputs(model, volume, np.zeros((2, 16, 16), np.float32))
    views = np.stack([drrs["pa"], drrs["lateral"]]) + 0.1
    scores, _ = score_against_inputs(model, volume, views)
    for view in ("pa", "lateral"):
        assert scores[f"drr_l1_{view}"] == pytest.approx(0.1, abs=1e-5)
        assert scores[f"drr_psnr_{view}"] == pytest.approx(20.0, abs=1e-3)
    assert scores["drr_psnr"] == pytest.approx(20.0, abs=1e-3) and drrs["pa"].std() > 0.01
