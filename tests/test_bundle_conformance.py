"""Model-zoo and MONAI Label conformance of all six bundles: what the real checks cannot run offline.

The model zoo's own CI checks (``ci/verify_bundle.py`` at dfae206: ``verify_bundle_directory``,
``verify_data_shape``, ``verify_torchscript``, ``verify_bundle_properties``) run as the zoo runs them in
tests/test_model_zoo_ci.py. What stays here:

* ``verify_metadata_format``: the zoo validates metadata against a JSON schema downloaded at run time (a release
  asset, no network here), so MONAI's bundle specification (``docs/source/mb_specification.rst``) is encoded
  below: every mandatory key and every tensor-format field of ``network_data_format``, its shapes equal to the
  full-size inference.json; version pins equal ``requirements.txt`` and none is empty (the zoo's
  ``ci/get_bundle_requirements.py`` turns ``""`` into ``pip install numpy==``), ``required_packages_version``
  holds every other pin and the ``xray2ct`` package itself (no ``optional_packages_version``: MONAI 1.6.1
  deprecates it);
* ``large_files.yml`` in the zoo's format (entries ``path``/``url``/``hash_val``/``hash_type``, passed to
  ``monai.apps.download_url``), ``docs/README.md``, every config and overlay parsing with no data;
* tracing (metadata ``torchscript_export`` mode ``trace``), which the zoo never runs (it always scripts);
* :func:`make_tiny_bundle`: the CPU-sized copy both test files run on (configs/inference.json =
  inference.json + cpu_tiny.json, metadata at those sizes, random ``models/model.pt``).

MONAI Label 0.8.5 cannot be installed beside our pins (it needs numpy < 2 and pydicom < 3), so its bundle tasks
are emulated from their source: ``monailabel/tasks/infer/bundle.py`` and ``tasks/infer/basic_infer.py``
(``BundleConstants``: configs ``inference.json``, ids ``bundle_root``, ``device``, ``network_def``,
``preprocessing``/``pre_transforms``, ``inferer``, ``postprocessing``/``post_transforms``; input key = the first
``network_data_format`` input, ``image``; output ``pred``; ``model.pt`` read with ``checkpoint.get("model")``;
``preprocessing``/``postprocessing`` a ``Compose`` or a list) and ``monailabel/tasks/train/bundle.py``
(``train.json`` ids ``bundle_root``, ``device``, ``network``, ``network_def``, ``train#trainer#max_epochs``,
``train#dataset#data``, ``train#handlers``, ``validate#dataset#data``, run id ``run``; ``{"image", "label"}`` items),
whose call is run for the bundles that can learn from image/label pairs (vqgan_3d_patch, pix2pix_phase).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.apps.utils import download_url
from monai.bundle import ConfigParser, ckpt_export
from monai.transforms import Compose, LoadImaged
from numerics import network_atol

from common.checkpoint import CheckpointRecord

REPO = Path(__file__).resolve().parents[1]
BUNDLES = (
    "vqgan_3d_patch",
    "latent_ddpm",
    "perx2ct",
    "progressive_cascade",
    "pix2pix_phase",
    "pe_classifier",
)
MONAI_LABEL_BUNDLES = ("vqgan_3d_patch", "pix2pix_phase", "pe_classifier")  # one CT volume in
XRAY_BUNDLES = tuple(b for b in BUNDLES if b not in MONAI_LABEL_BUNDLES)  # two radiographs in: no fit

# every config file and what it overlays (a new overlay must be listed here to be checked)
CONFIG_BASES = {
    "train.json": (),
    "inference.json": (),
    "evaluate.json": ("train.json",),
    "multi_gpu_train.json": ("train.json",),
    "cpu_tiny.json": ("train.json", "inference.json", "train.json+evaluate.json"),
    "cpu_small.json": ("train.json", "train.json+evaluate.json"),
    "cpu_64.json": ("train.json", "train.json+evaluate.json"),
    "perx2ct_official.json": ("inference.json",),
    "xray2ctpa_encoder.json": ("train.json", "inference.json"),
}

# MONAI Label 0.8.5 (monailabel/tasks/infer/bundle.py, tasks/train/bundle.py: BundleConstants)
MONAI_LABEL_INFER_IDS = ("bundle_root", "device", "network_def", "preprocessing", "inferer", "postprocessing")
MONAI_LABEL_TRAIN_IDS = (
    "bundle_root", "device", "network", "network_def", "train#trainer#max_epochs", "train#dataset#data",
    "train#handlers", "validate#dataset#data", "run",
)  # fmt: skip

# MONAI's bundle specification (mb_specification.rst, "metadata.json File")
MANDATORY_METADATA = (
    "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
    "description", "authors", "copyright", "network_data_format",
)  # fmt: skip
TENSOR_FIELDS = (
    "type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
    "channel_def",
)  # fmt: skip
TENSOR_TYPES = ("image", "series", "tuples", "probabilities")
EXPORT_MODES = ("script", "trace", "none")
ZOO_HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # model-zoo ci/utils.py SUPPORTED_HASH_TYPES


def configs_dir(bundle: str) -> Path:
    return REPO / "bundles" / bundle / "configs"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def metadata(bundle: str) -> dict:
    return read_json(configs_dir(bundle) / "metadata.json")


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)


def merged_config(bundle: str, *names: str) -> dict:
    """One config dict from a config and its overlays (``#`` paths applied), as one file would hold it."""
    return ConfigParser.load_config_files([str(configs_dir(bundle) / n) for n in names])


# ------------------------------------------------------------------------------------ a CPU-sized bundle
def config_shapes(bundle: str, p: ConfigParser) -> dict[str, object]:
    """``network_data_format`` entries (``inputs#image#spatial_shape``...) at the sizes of config ``p``."""
    if bundle == "vqgan_3d_patch":
        patch = list(p["patch_size"])
        return {"inputs#image#spatial_shape": patch, "outputs#pred#spatial_shape": patch,
                "outputs#latent#spatial_shape": [s // 8 for s in patch], "outputs#latent#num_channels": p["embedding_dim"]}  # fmt: skip
    if bundle == "pix2pix_phase":
        side = [p["image_size"]] * 2
        return {"inputs#image#spatial_shape": side, "outputs#pred#spatial_shape": side}
    if bundle == "pe_classifier":
        return {"inputs#image#spatial_shape": list(p["ct_size"])}
    if bundle == "perx2ct":
        return {
            "inputs#image#spatial_shape": [p["image_size"]] * 2,
            "outputs#pred#spatial_shape": [p["volume_size"]] * 3,
        }
    if bundle == "progressive_cascade":
        return {"inputs#image#spatial_shape": [p["xray_size"]] * 2,
                "outputs#pred#spatial_shape": [p["volume_sizes"][-1]] * 3}  # fmt: skip
    if bundle == "latent_ddpm":
        latent = [s // 8 for s in p["vqgan_roi"]]
        channels = p.get_parsed_content("latent_channels")
        return {"inputs#image#spatial_shape": latent, "inputs#image#num_channels": channels,
                "inputs#context#spatial_shape": [p["xray_size"]] * 2,
                "outputs#pred#spatial_shape": latent, "outputs#pred#num_channels": channels}  # fmt: skip
    raise KeyError(bundle)


def tiny_vqgan() -> torch.nn.Module:
    """latent_ddpm's codec at cpu_tiny size: vqgan_3d_patch's network_def (the one definition of the VQ-GAN)."""
    parser = ConfigParser(merged_config("vqgan_3d_patch", "inference.json", "cpu_tiny.json"))
    return parser.get_parsed_content("network_def")


def make_tiny_bundle(bundle: str, root: Path) -> Path:
    """``root/<bundle>``: what CI needs for the zoo's checks. The bundle's files; configs/inference.json =
    inference.json + cpu_tiny.json in one file (train.json likewise); metadata at those sizes; random weights
    ``{"model": state_dict}`` (the key ``ckpt_export --key_in_ckpt model`` and MONAI Label read) for
    ``models/model.pt`` and every other file ``large_files.yml`` names."""
    source, target = REPO / "bundles" / bundle, root / bundle
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "models", "eval", "dataset"))
    inference = merged_config(bundle, "inference.json", "cpu_tiny.json")
    (target / "configs" / "inference.json").write_text(json.dumps(inference, indent=4))
    train = merged_config(bundle, "train.json", "cpu_tiny.json")
    (target / "configs" / "train.json").write_text(json.dumps(train, indent=4))
    p = ConfigParser(inference)
    p["bundle_root"] = str(target)
    meta = metadata(bundle)
    for path, value in config_shapes(bundle, p).items():
        entry = meta["network_data_format"]
        *parents, leaf = path.split("#")
        for key in parents:
            entry = entry[key]
        entry[leaf] = value
    (target / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
    torch.manual_seed(0)
    network = p.get_parsed_content("network_def")
    (target / "models").mkdir()
    torch.save({"model": network.state_dict()}, target / "models" / "model.pt")
    # every file large_files.yml names, so the zoo's download step has nothing to do
    for entry in large_files(bundle):
        path = target / entry["path"]
        if not path.exists():
            if path.name == "vqgan.pt":  # latent_ddpm builds its codec from this record
                vqgan = tiny_vqgan()
                record = CheckpointRecord("vqgan_3d_patch", network=vqgan, inputs={"hu_window": "xray2ct"})
                torch.save({"model": vqgan.state_dict(), "record": record.state_dict()}, path)
            else:
                torch.save({"model": network.state_dict()}, path)
    return target


def large_files(bundle: str) -> list[dict]:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "large_files.yml"))
    return parser.get()["large_files"]


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_bundles")
    return {bundle: make_tiny_bundle(bundle, root) for bundle in BUNDLES}


# ------------------------------------------------------------------------------------------- files, ids
@pytest.mark.parametrize("bundle", BUNDLES)
def test_required_files_and_ids(bundle, tiny_bundles):
    """large_files.yml and the ids the zoo and MONAI Label read from inference.json (standing alone)."""
    folder = tiny_bundles[bundle]
    assert (folder / "docs" / "README.md").is_file()  # metadata.json, LICENSE, model.pt: tests/test_model_zoo_ci.py
    assert "Apache License" in (folder / "LICENSE").read_text()

    entries = large_files(bundle)
    raw_inference = read_json(configs_dir(bundle) / "inference.json")
    weights = (
        "models/stage3_model.pt" if bundle == "progressive_cascade" else "models/model.pt"
    )  # what inference loads
    assert weights in {e["path"] for e in entries}
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}, entry
        assert entry["path"].startswith("models/") and entry["hash_type"] in ZOO_HASH_TYPES, entry
        if entry["url"]:  # published: https and a hash to check it by
            assert entry["url"].startswith("https://") and re.fullmatch(
                r"[0-9a-f]{32,128}", entry["hash_val"]
            ), entry
        else:  # not published yet: no made-up hash
            assert entry["hash_val"] == "", entry
    # the zoo's download_large_files (ci/utils.py): empty hash fields dropped, fuzzy, filepath = bundle/path;
    # a file already there (the CI-sized weights) is kept, so verify_bundle_directory passes without network
    for entry in entries:
        kwargs = {k: v for k, v in entry.items() if k != "path" and not (k.startswith("hash") and v == "")}
        download_url(**kwargs, fuzzy=True, filepath=str(folder / entry["path"]))

    for key in (
        "network_def",
        "bundle_root",
        "device",
        "preprocessing",
        "inferer",
        "postprocessing",
        "inference",
        "run",
    ):
        assert key in raw_inference, key
    assert raw_inference["run"] == "@inference" and raw_inference["bundle_root"] == "."


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_config_and_overlay_parses_without_data(bundle, tmp_path):
    """As the zoo's check_properties / verify_net_in_out and MONAI Label parse them: no dataset, no weights."""
    names = sorted(p.name for p in configs_dir(bundle).glob("*.json") if p.name != "metadata.json")
    assert set(names) <= set(CONFIG_BASES), (
        f"list the new overlay's bases in CONFIG_BASES: {set(names) - set(CONFIG_BASES)}"
    )
    where = {"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(tmp_path / "no_dataset")}
    for name in names:
        for base in CONFIG_BASES[name] or ("",):
            files = [*filter(None, base.split("+")), name]
            p = ConfigParser()
            p.read_config([str(configs_dir(bundle) / f) for f in files])
            p.update(where)
            p.parse()
            assert "run" in p and "network_def" in p, files


# --------------------------------------------------------------------------------------------- metadata
def _check_tensor_format(where: str, spec: dict) -> None:
    missing = [f for f in TENSOR_FIELDS if f not in spec]
    assert not missing, f"{where}: missing {missing}"
    assert spec["type"] in TENSOR_TYPES, f"{where}: type {spec['type']!r} not one of {TENSOR_TYPES}"
    assert isinstance(spec["format"], str) and spec["format"], where
    assert isinstance(spec["modality"], str) and spec["modality"], where
    assert isinstance(spec["num_channels"], int) and spec["num_channels"] >= 1, where
    shape = spec["spatial_shape"]
    assert isinstance(shape, list) and all(
        (isinstance(s, int) and s >= 1) or (isinstance(s, str) and s) for s in shape
    ), f"{where}: spatial_shape {shape}"
    assert isinstance(getattr(torch, spec["dtype"], None), torch.dtype), f"{where}: dtype {spec['dtype']!r}"
    value_range = spec["value_range"]
    assert value_range == [] or (len(value_range) == 2 and value_range[0] <= value_range[1]), where
    assert isinstance(spec["is_patch_data"], bool), where
    channels = spec["channel_def"]
    assert isinstance(channels, dict) and all(
        k.isdigit() and int(k) < spec["num_channels"] and isinstance(v, str) for k, v in channels.items()
    ), f"{where}: channel_def {channels}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_follows_the_bundle_specification(bundle):
    meta = metadata(bundle)
    missing = [k for k in MANDATORY_METADATA if k not in meta]
    assert not missing, missing
    assert meta["schema"].startswith("https://") and meta["schema"].endswith(".json")
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]) and meta["version"] in meta["changelog"]
    for key in ("task", "description", "authors", "copyright"):
        assert isinstance(meta[key], str) and meta[key].strip(), key
    assert isinstance(meta.get("supported_apps", {}), dict)
    assert isinstance(meta.get("references", []), list)
    formats = {k: v for k, v in meta.items() if k.endswith("_data_format")}
    assert "network_data_format" in formats
    for name, fmt in formats.items():
        assert set(fmt) >= {"inputs", "outputs"} and set(fmt) <= {
            "inputs",
            "outputs",
            "post_processed_outputs",
        }
        for section in fmt:
            assert fmt[section], f"{name}#{section} is empty"
            for key, spec in fmt[section].items():
                _check_tensor_format(f"{bundle} {name}#{section}#{key}", spec)
    export = meta["torchscript_export"]
    assert export["mode"] in EXPORT_MODES and export["note"]
    if export["mode"] == "trace":
        assert export["input_shape"][1] == meta["network_data_format"]["inputs"]["image"]["num_channels"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_shapes_are_the_full_size_configs(bundle, tmp_path):
    """network_data_format describes the default (GPU-size) inference.json: verify_net_in_out at full size is
    too slow on CPU, so the shapes are compared with the config values they come from."""
    p = ConfigParser()
    p.read_config(str(configs_dir(bundle) / "inference.json"))
    p["bundle_root"] = str(tmp_path)
    fmt = metadata(bundle)["network_data_format"]
    for path, value in config_shapes(bundle, p).items():
        entry = fmt
        for key in path.split("#"):
            entry = entry[key]
        assert entry == value, (path, entry, value)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_pins_equal_requirements(bundle):
    """What the zoo's get_bundle_requirements would pip-install is exactly our pinned environment."""
    meta, pins = metadata(bundle), requirement_pins()
    assert meta["monai_version"] == pins["monai"] and meta["pytorch_version"] == pins["torch"]
    assert meta["numpy_version"] == pins["numpy"]
    # MONAI 1.6.1 deprecates optional_packages_version (monai/bundle/utils.py DEPRECATED_ID_MAPPING) and, on
    # parsing, renames it over required_packages_version: every other pin is a required package
    assert "optional_packages_version" not in meta
    zoo_requirements = {
        "monai": meta["monai_version"],
        "torch": meta["pytorch_version"],
        "numpy": meta["numpy_version"],
    }
    # the project's own package, whose public API the configs' _target_s name (docs/ARCHITECTURE.md)
    assert meta["required_packages_version"]["xray2ct"] == project_version()
    for package, version in meta["required_packages_version"].items():
        if package == "xray2ct":
            continue
        assert version and pins.get(package.lower()) == version, (package, version)
        zoo_requirements[package.lower()] = version
    assert all(zoo_requirements.values())
    # bundles import the shared common/ library, which needs every pin of requirements.txt
    assert zoo_requirements == pins


# -------------------------------------------------------------------------------- network in/out, export
def _first_input(bundle: str, meta: dict) -> torch.Tensor:
    image = meta["network_data_format"]["inputs"]["image"]
    return torch.rand(1, image["num_channels"], *image["spatial_shape"])


TRACED = tuple(b for b in BUNDLES if metadata(b)["torchscript_export"]["mode"] == "trace")


@pytest.mark.parametrize("bundle", TRACED)
def test_traced_export_as_the_metadata_states(bundle, tiny_bundles, tmp_path):
    """ckpt_export in trace mode, as metadata's ``torchscript_export`` states (the zoo only scripts: script
    mode and the exclusions are tests/test_model_zoo_ci.py); the export computes what the eager network does."""
    folder = tiny_bundles[bundle]
    meta = read_json(folder / "configs" / "metadata.json")
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser["bundle_root"] = str(folder)
    eager = parser.get_parsed_content("network_def").eval()
    eager.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True)["model"])
    x = _first_input(bundle, meta)
    ts = tmp_path / "model.ts"
    trace = {"use_trace": True, "input_shape": list(x.shape)}
    ckpt_export(
        "network_def", filepath=str(ts), ckpt_file=str(folder / "models" / "model.pt"),
        meta_file=str(folder / "configs" / "metadata.json"), config_file=str(folder / "configs" / "inference.json"),
        bundle_root=str(folder), key_in_ckpt="model", **trace,
    )  # fmt: skip
    exported = torch.jit.load(str(ts))
    with torch.no_grad():
        want = eager(x)  # TorchScript may fuse and reorder float32 sums (tests/numerics.py)
        torch.testing.assert_close(exported(x), want, rtol=0, atol=network_atol(eager, want, torch.float32))


