"""The bundle contract (docs/ARCHITECTURE.md, "The bundle contract"), one table over all six bundles: the same
config ids mean the same thing, evaluate.json has one shape, renamed ids still work for a release with a
warning naming the new id, and every bundle trains and evaluates on datasets given only by ``--dataset_dir``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from common import contract

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("vqgan_3d_patch", "latent_ddpm", "perx2ct", "progressive_cascade", "pix2pix_phase", "pe_classifier")
GAN = {"vqgan_3d_patch", "pix2pix_phase"}  # bundles with a discriminator: learning_rate_d
# the file ckpt_path names under ckpt_dir (the cascade evaluates its last stage)
CKPT_FILE = {b: "stage3_model.pt" if b == "progressive_cascade" else "model.pt" for b in BUNDLES}

# train.json ids every bundle has, with the same meaning (value checked below where it can be without data)
TRAIN_IDS = (
    "bundle_root", "ckpt_dir", "output_dir", "dataset_dir", "datalist_file", "metadata_file", "device",
    "learning_rate", "batch_size", "num_workers", "max_epochs", "val_interval", "save_interval", "resume_from",
    "check_datalist_values", "hu_window", "network_def", "network", "preprocessing", "postprocessing",
    "datalist_check", "checkpoint_record", "train#dataloader", "train#trainer", "validate#datalist",
    "validate#dataset", "validate#evaluator", "initialize", "training", "run",
)  # fmt: skip
# evaluate.json: an overlay on train.json's validate section
EVALUATE_IDS = ("eval_split", "ckpt_path", "metrics_report", "validate#datalist", "validate#handlers", "initialize",
                "evaluating", "run")  # fmt: skip


def config(bundle: str, name: str) -> dict:
    return json.loads((REPO / "bundles" / bundle / "configs" / name).read_text())


def parsed(bundle: str, *names: str, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(REPO / "bundles" / bundle / "configs" / n) for n in names])
    p.update(overrides)
    p.parse()
    return p


def optimizers(cfg: dict) -> list[dict]:
    """Every ``torch.optim`` object of a config (top level)."""
    targets = {k: str(v.get("_target_", "")) for k, v in cfg.items() if isinstance(v, dict)}
    return [cfg[k] for k, t in targets.items() if t.startswith("torch.optim.") and ".lr_scheduler." not in t]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_json_has_the_contract_ids(bundle, tmp_path):
    cfg = config(bundle, "train.json")
    p = parsed(bundle, "train.json", bundle_root=str(tmp_path))
    for key in TRAIN_IDS:
        assert key in p, f"{bundle} train.json lacks {key!r}"
    assert ("learning_rate_d" in cfg) == (bundle in GAN), bundle
    # defaults are paths under bundle_root, named the same everywhere
    assert p.get_parsed_content("ckpt_dir") == str(tmp_path / "models")
    assert p.get_parsed_content("dataset_dir") == str(tmp_path / "dataset")
    assert p.get_parsed_content("datalist_file") == str(tmp_path / "dataset" / "dataset.json")
    assert Path(p.get_parsed_content("output_dir")).parent == tmp_path
    # learning rates are numbers, and the optimisers read them (the first the generator's, the second the critic's)
    for key in ("learning_rate", "learning_rate_d") if bundle in GAN else ("learning_rate",):
        assert isinstance(p.get_parsed_content(key), float) and p.get_parsed_content(key) > 0, key
    lrs = [str(o["lr"]) for o in optimizers(cfg)]
    assert lrs and "@learning_rate" in lrs[0] and all("@learning_rate" in s for s in lrs), lrs
    if bundle in GAN:
        assert "@learning_rate_d" in lrs[1]
    # transforms: the top-level chains are Composes, and validation uses them
    for key in ("preprocessing", "postprocessing"):
        assert cfg[key]["_target_"] == "Compose", (bundle, key)
    assert cfg["validate"]["evaluator"]["postprocessing"] == "@postprocessing"
    assert "@preprocessing" in json.dumps(cfg["validate"]) or "@preprocessing" in json.dumps(cfg["train"])
    # datalist_check is a list of checks run by initialize
    assert isinstance(cfg["datalist_check"], list) and "$@datalist_check" in cfg["initialize"]


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("name", ["train.json", "evaluate.json", "multi_gpu_train.json", "cpu_tiny.json",
                                  "cpu_small.json", "cpu_64.json"])  # fmt: skip
def test_old_ids_are_gone_but_their_null_aliases(bundle, name):
    """A renamed id appears only as the null alias that keeps command lines working (common.contract.ALIASED)."""
    path = REPO / "bundles" / bundle / "configs" / name
    if not path.is_file():
        pytest.skip(f"{bundle} has no {name}")
    cfg = json.loads(path.read_text())
    aliases = contract.deprecated_aliases(bundle, name)
    for old in contract.RENAMED[bundle]:
        if old in aliases:
            assert cfg[old] is None, (bundle, name, old)
        else:
            assert not any(k == old or k.startswith(old + "#") for k in cfg), (bundle, name, old)
            assert f"@{old}" not in path.read_text().replace(f"@{old}_", ""), (bundle, name, old)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluate_json_has_one_shape(bundle, tmp_path):
    """evaluate.json overlays train.json's validate section (as the model zoo's spleen_ct_segmentation): the
    checkpoint loader first, the report at ``metrics_report``, ``evaluating`` runs ``validate#evaluator``."""
    cfg = config(bundle, "evaluate.json")
    for key in EVALUATE_IDS:
        assert key in cfg, f"{bundle} evaluate.json lacks {key!r}"
    sections = [k for k, v in cfg.items() if isinstance(v, dict) and "_target_" not in v]
    assert not {"evaluate", "test"} & set(sections), sections
    assert cfg["eval_split"] == "test" and cfg["run"] == "@evaluating"
    assert "$@validate#evaluator.run()" in cfg["evaluating"]
    loader = cfg["validate#handlers"][0]
    assert loader["_target_"] == "common.checkpoint.CheckpointLoader" and loader["load_path"] == "@ckpt_path"
    assert loader["expected_bundle"] == bundle
    assert "@metrics_report" in json.dumps(cfg)
    assert any("require_cases(@validate#datalist" in s for s in cfg["initialize"])
    p = parsed(bundle, "train.json", "evaluate.json", bundle_root=str(tmp_path))
    assert p.get_parsed_content("ckpt_path") == str(tmp_path / "models" / CKPT_FILE[bundle])
    assert Path(p.get_parsed_content("metrics_report")).name == "metrics_report.json"
    assert p.get_parsed_content("validate#datalist") == []  # no dataset: evaluation then stops at require_cases


