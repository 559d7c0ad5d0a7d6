"""No meaningless PE numbers (issue 22, item 6): the pipeline and the web app refuse a PE classifier trained on
another contrast phase, field of view or a finer grid than the generated CT's, and crop-and-resample only a
finer, larger CT. The tiny models (conftest ``tiny_models``) are trained on 32^3 phantoms at 10 mm (CTPA); the
mismatched classifiers are the tiny one with its record's inputs rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REAL_PAIR as PAIR

from common.errors import InputError
from common.io import load_volume
from xray2ct import pipeline as pl
from xray2ct.models import load_model, load_pe_model


def _rewritten(source: str, target: Path, **inputs) -> str:
    """A copy of a checkpoint whose record's ``inputs`` are updated with ``inputs``."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    record = json.loads(state["record"]["json"])
    record["inputs"].update(inputs)
    state["record"]["json"] = json.dumps(record)
    torch.save(state, target)
    return str(target)


def _grid(fov: float, size: int) -> dict:
    return {"field_of_view_mm": {"min": [fov] * 3, "max": [fov] * 3}, "ct_size": [size] * 3,
            "grid_spacing_mm": {"min": [fov / size] * 3, "max": [fov / size] * 3}}  # fmt: skip


def test_the_tiny_classifier_records_its_training_ct_grid_and_phase(tiny_models):
    pe = load_pe_model(tiny_models["pe_classifier"])
    described = pe.describe()
    assert described["contrast_phase"] == "ctpa"  # the phantoms' arteries hold contrast
    assert described["ct_grid"]["field_of_view_mm"]["min"] == [320.0] * 3  # 32 voxels at 10 mm
    assert load_model(tiny_models["latent_ddpm"], baseline=False).contrast_phase == "ctpa"
    assert load_pe_model(tiny_models["pe_classifier_xray"]).describe()["ct_grid"] is None


REFUSED = {  # record inputs of the classifier -> words of the refusal
    "non-contrast classifier": ({"contrast_phase": "non_contrast"}, "trained on non_contrast CTs"),
    "4 mm CTPA crops (issue 22)": ({"ct_grid": _grid(128.0, 32)}, "coarser than the classifier's 4.00 mm grid"),
    "larger field of view": ({"ct_grid": _grid(400.0, 32)}, "covers 320 mm along x"),
    "no recorded grid": ({"ct_grid": None}, "no field of view"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_pipeline_refuses_a_mismatched_classifier(name, tiny_models, pair, tmp_path):
    inputs, words = REFUSED[name]
    pe = _rewritten(tiny_models["pe_classifier"], tmp_path / "pe.pt", **inputs)
    with pytest.raises(SystemExit, match=words) as raised:
        pl.main(checkpoint=tiny_models["progressive_cascade"], pa=pair["pa"], lateral=pair["lateral"],
                output_dir=str(tmp_path / "out"), pe_checkpoint=pe, baseline=False)  # fmt: skip
    assert "pe.pt" in str(raised.value) and "PE classifier refused" in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_a_finer_larger_ct_is_cropped_then_resampled(tiny_models, pair, tmp_path):
    """A classifier of 16^3 voxels on 160 mm (10 mm grid) gets the centred 16^3 crop of the 32^3, 10 mm CT."""
    pe = _rewritten(tiny_models["pe_classifier"], tmp_path / "pe.pt", ct_size=[16] * 3, ct_grid=_grid(160.0, 16))
    pl.main(checkpoint=tiny_models["perx2ct"], pa=pair["pa"], lateral=pair["lateral"],
            output_dir=str(tmp_path), pe_checkpoint=pe, baseline=False)  # fmt: skip
    report = json.loads((tmp_path / PAIR / "report.json").read_text())
    grid = report["pe"]["input_grid"]
    assert grid["action"] == "crop_and_resample" and grid["crop_voxels"] == [16] * 3
    assert 0.0 <= report["pe"]["probability"] <= 1.0 and "cropped" in grid["summary"]
    crop = load_volume(tmp_path / PAIR / grid["file"])
    assert crop.shape == (16, 16, 16) and crop.spacing == pytest.approx((10.0,) * 3)


def test_matching_classifier_reports_what_was_done(tiny_models, pair, tmp_path):
    pl.main(checkpoint=tiny_models["progressive_cascade"], pa=pair["pa"], lateral=pair["lateral"],
            output_dir=str(tmp_path), pe_checkpoint=tiny_models["pe_classifier"], baseline=False)  # fmt: skip
    pe = json.loads((tmp_path / PAIR / "report.json").read_text())["pe"]
    assert pe["input_grid"]["action"] == "as_is" and 0.0 <= pe["probability"] <= 1.0


def test_web_app_refuses_per_model_and_when_it_fits_none(tiny_models, tmp_path):
    from webapp.loaders import classifier_refusals, load_models

    models = load_models([tiny_models["perx2ct"]], baseline=False)
    fits = load_pe_model(tiny_models["pe_classifier"])
    assert classifier_refusals(fits, models) == {}
    assert classifier_refusals(None, models) == {}
    bad = load_pe_model(_rewritten(tiny_models["pe_classifier"], tmp_path / "pe.pt", contrast_phase="non_contrast"))
    with pytest.raises(InputError, match="non_contrast"):
        classifier_refusals(bad, models)
    # a job's result carries the refusal, not a probability
    model = next(iter(models.values()))
    volume = load_volume(tiny_models["root"] / "data" / "phantom_000" / "ct.nii.gz")
    result = bad.assess_volume(volume, model.contrast_phase, None, None, str(tmp_path))
    assert result["probability"] is None and "non_contrast" in result["refused"]


@pytest.mark.slow
def test_issue_22_a_classifier_of_4mm_ctpa_crops_is_refused_for_a_10mm_chest(tiny_models, pair, tmp_path):
    """Not a rewritten record: a classifier trained (one epoch) on the demo's PE dataset, 32^3 CTPA crops at
    4 mm (a 128 mm field of view), against the cascade's 32^3 whole chest at 10 mm."""
    from monai.bundle import run

    from data_prep.phantom import make_pe_dataset

    data = tmp_path / "pe_data"
    make_pe_dataset(data, n_patients=(2, 1, 1), size=32, spacing=4.0)
    configs = Path(__file__).resolve().parents[1] / "bundles" / "pe_classifier" / "configs"
    run("training", config_file=[str(configs / "train.json"), str(configs / "cpu_tiny.json")],
        meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"), max_epochs=1,
        bundle_root=str(tmp_path / "pe"), output_dir=str(tmp_path / "pe_out"), dataset_dir=str(data))  # fmt: skip
    checkpoint = str(next((tmp_path / "pe" / "models").glob("model*.pt")))
    described = load_pe_model(checkpoint).describe()
    assert described["contrast_phase"] == "ctpa"
    assert described["ct_grid"]["grid_spacing_mm"]["max"] == pytest.approx([4.0] * 3)
    with pytest.raises(SystemExit, match="spacing 10.00 mm along x is coarser than the classifier's 4.00 mm grid"):
        pl.main(checkpoint=tiny_models["progressive_cascade"], pa=pair["pa"], lateral=pair["lateral"],
                output_dir=str(tmp_path / "out"), pe_checkpoint=checkpoint, baseline=False)  # fmt: skip