# ------------------------------------------------------------------------------------------- MONAI Label
def _ct_volume(path: Path, shape: tuple[int, int, int], seed: int = 0, offset: float = 0.0) -> Path:
    """A small CT in HU (body-like values) with a non-identity affine, as MONAI Label would send it."""
    rng = np.random.default_rng(seed)
    hu = rng.uniform(-1000.0, 400.0, shape).astype(np.float32) + offset
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 2.5, 1.0])), str(path))
    return path


@pytest.mark.parametrize("bundle", MONAI_LABEL_BUNDLES)
def test_monai_label_infer_task(bundle, tiny_bundles, tmp_path):
    """What BundleInferTask + BasicInferTask (0.8.5) do with the bundle: read configs/inference.json alone
    with bundle_root overridden, build network_def and load models/model.pt's "model", then for a request
    ``{"image": <file>}``: preprocessing (Compose -> list; LoadImaged image_only=False), the ``inferer`` on
    ``data["image"][None]``, ``data["pred"] = out[0]``, postprocessing (Compose -> list)."""
    folder = tiny_bundles[bundle]
    meta = read_json(folder / "configs" / "metadata.json")
    assert "monai-label" in meta["supported_apps"]
    fmt = meta["network_data_format"]
    assert (
        next(iter(fmt["inputs"])) == "image" and next(iter(fmt["outputs"])) == "pred"
    )  # key_image, key_pred

    config = ConfigParser()
    config.read_config(str(folder / "configs" / "inference.json"))
    config.config.update({"bundle_root": str(folder)})
    for key in MONAI_LABEL_INFER_IDS:
        assert key in config, key
    config.config.update({"device": "cpu"})  # _update_device: the request's device
    network = config.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint)
    assert set(network.state_dict()) == set(state)
    network.load_state_dict(state)
    network.eval()

    pre = config.get_parsed_content("preprocessing", instantiate=True)
    pre = list(pre.transforms) if isinstance(pre, Compose) else pre
    for t in pre:
        if isinstance(t, LoadImaged):
            t._loader.image_only = False
    spatial = fmt["inputs"]["image"]["spatial_shape"]
    shape = tuple(spatial) if len(spatial) == 3 else (*spatial, 6)
    data = {"image": str(_ct_volume(tmp_path / "ct.nii.gz", shape))}
    for t in pre:
        data = t(data)

    inferer = config.get_parsed_content("inferer", instantiate=True)
    with torch.no_grad():
        out = inferer(torch.as_tensor(data["image"])[None], network)
    data["pred"] = out[0]

    post = config.get_parsed_content("postprocessing", instantiate=True)
    post = list(post.transforms) if isinstance(post, Compose) else post
    iter(post)  # a bare transform is not iterable: MONAI Label's TypeError
    for t in post:
        data = t(data)
    pred = data["pred"]
    if bundle == "pe_classifier":
        assert pred.shape == (1,) and 0.0 <= float(pred) <= 1.0
    else:  # a volume on the input's grid (pix2pix inverts its preprocessing; vqgan keeps the grid)
        assert tuple(pred.shape[-3:]) == shape and torch.isfinite(torch.as_tensor(pred)).all()