@pytest.mark.parametrize(
    "bundle, files, old, value, new, read",
    [
        ("pix2pix_phase", ("train.json", "cpu_tiny.json"), "lr", 1e-3, "learning_rate", "g_optimizer"),
        ("pix2pix_phase", ("train.json", "cpu_tiny.json"), "lr", 1e-3, "learning_rate_d", "d_optimizer"),
        ("vqgan_3d_patch", ("train.json", "cpu_tiny.json"), "lr_g", 3e-3, "learning_rate", "g_optimizer"),
        ("vqgan_3d_patch", ("train.json", "cpu_tiny.json"), "lr_d", 4e-3, "learning_rate_d", "d_optimizer"),
        ("vqgan_3d_patch", ("train.json", "evaluate.json"), "checkpoint", "/x/old.pt", "ckpt_path", "ckpt_path"),
        ("pix2pix_phase", ("train.json", "evaluate.json"), "checkpoint", "/x/old.pt", "ckpt_path", "ckpt_path"),
        ("progressive_cascade", ("train.json", "evaluate.json"), "checkpoint", "/x/s3.pt", "ckpt_path", "ckpt_path"),
    ],
)
def test_old_id_on_the_command_line_takes_effect_with_a_warning(bundle, files, old, value, new, read, tmp_path):
    """``python -m monai.bundle run ... --lr 1e-3`` sets the config id ``lr``: it must still take effect."""
    where = {"bundle_root": str(tmp_path), "device": "cpu"}
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated.*use '{new}'"):
        got = parsed(bundle, *files, **where, **{old: value}).get_parsed_content(read)
    if read.endswith("optimizer"):
        got = got.param_groups[0]["lr"]
    assert got == value
    with warnings.catch_warnings():
        warnings.simplefilter("error", contract.DeprecatedConfigId)  # the new id alone: no warning
        default = parsed(bundle, *files, **where).get_parsed_content(read)
    if read.endswith("optimizer"):
        assert default.param_groups[0]["lr"] == parsed(bundle, *files, **where).get_parsed_content(new)
    else:
        assert default != value


@pytest.mark.parametrize(
    "bundle, given, expected",
    [
        ("vqgan_3d_patch", {"lr_g": 1e-3, "max_epochs": 2}, {"learning_rate": 1e-3, "max_epochs": 2}),
        ("vqgan_3d_patch", {"base_transforms#0#keys": "ct"}, {"preprocessing#transforms#0#keys": "ct"}),
        ("latent_ddpm", {"dataset_check": []}, {"datalist_check": []}),
        ("latent_ddpm", {"evaluate#dataloader#num_workers": 0}, {"validate#dataloader#num_workers": 0}),
        ("pe_classifier", {"test#dataloader#num_workers": 0}, {"validate#dataloader#num_workers": 0}),
        ("pe_classifier", {"train#postprocessing": None}, {"train#postprocessing": None}),  # MONAI's property id
        ("pix2pix_phase", {"lr": 1e-3, "learning_rate": 2e-3}, {"learning_rate": 2e-3}),  # both: the new id wins
        ("perx2ct", {"learning_rate": 1e-3}, {"learning_rate": 1e-3}),
    ],
)
def test_apply_deprecated_ids(bundle, given, expected):
    if given.keys() != expected.keys():  # something was renamed
        with pytest.warns(DeprecationWarning, match="is deprecated"):
            assert contract.apply_deprecated_ids(bundle, given) == expected
    else:
        assert contract.apply_deprecated_ids(bundle, given) == expected


