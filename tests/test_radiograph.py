"""common.radiograph and the pipeline's ``preparation`` (issue 22, item 1): clinical films onto the training
DRRs' scale. Films are the real ones of ``../shared/data/cxr``; a DICOM with spacing tags, MONOCHROME1, a
collimated film, a burnt-in marker and an AP film are synthesised from them (no such files exist)."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from helpers import write_film
from PIL import Image

from common.drr import X2CTGAN, get_geometry
from common.radiograph import (
    ADULT_BODY_MM,
    ADULT_THORAX_MM,
    CLINICAL_SID_MM,
    ISOCENTRE_TO_DETECTOR_MM,
    collimation_box,
    prepare_view,
    read_tags,
)

GEOMETRY = X2CTGAN.resized(64)
TRAINING_MM = float(np.mean(GEOMETRY.isocenter_pixel_spacing))  # 500 mm / 64 px / (949 / 541)


@pytest.fixture(scope="module")
def cxr(shared_data):
    folder = shared_data / "cxr"
    dicom = sorted((folder / "frontal").glob("*.dcm"))
    png = folder / "frontal" / "00000001_000.png"
    if not dicom or not png.is_file():
        pytest.skip(f"real radiographs missing under {folder}")
    pixels = pydicom.dcmread(dicom[0]).pixel_array[::2, ::2].astype(np.uint16) * 16  # 512^2, 12 bits
    return {"dicom": dicom[0], "png": png, "pixels": pixels, "folder": folder}


# tags -> (mm of patient per pixel at the isocentre, words of the scale source): 512 px at 0.8 mm = a 41 cm film
PA_SID, AP_SID = CLINICAL_SID_MM["PA"], CLINICAL_SID_MM["AP"]
DEPTH = ISOCENTRE_TO_DETECTOR_MM["pa"]
SCALES = {
    "ImagerPixelSpacing + magnification factor": (
        {"ImagerPixelSpacing": [0.8, 0.8], "EstimatedRadiographicMagnificationFactor": 1.1, "ViewPosition": "PA"},
        0.8 / 1.1, "EstimatedRadiographicMagnificationFactor"),
    "ImagerPixelSpacing + SID": (
        {"ImagerPixelSpacing": [0.8, 0.8], "DistanceSourceToDetector": 1500, "ViewPosition": "PA"},
        0.8 * (1500 - DEPTH) / 1500, "DistanceSourceToDetector"),
    "ImagerPixelSpacing alone: a typical PA film": (
        {"ImagerPixelSpacing": [0.8, 0.8], "ViewPosition": "PA"}, 0.8 * (PA_SID - DEPTH) / PA_SID, "typical PA"),
    "AP film: a portable's SID": (
        {"ImagerPixelSpacing": [0.8, 0.8], "ViewPosition": "AP"}, 0.8 * (AP_SID - DEPTH) / AP_SID, "typical AP"),
    "calibrated PixelSpacing": ({"PixelSpacing": [0.75, 0.75]}, 0.75, "DICOM PixelSpacing"),
    "PixelSpacing calibrated beside ImagerPixelSpacing": (
        {"PixelSpacing": [0.7, 0.7], "ImagerPixelSpacing": [0.8, 0.8]}, 0.7, "DICOM PixelSpacing"),
    "PixelSpacing equal to ImagerPixelSpacing: not calibrated": (
        {"PixelSpacing": [0.8, 0.8], "ImagerPixelSpacing": [0.8, 0.8]}, 0.8 * (PA_SID - DEPTH) / PA_SID, "typical PA"),
    "implausible magnification factor ignored": (
        {"ImagerPixelSpacing": [0.8, 0.8], "EstimatedRadiographicMagnificationFactor": 1e-9},
        0.8 * (PA_SID - DEPTH) / PA_SID, "typical PA"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCALES))
def test_dicom_tags_give_the_scale(name, cxr, tmp_path):
    tags, mm, words = SCALES[name]
    path = write_film(tmp_path / "film.dcm", cxr["pixels"], **tags)
    out, info = prepare_view(path, "pa", GEOMETRY, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32 and 0.0 <= out.min() < out.max() <= 1.0
    assert words in info["scale_source"] and info["scale_source"].startswith("DICOM")
    assert info["input_mm_per_pixel"] == pytest.approx(mm, rel=1e-12)
    assert info["training_mm_per_pixel"] == pytest.approx(TRAINING_MM, rel=1e-12)
    assert info["scale"] == pytest.approx(mm / TRAINING_MM, rel=1e-12)
    assert any("AP film" in w for w in info["warnings"]) == (tags.get("ViewPosition") == "AP")
    assert info["view_position"] == tags.get("ViewPosition")
    magnification = tags.get("EstimatedRadiographicMagnificationFactor", 1.0)
    assert any("not a film's" in w for w in info["warnings"]) == (magnification < 1)


def test_the_real_cr_dicom_scale_is_implausible_and_estimated(cxr):
    """Its PixelSpacing (0.168 mm) belongs to the full-size film, not its 1024^2 pixels: a 17 cm chest."""
    assert read_tags(str(cxr["dicom"]))["PixelSpacing"] == pytest.approx([0.168, 0.168])
    _, info = prepare_view(cxr["dicom"], "pa", GEOMETRY, 64)
    assert info["scale_source"].startswith("estimate")
    assert any("172 mm wide" in w for w in info["warnings"])


def test_png_scale_is_estimated_from_the_body_or_lungs(cxr, shared_data):
    _, info = prepare_view(cxr["png"], "pa", GEOMETRY, 64)
    assert info["scale_source"].startswith("estimate")
    fields = info["lung_fields"] if "lung" in info["scale_source"] else info["body"]
    reference = ADULT_THORAX_MM if "lung" in info["scale_source"] else ADULT_BODY_MM["pa"]
    assert fields["width_mm"] == pytest.approx(reference, rel=1e-9)
    lateral = shared_data / "cxr" / "pairs" / "pneumocystis-pneumonia-2-L.png"
    _, info = prepare_view(lateral, "lateral", GEOMETRY, 64)
    assert info["scale_source"].startswith(("estimate", "assumed")) and info["view"] == "lateral"


def test_monochrome1_prepares_like_monochrome2(cxr, tmp_path):
    tags = {"ImagerPixelSpacing": [0.8, 0.8], "ViewPosition": "PA"}
    mono2 = write_film(tmp_path / "m2.dcm", cxr["pixels"], **tags)
    mono1 = write_film(tmp_path / "m1.dcm", 4095 - cxr["pixels"], "MONOCHROME1", **tags)
    a, info_a = prepare_view(mono2, "pa", GEOMETRY, 64)
    b, info_b = prepare_view(mono1, "pa", GEOMETRY, 64)
    assert info_b["photometric"] == "MONOCHROME1"
    # the inversion and min/max scaling are exact in float64; float32 rounding of [0, 1] values: 6e-8
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_collimation_border_is_cropped(cxr, tmp_path):
    film = np.asarray(Image.open(cxr["png"]).convert("L"))
    collimated = np.full((film.shape[0] + 70, film.shape[1] + 90), 250, dtype=np.uint8)  # collimator shadow
    collimated[40 : 40 + film.shape[0], 50 : 50 + film.shape[1]] = film
    Image.fromarray(collimated).save(tmp_path / "collimated.png")
    gray = collimated.astype(np.float32) / 255
    assert collimation_box(gray) == (40, 30, 50, 40)
    a, info_a = prepare_view(cxr["png"], "pa", GEOMETRY, 64)
    b, info_b = prepare_view(tmp_path / "collimated.png", "pa", GEOMETRY, 64)
    assert info_b["collimation"] == {"top": 40, "bottom": 30, "left": 50, "right": 40}
    np.testing.assert_array_equal(a, b)  # the same pixels after the crop: the same arithmetic


def test_burnt_in_marker_is_filled(cxr, tmp_path):
    film = np.asarray(Image.open(cxr["png"]).convert("L")).copy()
    film[30:46, 400:404] = 255  # an "L": a vertical and a horizontal bar
    film[42:46, 400:412] = 255
    Image.fromarray(film).save(tmp_path / "marker.png")
    _, info = prepare_view(tmp_path / "marker.png", "pa", GEOMETRY, 64)
    assert info["markers_filled"] >= 16 * 4 + 4 * 8


def test_pipeline_reports_the_preparation(tiny_models, shared_data, tmp_path):
    from xray2ct import pipeline as pl

    folder = shared_data / "cxr" / "pairs"
    pa, lateral = folder / "pneumocystis-pneumonia-2-PA.png", folder / "pneumocystis-pneumonia-2-L.png"
    for preparation in ("geometry", "legacy"):
        out = tmp_path / preparation
        pl.main(checkpoint=tiny_models["progressive_cascade"], pa=str(pa), lateral=str(lateral),
                output_dir=str(out), baseline=False, previews=False, preparation=preparation)  # fmt: skip
        block = json.loads((out / "pneumocystis-pneumonia-2" / "report.json").read_text())["preparation"]
        assert block["method"] == preparation and set(block["views"]) == {"pa", "lateral"}
        for info in block["views"].values():
            assert info["scale_source"].startswith(("estimate", "assumed") if preparation == "geometry" else "none")
    with pytest.raises(SystemExit, match="unknown --preparation"):
        pl.main(checkpoint=tiny_models["progressive_cascade"], pa=str(pa), lateral=str(lateral),
                output_dir=str(tmp_path / "x"), baseline=False, preparation="magic")  # fmt: skip


def test_clinical_geometry_training_scale():
    """A model trained on clinical DRRs sees the patient at 430 mm / 64 px / (1800 / 1640) per pixel."""
    clinical = get_geometry("clinical").resized(64)
    assert float(np.mean(clinical.isocenter_pixel_spacing)) == pytest.approx(430 / 64 / (1800 / 1640))
    lateral = clinical.for_view("lateral")
    assert float(np.mean(lateral.isocenter_pixel_spacing)) == pytest.approx(430 / 64 / (1500 / 1320))


def test_quantile_matching_takes_the_reference_distribution_and_keeps_the_order():
    from common.radiograph import match_quantiles

    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32) ** 3  # a skewed film
    reference = np.linspace(0.2, 0.7, 101)  # a uniform DRR distribution on [0.2, 0.7]
    out = match_quantiles(image, reference)
    # 4096 distinct values: mid-rank quantiles (k + 0.5) / 4096 fall on the reference's linear pieces
    expected = 0.2 + 0.5 * (np.argsort(np.argsort(image.ravel())) + 0.5) / image.size
    np.testing.assert_allclose(out.ravel(), expected, atol=1e-6)  # float32 of values in [0, 1]
    assert (np.argsort(out.ravel(), kind="stable") == np.argsort(image.ravel(), kind="stable")).all()


def test_agreement_is_invariant_to_monotone_maps():
    from common.agreement import agreement_scores, rank_correlation

    rng = np.random.default_rng(1)
    drr = rng.random((32, 32))
    film = drr + 0.3 * rng.random((32, 32))
    rho = rank_correlation(drr, film)
    assert 0.5 < rho < 1.0
    assert rank_correlation(drr, np.exp(3 * film) - 7) == pytest.approx(rho, abs=1e-12)  # ranks unchanged
    assert rank_correlation(drr, -film) == pytest.approx(-rho, abs=1e-12)
    scores = agreement_scores({"pa": drr}, np.stack([film, film]), ["pa", "lateral"])
    assert scores == {"pa": pytest.approx(rho), "mean": pytest.approx(rho)}


def test_pipeline_matches_intensity_to_the_recorded_drrs(tiny_models, shared_data, tmp_path):
    from xray2ct import pipeline as pl

    folder = shared_data / "cxr" / "pairs"
    pa, lateral = folder / "pneumocystis-pneumonia-2-PA.png", folder / "pneumocystis-pneumonia-2-L.png"
    reports = {}
    for intensity in ("match", "none"):
        out = tmp_path / intensity
        pl.main(checkpoint=tiny_models["progressive_cascade"], pa=str(pa), lateral=str(lateral),
                output_dir=str(out), previews=False, intensity=intensity)  # fmt: skip
        reports[intensity] = json.loads((out / "pneumocystis-pneumonia-2" / "report.json").read_text())
    matched = reports["match"]["preparation"]["intensity"]
    assert matched["method"] == "quantile_match" and matched["reference"].endswith(" cases)")
    assert reports["none"]["preparation"]["intensity"]["method"] == "none"
    # the fixed reference does not move with the intensity preparation: the mean CT's DRRs ignore the inputs,
    # so its agreement is identical whether the model's inputs were matched or not
    for report in reports.values():
        agreement = report["agreement"]
        assert agreement["measure"] == "spearman_rank_correlation"
        assert -1 <= agreement["ct"]["mean"] <= 1 and set(agreement["ct"]) == {"pa", "lateral", "mean"}
    assert reports["match"]["agreement"]["mean_ct"] == reports["none"]["agreement"]["mean_ct"]


def test_domain_gap_is_not_gamed_by_intensity_maps():
    """A gain, offset or quantile matching leaves the structure statistics (nearly) where they were."""
    from common.domain_gap import domain_gap, image_statistics
    from common.radiograph import match_quantiles

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:64, 0:64]
    image = np.clip(0.5 + 0.3 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + 0.05 * rng.standard_normal((64, 64)), 0, 1)
    base = image_statistics(image)
    scaled = image_statistics(0.2 + 0.5 * image)  # an affine map: the gain-free statistics are exact
    for key in ("spectral_slope", "gradient_cv", "fine_to_coarse"):
        assert scaled[key] == pytest.approx(base[key], rel=1e-9)
    reference = {"pa": {k: {"min": v, "max": v, "mean": v, "std": 0.0} for k, v in base.items()}}
    gap = domain_gap(image[None], ["pa"], reference)
    assert gap["score"] == pytest.approx(0.0, abs=1e-9) and gap["warnings"] == []
    # white noise matched to the image's own intensity quantiles: the intensity distance is ~0 by
    # construction, the structure statistics still say "another domain"
    noise = match_quantiles(rng.random((64, 64)), np.quantile(image, np.linspace(0, 1, 101)))
    np.testing.assert_allclose(np.quantile(noise, [0.05, 0.5, 0.95]), np.quantile(image, [0.05, 0.5, 0.95]),
                               atol=0.02)  # fmt: skip
    gap = domain_gap(noise[None], ["pa"], reference)
    assert gap["score"] > 3 and any("spectral_slope" in w for w in gap["warnings"])


def test_plausibility_of_a_phantom_chest_and_of_air():
    from common.plausibility import RANGES, plausibility
    from common.volume import Volume
    from data_prep.phantom import make_phantom

    ct, _ = make_phantom((64,) * 3, 6.0, seed=3)
    vol = ct if isinstance(ct, Volume) else Volume.from_spacing(ct, (6.0,) * 3)
    result = plausibility(vol)
    m = result["measures"]
    assert set(m) == set(RANGES) and all(v is not None for v in m.values())
    assert result["in_range"]["body_width_mm"] and result["in_range"]["lung_volume_l"]
    assert m["heart_offset_mm"] > 0  # the phantom's heart lies left of the midline
    air = plausibility(Volume.from_spacing(np.full((16,) * 3, -1000.0, np.float32), (10.0,) * 3))
    assert air["measures"]["lung_volume_l"] is None and "no body found" in air["warnings"][0]


def test_pipeline_report_has_the_checks(tiny_models, shared_data, tmp_path):
    from xray2ct import pipeline as pl

    folder = shared_data / "cxr" / "pairs"
    summary = pl.pipeline(tiny_models["progressive_cascade"], str(tmp_path), inputs=str(folder), previews=False)
    assert summary["written"] == 3 and summary["failed"] == 0
    for row in summary["cases_detail"]:
        assert row["domain_gap"] >= 0 and isinstance(row["warnings"], list) and set(row["scale_source"]) == {"pa", "lateral"}
        report = json.loads((tmp_path / row["folder"] / "report.json").read_text())
        assert set(report["domain_gap"]["views"]) == {"pa", "lateral"}
        assert set(report["plausibility"]["measures"]) >= {"lung_volume_l", "cardiothoracic_ratio"}


def test_web_job_shows_the_domain_gap_and_plausibility(tiny_models, shared_data, tmp_path):
    import io

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from helpers import wait_for_job

    from webapp.app import create_app
    from webapp.loaders import load_models

    models = load_models([tiny_models["progressive_cascade"]], baseline=False)
    pairs = shared_data / "cxr" / "pairs"
    upload = {v: (f"{v}.png", io.BytesIO((pairs / f"pneumocystis-pneumonia-2-{t}.png").read_bytes()))
              for v, t in (("pa", "PA"), ("lateral", "L"))}  # fmt: skip
    with TestClient(create_app(models, workdir=str(tmp_path)), base_url="http://localhost") as client:
        job = client.post("/api/jobs", files=upload, data={"model": next(iter(models))}).json()
        status = wait_for_job(client, job["id"], 2400)
        assert client.get("/static/viewer.js").text.count("function checksText") == 1
    assert status["state"] == "done", status
    assert status["domain_gap"]["score"] >= 0 and set(status["domain_gap"]["views"]) == {"pa", "lateral"}
    assert "cardiothoracic_ratio" in status["plausibility"]["measures"]