@pytest.mark.parametrize("bundle", MONAI_LABEL_BUNDLES)
def test_monai_label_train_task_ids(bundle):
    """The train.json ids BundleTrainTask (0.8.5) overrides."""
    p = ConfigParser()
    p.read_config(str(configs_dir(bundle) / "train.json"))
    for key in MONAI_LABEL_TRAIN_IDS:
        assert key in p, key
    assert isinstance(p["train#handlers"], list) and p["run"] == "@training"


# pe_classifier is not: its labels are integers per case, MONAI Label's are annotation files
MONAI_LABEL_TRAINABLE = ("vqgan_3d_patch", "pix2pix_phase")


@pytest.mark.parametrize("bundle", MONAI_LABEL_TRAINABLE)
def test_monai_label_train_task(bundle, tiny_bundles, tmp_path):
    """What BundleTrainTask.__call__ (0.8.5, one device) does: datastore items ``{"image", "label"}`` as
    ``train#dataset#data`` / ``validate#dataset#data``, max_epochs, device, its own CheckpointLoader of
    ``models/model.pt`` inserted into ``train#handlers`` (``load_dict {"model": "$@network"}``, strict False),
    then ``monai.bundle.run("run", init_id=None, final_id=None, meta_file, config_file=train.json, **overrides)``.
    vqgan_3d_patch ignores ``label``; pix2pix_phase reads ``image`` = average CT, ``label`` = phase-0 CT."""
    from monai.bundle import run

    from common.checkpoint import read_record

    folder = Path(shutil.copytree(tiny_bundles[bundle], tmp_path / bundle))
    shape = (40, 40, 36) if bundle == "vqgan_3d_patch" else (32, 32, 8)  # 3D SSIM needs >= 7 slices
    items = []
    for i in range(3):
        image = _ct_volume(tmp_path / f"image_{i}.nii.gz", shape, seed=i)
        phase0 = tmp_path / f"label_{i}.nii.gz"
        label = image if bundle == "vqgan_3d_patch" else _ct_volume(phase0, shape, i, 20.0)
        items.append({"image": str(image), "label": str(label)})
    train_ds, val_ds = items[:2], items[2:]

    config = ConfigParser()
    config.read_config(str(folder / "configs" / "train.json"))
    config.config.update({"bundle_root": str(folder)})
    train_handlers = config.get("train#handlers", [])
    if not [t for t in train_handlers if t.get("_target_") == "CheckpointLoader"]:
        train_handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(folder / "models" / "model.pt"),
                                  "load_dict": {"model": "$@network"}, "strict": False})  # fmt: skip
    overrides = {
        "bundle_root": str(folder), "train#trainer#max_epochs": 1, "train#dataset#data": train_ds,
        "device": torch.device("cpu"), "train#handlers": train_handlers, "validate#dataset#data": val_ds,
    }  # fmt: skip
    before = set((folder / "models").iterdir())
    run(run_id="run", init_id=None, final_id=None, meta_file=str(folder / "configs" / "metadata.json"),
        config_file=str(folder / "configs" / "train.json"), **overrides)  # fmt: skip
    written = [p for p in (folder / "models").glob("*.pt") if p not in before]
    assert written, sorted(p.name for p in (folder / "models").iterdir())
    record = read_record(written[0])
    assert record["bundle"] == bundle and record["progress"]["epoch"] == 1


@pytest.mark.parametrize("bundle", XRAY_BUNDLES)
def test_xray_bundles_say_they_are_not_monai_label_models(bundle):
    assert "monai-label" not in metadata(bundle)["supported_apps"]
    readme = (REPO / "bundles" / bundle / "docs" / "README.md").read_text()
    assert re.search(r"MONAI Label", readme) and re.search(r"xray2ct-web|webapp|pipeline", readme)


def test_bundle_file_lists_are_checked_for_every_bundle():
    on_disk = sorted(
        p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file()
    )
    assert on_disk == sorted(BUNDLES)
    assert all(os.path.isfile(REPO / "bundles" / b / "large_files.yml") for b in BUNDLES)