def test_renamed_passes_the_new_value_through():
    assert contract.renamed(None, "lr", "learning_rate", 0.5) == 0.5
    with pytest.warns(contract.DeprecatedConfigId, match="use 'learning_rate'"):
        assert contract.renamed(0.1, "lr", "learning_rate", 0.5) == 0.1


def test_checkpoint_written_before_the_renames_still_loads(tmp_path):
    """A 0.3.0 vqgan checkpoint (record ``training`` with ``lr_g``/``lr_d``) loads through the new config: records
    store the training arguments for people to read; no loader maps them back to config ids."""
    import torch

    from common.checkpoint import CheckpointRecord, build_from_checkpoint, load_weights

    p = parsed("vqgan_3d_patch", "train.json", "cpu_tiny.json", bundle_root=str(tmp_path), device="cpu")
    net = p.get_parsed_content("network")
    old = CheckpointRecord("vqgan_3d_patch", network=net, version="0.3.0", training={"lr_g": 1e-4, "lr_d": 1e-4})
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": net.state_dict(), "record": old.state_dict()}, path)
    rebuilt, record = build_from_checkpoint(path, expected_bundle="vqgan_3d_patch")
    assert record["version"] == "0.3.0" and record["training"] == {"lr_g": 1e-4, "lr_d": 1e-4}
    fresh = parsed("vqgan_3d_patch", "train.json", "evaluate.json", "cpu_tiny.json", bundle_root=str(tmp_path),
                   device="cpu")  # fmt: skip
    assert fresh.get_parsed_content("ckpt_path") == str(path)
    load_weights(fresh.get_parsed_content("network"), str(path), expected_bundle="vqgan_3d_patch")


def test_metadata_versions_name_the_renames():
    """Each bundle's metadata says in its changelog what was renamed, at its current (bumped) version."""
    for bundle in BUNDLES:
        meta = config(bundle, "metadata.json")
        note = meta["changelog"][meta["version"]]
        assert "contract" in note, bundle
        for old, new in contract.RENAMED[bundle].items():
            assert old in note and new.partition("#")[0] in note, (bundle, old)


# ---------------------------------------------------------------------------------------------------------------
# every bundle trains on one dataset and evaluates on another, each given only by --dataset_dir


def _second_dataset(root: Path, bundle: str) -> Path:
    """Another phantom dataset, with more cases than the fixture's (so its test split has other case ids)."""
    from data_prep.phantom import make_phantom_dataset

    if bundle == "pix2pix_phase":  # 4D CT pairs, as the phantom_4dct fixture
        make_phantom_dataset(root, n_cases=5, size=(32, 32, 16), spacing=(10.0, 10.0, 16.0), drr_pixels=32,
                             emboli_fraction=0.0, n_phases=4, val_fraction=0.34, test_fraction=0.34, seed=7)  # fmt: skip
    else:
        make_phantom_dataset(root, n_cases=12, size=32, spacing=10.0, geometry="x2ctgan", drr_pixels=32, seed=7)
    return root


def _test_ids(dataset: Path) -> list[str]:
    from common.datalist import case_id

    return sorted(case_id(i) for i in json.loads((dataset / "dataset.json").read_text())["test"])


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_trains_and_evaluates_on_any_dataset_dir(bundle, phantom_pairs, phantom_4dct, tmp_path):
    from monai.bundle import run

    configs = REPO / "bundles" / bundle / "configs"
    first = Path((phantom_4dct if bundle == "pix2pix_phase" else phantom_pairs)["root"])
    second = _second_dataset(tmp_path / "second", bundle)
    assert _test_ids(second) != _test_ids(first)  # else the report could not tell the datasets apart
    root = tmp_path / "bundle"
    common = {"bundle_root": str(root), "meta_file": str(configs / "metadata.json"),
              "logging_file": str(configs / "logging.conf"), "max_epochs": 1, "device": "cpu"}  # fmt: skip
    extra: dict = {}
    if bundle == "latent_ddpm":
        from bundles.latent_ddpm.scripts.demo import random_vqgan

        extra = {"vqgan_checkpoint": random_vqgan(str(tmp_path / "vqgan.pt")), "sampling_steps": 2}
    train = [str(configs / "train.json"), str(configs / "cpu_tiny.json")]
    stages = (1, 2, 3) if bundle == "progressive_cascade" else (None,)
    for stage in stages:
        staged = {} if stage is None else {"stage": stage}
        run("training", config_file=train, dataset_dir=str(first), output_dir=str(tmp_path / "train_out"),
            **common, **extra, **staged)  # fmt: skip
    assert (root / "models" / CKPT_FILE[bundle]).is_file()

    out = tmp_path / "eval_second"
    evaluate = [str(configs / "train.json"), str(configs / "evaluate.json"), str(configs / "cpu_tiny.json")]
    run("evaluating", config_file=evaluate, dataset_dir=str(second), output_dir=str(out), **common, **extra)
    report = json.loads((out / "metrics_report.json").read_text())
    assert report["split"] == "test" and sorted(report["case_ids"]) == _test_ids(second)
