"""The one inference path (common.predictor): settings resolved once, one read of the checkpoint, the mean-CT
baseline carried by the checkpoint (and the fallback for older ones), the one writer's names, the inputs."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from common.baselines import BASELINE_KEY, mean_ct_baseline, mean_ct_state, mean_training_ct
from common.checkpoint import (
    LEGACY_PREDICTION_TYPE,
    CheckpointRecord,
    CheckpointSaver,
    InferenceSettings,
    build_for_inference,
    read_checkpoint,
    read_config,
    resolve_settings,
)
from common.contract import renamed
from common.errors import InputError
from common.predictor import (
    Prediction,
    Predictor,
    inference_items,
    postprocess,
    prediction_paths,
    preview_paths,
    write_prediction,
    write_previews,
)
from common.volume import Volume

REPO = Path(__file__).resolve().parents[1]
PERX2CT = REPO / "bundles" / "perx2ct"
CONFIGS = [str(PERX2CT / "configs" / "inference.json"), str(PERX2CT / "configs" / "cpu_tiny.json")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from data_prep.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("predictor_data")
    make_phantom_dataset(root, n_cases=6, size=32, spacing=10.0, geometry="x2ctgan", drr_pixels=32, seed=0)
    return root


@pytest.fixture(scope="module")
def checkpoints(dataset, tmp_path_factory) -> dict:
    """A tiny perx2ct checkpoint as training writes it now (with the stored mean CT) and as before (without)."""
    parser = read_config(CONFIGS, {"bundle_root": str(PERX2CT), "dataset_dir": str(dataset)})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    inputs = {k: parser.get_parsed_content(k) for k in ("image_size", "volume_size", "spacing", "geometry", "hu_window")}
    record = CheckpointRecord("perx2ct", network=net, inputs=inputs, version="0", datalist=dataset / "dataset.json")
    folder = tmp_path_factory.mktemp("predictor_ckpt")
    state = {"model": net.state_dict(), "record": record.state_dict()}
    torch.save({**state, BASELINE_KEY: mean_ct_state(record.data)}, folder / "model.pt")
    torch.save(state, folder / "old.pt")
    return {"new": folder / "model.pt", "old": folder / "old.pt", "record": record.data}


def test_build_for_inference_resolves_the_settings_once(checkpoints):
    network, record, parser, settings = build_for_inference(checkpoints["new"], default_config_files=CONFIGS[:1])
    assert isinstance(settings, InferenceSettings) and settings.bundle == "perx2ct"
    assert settings.hu_window.name == "xray2ct" and settings.prediction_type is None
    assert settings.spacing == tuple(record["network_def"]["spacing"])
    assert settings.image_size == record["network_def"]["image_size"] == 32
    assert settings.geometry.name == "x2ctgan" and settings.geometry.detector_pixels == (32, 32)
    assert settings.checkpoint == str(checkpoints["new"])
    # a diffusion record without prediction_type predicted the noise (written once: LEGACY_PREDICTION_TYPE)
    old_ldm = resolve_settings({"bundle": "latent_ddpm", "inputs": {"xray_size": 16, "spacing": [2, 2, 2]}},
                               parser=_Parser(prediction_type="sample"))  # fmt: skip
    assert old_ldm.prediction_type == LEGACY_PREDICTION_TYPE and old_ldm.image_size == 16


class _Parser(dict):
    """The two ConfigParser calls resolve_settings makes."""

    def get_parsed_content(self, key):
        return self[key]


def test_web_path_reads_the_checkpoint_once_and_its_stored_baseline(checkpoints, monkeypatch):
    """issue 25: one file was torch.load'ed four times on the web path, and the baseline rebuilt from every
    training CT at each start; now one read, and the mean CT comes out of the checkpoint."""
    from webapp.loaders import load_models

    loads, original = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(str(f)) or original(f, *a, **k))
    models = load_models([str(checkpoints["new"])], configs=["cpu_tiny"])
    (model,) = models.values()
    assert loads.count(str(checkpoints["new"])) == 1, loads
    assert "stored mean training CT" in model.baseline.get("source", str(model.baseline)) and model.baseline["n_cases"] >= 1
    assert model.geometry.detector_pixels == (model.image_size,) * 2 and model.spacing == (10.0, 10.0, 10.0)


def test_checkpoints_without_a_stored_baseline_fall_back_to_the_datalist(checkpoints, dataset):
    record = checkpoints["record"]
    stored = mean_ct_baseline(record, read_checkpoint(checkpoints["new"]), str(checkpoints["new"]))
    rebuilt = mean_ct_baseline(record, read_checkpoint(checkpoints["old"]), str(checkpoints["old"]))
    assert rebuilt["source"] == str(dataset / "dataset.json")
    np.testing.assert_array_equal(stored["volume"].array, rebuilt["volume"].array)  # the same float32 mean
    items = json.loads((dataset / "dataset.json").read_text())["training"]
    np.testing.assert_array_equal(stored["volume"].array, mean_training_ct(dataset / i["ct"] for i in items))
    assert stored["volume"].spacing == pytest.approx((10.0, 10.0, 10.0))
    assert "unavailable" in mean_ct_baseline({"datalist": {"file": str(dataset / "moved.json")}})


@pytest.mark.parametrize(
    "entry,problem",
    [
        ({"mean_ct": torch.zeros(4, 4), "spacing": torch.ones(3, dtype=torch.float64)}, "3D float"),
        ({"mean_ct": torch.zeros(4, 4, 4), "spacing": torch.zeros(3, dtype=torch.float64)}, "spacing"),
        ({"mean_ct": torch.full((2, 2, 2), float("nan")), "spacing": torch.ones(3, dtype=torch.float64)}, "NaN"),
    ],
)
def test_a_stored_baseline_is_checked(entry, problem):
    with pytest.raises(InputError, match=problem):
        mean_ct_baseline(None, {BASELINE_KEY: entry}, "x.pt")


def test_the_saver_adds_the_mean_ct_to_xray_to_ct_checkpoints(checkpoints, tmp_path):
    net = torch.nn.Linear(1, 1)
    for bundle, expected in (("perx2ct", True), ("vqgan_3d_patch", False)):
        record = CheckpointRecord(bundle, network_def={"_target_": "torch.nn.Linear"},
                                  datalist=checkpoints["record"]["datalist"]["file"], version="0")  # fmt: skip
        saver = CheckpointSaver(str(tmp_path), {"model": net, "record": record}, save_final=True)
        assert (BASELINE_KEY in saver.save_dict) is expected
        if expected:
            state = saver.save_dict[BASELINE_KEY].state_dict()
            assert state["mean_ct"].shape == (32, 32, 32) and state["n_cases"] >= 1


def _volume(n: int, value: float) -> Volume:
    return Volume.from_spacing(np.full((n, n, n), value, np.float32), (1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "case,names,files",
    [
        ("p1", ["ct"], {"ct": "p1_ct.nii.gz", "preview": "p1_preview.png", "gif": "p1_axial.gif"}),
        (None, ["ct"], {"ct": "ct.nii.gz", "preview": "preview.png", "gif": "axial.gif"}),
        ("p1", ["stage1", "stage2"], {"ct": "p1_ct.nii.gz", "stage1": "p1_stage1.nii.gz",
                                      "stage2": "p1_stage2.nii.gz", "preview": "p1_preview.png", "gif": "p1_axial.gif"}),
    ],
)  # fmt: skip
def test_one_writer_one_naming_scheme(case, names, files, tmp_path):
    volumes = {n: _volume(4 * (k + 1), k) for k, n in enumerate(names)}
    prediction = Prediction(volumes, np.zeros((2, 8, 8), np.float32))
    written = write_prediction(prediction, tmp_path, case)
    assert {k: os.path.basename(v) for k, v in written.items()} == files
    assert all(os.path.getsize(p) > 0 for p in written.values())
    assert prediction_paths(tmp_path, case, names) == {k: str(tmp_path / v) for k, v in files.items()}
    escaped = prediction_paths(tmp_path, "../escape", names)  # common.datalist.safe_case_name: stays in the folder
    assert all(Path(p).parent == tmp_path and "escape-" in Path(p).name for p in escaped.values())


@pytest.mark.parametrize(
    "case,kind,gif,files",
    [
        ("p1", None, True, {"preview": "p1_preview.png", "gif": "p1_axial.gif"}),  # inference, demos
        ("p1", None, False, {"preview": "p1_preview.png"}),  # the evaluation report's montage
        ("p1", "stages", False, {"preview": "p1_preview_stages.png"}),  # the cascade's stages beside the report's
        (None, "stages", True, {"preview": "preview_stages.png", "gif": "axial_stages.gif"}),
    ],
)  # fmt: skip
def test_previews_of_every_kind_follow_the_one_scheme(case, kind, gif, files, tmp_path):
    """Evaluation previews and montages of other kinds are named by the same rule as the inference outputs."""
    from PIL import Image

    volumes = {"model": _volume(8, 0.0), "baseline": _volume(8, 100.0)}
    written = write_previews(volumes, np.zeros((2, 8, 8), np.float32), ("pa", "lateral"), tmp_path, case,
                             reference=_volume(8, -500.0), kind=kind, gif=gif, reference_name="input")  # fmt: skip
    assert {k: os.path.basename(v) for k, v in written.items()} == files
    assert {k: v for k, v in preview_paths(tmp_path, case, kind).items() if k in files} == written
    with Image.open(written["preview"]) as image:  # 4 rows: the reference, model, baseline, the X-rays
        assert image.height > image.width  # three volume rows of three 8 mm panels each, then the X-rays


def test_postprocessing_is_the_configs(dataset):
    """The Compose the config declares is what runs (default: the clamp to the unit window)."""
    from monai.transforms import Compose, Lambdad

    from bundles.perx2ct.scripts.inference import PerX2CTInference
    from bundles.perx2ct.scripts.networks import PerX2CTNet

    unit = torch.tensor([-0.5, 0.25, 1.5]).view(1, 1, 1, 3)
    assert postprocess(None, unit).flatten().tolist() == [-0.5, 0.25, 1.5]
    parser = read_config(CONFIGS, {"bundle_root": str(PERX2CT), "dataset_dir": str(dataset)})
    declared = parser.get_parsed_content("postprocessing")
    assert postprocess(declared, unit).flatten().tolist() == [0.0, 0.25, 1.0]

    torch.manual_seed(0)
    net = PerX2CTNet(volume_size=16, spacing=(20.0,) * 3, image_size=16, feature_res=4, encoder_block="basic",
                     encoder_layers=(1, 1), encoder_inplanes=(8, 8), latent_dim=8, pe_multires=2,
                     decoder_channels=(8, 8, 8), decoder_res_blocks=1, norm_num_groups=4, attention=False)  # fmt: skip
    views = np.random.default_rng(0).random((2, 16, 16), dtype=np.float32)
    plain = PerX2CTInference(net, device="cpu", postprocessing=Compose([]))
    half = PerX2CTInference(net, device="cpu", postprocessing=Compose([Lambdad("pred", lambda x: x * 0 + 0.5)]))
    assert isinstance(plain, Predictor)
    a, b = plain.infer_views(views).ct.array, half.infer_views(views).ct.array
    window = plain.settings.hu_window
    assert not np.all(a == a.flat[0])
    np.testing.assert_array_equal(b, np.float32(window.lo + 0.5 * window.width))  # exact in float32 (512 HU)


def test_inference_items_the_contracts_input_path(dataset, tmp_path):
    case = dataset / "phantom_000"
    test_ids = [i["id"] for i in json.loads((dataset / "dataset.json").read_text())["test"]]
    two, one = ["pa", "lateral"], ["pa"]
    assert [Path(i["id"]).name for i in inference_items("", dataset / "dataset.json", "test", two)] == test_ids
    folder = inference_items(str(case), dataset / "dataset.json", "test", two)
    assert folder == [{"id": "phantom_000", "pa": str(case / "pa.nii.gz"), "lateral": str(case / "lateral.nii.gz")}]
    assert inference_items({"pa": "a.png", "lateral": "b.png"}, "", "test", two) == [{"pa": "a.png", "lateral": "b.png"}]
    assert inference_items(str(case / "pa.nii.gz"), "", "test", one) == [{"pa": str(case / "pa.nii.gz")}]
    with pytest.raises(InputError, match="case folder"):
        inference_items(str(case / "pa.nii.gz"), "", "test", two)
    with pytest.raises(InputError, match="lateral"):
        inference_items({"pa": "a.png"}, "", "test", two)
    with pytest.raises(InputError, match="not found"):
        inference_items(str(tmp_path / "nothing"), "", "test", one)
    with pytest.raises(InputError, match="not found|no cases|has no"):
        inference_items("", tmp_path / "dataset.json", "test", one)


def test_old_ids_are_accepted_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed(None, "checkpoint", "ckpt_path", "new.pt") == "new.pt"
    with pytest.warns(DeprecationWarning, match="ckpt_path"):
        assert renamed("old.pt", "checkpoint", "ckpt_path", "new.pt") == "old.pt"
