"""What every bundle's configs share, checked once for all six: they parse and build with no data on disk,
inference.json stands alone, evaluation reads the test split (and stops when it is empty), the run aliases,
defaults live under bundle_root, and no bundle reaches into another."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from common.errors import InputError

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("vqgan_3d_patch", "latent_ddpm", "perx2ct", "progressive_cascade", "pix2pix_phase", "pe_classifier")
# the id whose evaluation finds an inference run's input (and stops when there is none)
INFERENCE_INPUT = {
    "vqgan_3d_patch": "datalist",
    "latent_ddpm": "input_files",
    "perx2ct": "datalist",
    "pix2pix_phase": "datalist",
    "pe_classifier": "datalist",
}


def configs(bundle: str, *names: str) -> list[str]:
    return [str(REPO / "bundles" / bundle / "configs" / n) for n in names]


def parser(bundle: str, *names: str, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config(configs(bundle, *names))
    p.update(overrides)
    p.parse()
    return p


def no_data(tmp_path: Path) -> dict:
    """A bundle root and a dataset folder that hold nothing."""
    return {"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(tmp_path / "no_dataset")}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_configs_parse_and_build_without_data(bundle, tmp_path):
    """As the model zoo's checks and MONAI Label parse them: no dataset, no latent cache, no weights."""
    where = no_data(tmp_path)
    for names in (("train.json",), ("train.json", "evaluate.json"), ("inference.json",), ("train.json", "multi_gpu_train.json")):
        for overlay in ((), ("cpu_tiny.json",)):
            p = parser(bundle, *names, *overlay, **where)
            assert "run" in p and "network_def" in p, names
    for names in (("train.json", "cpu_tiny.json"), ("inference.json", "cpu_tiny.json")):
        p = parser(bundle, *names, **where)
        assert p.get_parsed_content("network_def") is not None  # built without a dataset
    infer = parser(bundle, "inference.json", "cpu_tiny.json", **where)
    for key in ("preprocessing", "postprocessing"):
        assert infer.get_parsed_content(key) is not None, key
    if bundle != "latent_ddpm":  # its inferer samples with the trained VQ-GAN: nothing to build without weights
        assert infer.get_parsed_content("inferer") is not None
    assert "inferer" in infer


@pytest.mark.parametrize("bundle", BUNDLES)
def test_run_aliases_and_the_test_split(bundle):
    assert parser(bundle, "train.json")["run"] == "@training"
    evaluate = parser(bundle, "train.json", "evaluate.json")
    assert evaluate["run"] == "@evaluating" and evaluate["eval_split"] == "test"
    inference = parser(bundle, "inference.json")
    assert inference["run"] == "@inference"
    assert set(json.loads(Path(configs(bundle, "inference.json")[0]).read_text())) >= {"network_def", "imports", "bundle_root"}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_defaults_live_under_bundle_root(bundle):
    for name in ("train.json", "inference.json"):
        raw = json.loads(Path(configs(bundle, name)[0]).read_text())
        for key in ("dataset_dir", "ckpt_dir", "output_dir"):
            assert str(raw[key]).startswith("$os.path.join(@bundle_root"), (name, key, raw[key])
        assert raw["bundle_root"] == "."


@pytest.mark.parametrize("bundle", BUNDLES)
def test_no_bundle_reaches_into_another(bundle):
    others = "|".join(b for b in BUNDLES if b != bundle)
    pattern = re.compile(rf"bundles[./\\]({others})\b|['\"]\.\.['\"]")
    folder = REPO / "bundles" / bundle
    for path in [*folder.glob("scripts/*.py"), *folder.glob("configs/*.json")]:
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, (path, hits)


@pytest.fixture(scope="module")
def no_test_split(phantom_pairs, tmp_path_factory) -> Path:
    """The phantom datalist with an empty test split."""
    root = tmp_path_factory.mktemp("no_test_split")
    meta = json.loads(Path(phantom_pairs["datalist"]).read_text())
    for split in ("training", "validation"):
        for item in meta[split]:
            for key in ("ct", "pa", "lateral"):
                item[key] = str(Path(phantom_pairs["root"]) / item[key])
    meta["test"] = []
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluation_stops_when_the_test_split_is_empty(bundle, no_test_split, tmp_path):
    """No silent fallback to the validation split (which also picked the checkpoint)."""
    workflow = ConfigWorkflow(
        config_file=configs(bundle, "train.json", "evaluate.json", "cpu_tiny.json"), workflow_type="eval",
        dataset_dir=str(no_test_split), bundle_root=str(tmp_path), output_dir=str(tmp_path / "eval"),
    )  # fmt: skip
    with pytest.raises(SystemExit, match="error: .*(split 'test' has no cases|datalist not found)"):
        workflow.initialize()


@pytest.mark.parametrize("bundle", sorted(INFERENCE_INPUT))
def test_inference_without_input_stops_with_a_clear_message(bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    p = parser(bundle, "inference.json", "cpu_tiny.json", bundle_root=str(tmp_path), dataset_dir=str(tmp_path / "empty"))
    items = p.get_parsed_content(INFERENCE_INPUT[bundle])  # builds: the zoo's check_properties needs it
    assert len(items) == 0 and p["inference"][0] == f"$@{INFERENCE_INPUT[bundle]}.require()"
    with pytest.raises(InputError) as info:
        items.require()  # the run's first step
    cause = info.value
    assert "nothing" in str(cause) or "not found" in str(cause), cause


def test_cascade_inference_without_x_rays_stops_with_a_clear_message(tmp_path):
    from bundles.progressive_cascade.scripts.inference import CascadePredictor

    with pytest.raises(InputError, match="needs --pa_file and --lateral_file"):
        CascadePredictor.check_inputs(None, None)
    with pytest.raises(InputError, match="file not found"):
        CascadePredictor.check_inputs(str(tmp_path / "pa.png"), str(tmp_path / "l.png"))


def test_pix2pix_inference_with_no_input_no_longer_exits_quietly(tmp_path):
    from monai.bundle import run

    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError) as info:
        run("inference", config_file=configs("pix2pix_phase", "inference.json", "cpu_tiny.json"),
            bundle_root=str(tmp_path), dataset_dir=str(tmp_path / "empty"), output_dir=str(tmp_path / "out"))  # fmt: skip
    assert "nothing to translate" in repr(info.value.__cause__) or "nothing to translate" in str(info.value)
