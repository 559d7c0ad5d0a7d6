"""The model zoo's own CI checks, run per bundle the way its CI runs them (issue 26 items 1 and 5).

The zoo's ``ci/verify_bundle.py`` (Project-MONAI/model-zoo at dfae206) cannot be vendored; the thin glue below
re-implements only its control flow and calls the same ``monai.bundle`` functions with the same arguments:

* ``verify_bundle_directory``: ``configs/metadata.json`` and ``LICENSE`` required; ``models/model.pt`` and
  ``configs/inference.json`` preferred unless the bundle is in ``exclude_verify_preferred_files_list``
  (``large_files.yml`` downloads are skipped: no network; the CI-sized weights are already in place);
* ``verify_version_changes``: ``version`` in ``changelog`` (``model_info.json`` lives in the zoo);
* ``verify_bundle_properties``: ``create_workflow(workflow_type="inference", bundle_root, config_file,
  logging_file, meta_file)`` then ``check_properties()`` (MONAI's ``InferProperties`` + ``MetaProperties``: the
  zoo checks an app's ``bundle_properties.py`` when it has one, none exists for MONAI Label there) — with no
  data, as the zoo runs it;
* ``verify_data_shape``: ``verify_net_in_out(net_id="network_def", meta_file, config_file, bundle_root)`` — no
  device, no ``extra_forward_args``;
* ``verify_torchscript``: ``ckpt_export(net_id, filepath=models/verify_model.ts, ckpt_file=models/model.pt,
  meta_file, config_file, bundle_root)`` — no ``key_in_ckpt``: ``models/model.pt`` must be a bare state dict,
  the zoo form :func:`xray2ct.zoo.export_zoo_weights` writes (with its ``.record.json`` sidecar).

Bundles the zoo would list in ``ci/bundle_custom_data.py`` (a submission asks for these exclusions, as
``brats_mri_generative_diffusion`` is excluded): :data:`EXCLUDE_VERIFY_SHAPE`,
:data:`EXCLUDE_VERIFY_TORCHSCRIPT`, :data:`EXCLUDE_VERIFY_PREFERRED_FILES`. Those excluded from TorchScript
export through ``torch.export`` instead (:func:`test_torch_export_where_torchscript_is_excluded`).

Sizes: the zoo runs on the full-size bundle on a GPU; here the bundle is the CPU-sized copy of
``make_tiny_bundle`` (inference.json + cpu_tiny.json in one file, metadata at those sizes). The metadata schema
check (``verify_metadata``, a schema downloaded at run time) stays emulated in tests/test_bundle_conformance.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, create_workflow, verify_net_in_out
from numerics import network_atol
from test_bundle_conformance import BUNDLES, REPO, large_files, make_tiny_bundle, tiny_vqgan

from common.checkpoint import CheckpointRecord, read_checkpoint, read_record, sidecar_path
from xray2ct.zoo import export_zoo_weights

ZOO_COMMIT = "dfae206d"  # Project-MONAI/model-zoo ci/verify_bundle.py, ci/bundle_custom_data.py

# what a submission of these bundles asks ci/bundle_custom_data.py to list (docs/ARCHITECTURE.md says why)
EXCLUDE_VERIFY_SHAPE = {"latent_ddpm"}  # forward(x, timesteps, context): the zoo feeds one input
EXCLUDE_VERIFY_TORCHSCRIPT = {"latent_ddpm", "perx2ct", "progressive_cascade"}  # torch.export instead
EXCLUDE_VERIFY_PREFERRED_FILES = {"progressive_cascade"}  # its weights are models/stage3_model.pt

# the zoo's ci/verify_bundle.py constants
NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
PREFERRED_FILES = ("models/model.pt", "configs/inference.json")


def zoo_bundle(bundle: str, root: Path) -> Path:
    """The CI-sized bundle with its weights in the zoo form: every file of ``large_files.yml`` written as training
    writes it (weights + record), then exported by :func:`export_zoo_weights` (bare state dict + sidecar)."""
    folder = make_tiny_bundle(bundle, root)
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser["bundle_root"] = str(folder)
    version = json.loads((folder / "configs" / "metadata.json").read_text())["version"]
    for entry in large_files(bundle):
        path = folder / entry["path"]
        vqgan = path.name == "vqgan.pt"
        torch.manual_seed(0)
        # latent_ddpm's codec: vqgan_3d_patch's network_def (the one definition; latent_ddpm's vqgan_def is null)
        net = tiny_vqgan() if vqgan else parser.get_parsed_content("network_def")
        inputs = latent_space(parser) if bundle == "latent_ddpm" and not vqgan else None
        record = CheckpointRecord("vqgan_3d_patch" if vqgan else bundle, network=net, inputs=inputs, version=version)
        torch.save({"model": net.state_dict(), "record": record.state_dict()}, path)
    exported = export_zoo_weights(folder)
    assert [Path(w).name for w, _ in exported] == [Path(e["path"]).name for e in large_files(bundle)]
    return folder


def latent_space(parser: ConfigParser) -> dict:
    """What latent_ddpm's training records of its latent space (``scripts/data.py`` ``LATENT_SPACE_KEYS``)."""
    roi = list(parser["vqgan_roi"])
    return {
        "latent_shape": [parser.get_parsed_content("latent_channels"), *(s // 8 for s in roi)],
        "scale_factor": 1.0,
        "spacing": [1.5, 1.5, 1.5],
        "image_size": roi,
        "prediction_type": parser["prediction_type"],
    }


@pytest.fixture(scope="module")
def zoo_bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo_bundles")
    return {bundle: zoo_bundle(bundle, root) for bundle in BUNDLES}


def _files(folder: Path) -> dict[str, str]:
    return {
        "meta_file": str(folder / "configs" / "metadata.json"),
        "config_file": str(folder / "configs" / "inference.json"),
        "bundle_root": str(folder),
    }


# ----------------------------------------------------------------------- verify_bundle.py, one check each
@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_bundle_directory_and_version(bundle, zoo_bundles):
    folder = zoo_bundles[bundle]
    for name in NECESSARY_FILES:
        assert (folder / name).is_file(), f"necessary file {name} is not existing."
    if bundle not in EXCLUDE_VERIFY_PREFERRED_FILES:
        for name in PREFERRED_FILES:
            assert (folder / name).is_file(), f"necessary file {name} is not existing."
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b not in EXCLUDE_VERIFY_SHAPE])
def test_verify_data_shape(bundle, zoo_bundles):
    verify_net_in_out(net_id="network_def", **_files(zoo_bundles[bundle]))


@pytest.mark.parametrize("bundle", sorted(EXCLUDE_VERIFY_SHAPE))
def test_verify_data_shape_exclusion_is_real(bundle, zoo_bundles):
    """The exclusion is needed: the zoo's call (one input) cannot run the network. In its place, the same check
    with the other inputs metadata declares (``extra_forward_args``, which the zoo never passes)."""
    files = _files(zoo_bundles[bundle])
    with pytest.raises(TypeError, match="timesteps"):
        verify_net_in_out(net_id="network_def", **files)
    _, timesteps, context = _export_inputs(bundle, json.loads(Path(files["meta_file"]).read_text()))
    verify_net_in_out(net_id="network_def", **files, extra_forward_args={"timesteps": timesteps, "context": context})


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b not in EXCLUDE_VERIFY_TORCHSCRIPT])
def test_verify_torchscript(bundle, zoo_bundles, tmp_path):
    """``ckpt_export`` as the zoo calls it, on the zoo-form weights; the export computes what eager does."""
    folder = zoo_bundles[bundle]
    files = _files(folder)
    ts = folder / "models" / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(folder / "models" / "model.pt"), **files)
    assert not (folder / "models" / "model.ts").exists()  # the zoo would torch.jit.load a provided one
    parser = ConfigParser()
    parser.read_config(files["config_file"])
    parser["bundle_root"] = str(folder)
    eager = parser.get_parsed_content("network_def").eval()
    eager.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    image = json.loads(Path(files["meta_file"]).read_text())["network_data_format"]["inputs"]["image"]
    x = torch.rand(1, image["num_channels"], *image["spatial_shape"])
    with torch.no_grad():
        want = eager(x)  # TorchScript may fuse and reorder float32 sums (tests/numerics.py)
        torch.testing.assert_close(
            torch.jit.load(str(ts))(x), want, rtol=0, atol=network_atol(eager, want, torch.float32)
        )


@pytest.mark.parametrize("bundle", sorted(EXCLUDE_VERIFY_TORCHSCRIPT))
def test_verify_torchscript_exclusion_is_real(bundle, zoo_bundles, tmp_path):
    """The exclusion is needed: scripting (what ckpt_export does) fails on these networks."""
    folder = zoo_bundles[bundle]
    with pytest.raises(Exception):  # noqa: B017 - torch raises RuntimeError, NotSupportedError, AttributeError...
        ckpt_export(net_id="network_def", filepath=str(tmp_path / "m.ts"),
                    ckpt_file=str(folder / "models" / "model.pt"), **_files(folder))  # fmt: skip


def _export_inputs(bundle: str, meta: dict) -> tuple[torch.Tensor, ...]:
    inputs = meta["network_data_format"]["inputs"]
    image = torch.rand(1, inputs["image"]["num_channels"], *inputs["image"]["spatial_shape"])
    if bundle != "latent_ddpm":
        return (image,)
    context = inputs["context"]
    return image, torch.tensor([5]), torch.rand(1, context["num_channels"], *context["spatial_shape"])


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(EXCLUDE_VERIFY_TORCHSCRIPT))
def test_torch_export_where_torchscript_is_excluded(bundle, zoo_bundles, tmp_path):
    """``torch.export`` (TorchScript's successor) of the zoo-form weights, saved and reloaded as a ``.pt2``,
    computes what the eager network computes."""
    folder = zoo_bundles[bundle]
    files = _files(folder)
    parser = ConfigParser()
    parser.read_config(files["config_file"])
    parser["bundle_root"] = str(folder)
    eager = parser.get_parsed_content("network_def").eval()
    eager.load_state_dict(read_checkpoint(folder / "models" / "model.pt")["model"])
    args = _export_inputs(bundle, json.loads(Path(files["meta_file"]).read_text()))
    with torch.no_grad():
        program = torch.export.export(eager, args)
        torch.export.save(program, tmp_path / "model.pt2")
        got = torch.export.load(tmp_path / "model.pt2").module()(*args)
        want = eager(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=network_atol(eager, want, torch.float32))


# ------------------------------------------------------------------------- properties, with no data
@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_bundle_properties_without_data(bundle, zoo_bundles, tmp_path):
    """verify_bundle_properties: the inference workflow's required properties (``dataset``, ``evaluator``,
    ``network_def``, ``inferer``...) all build on a machine with no data."""
    folder = zoo_bundles[bundle]
    workflow = create_workflow(
        workflow_type="inference",
        bundle_root=str(folder),
        config_file=str(folder / "configs" / "inference.json"),
        logging_file=str(folder / "configs" / "logging.conf"),
        meta_file=str(folder / "configs" / "metadata.json"),
        dataset_dir=str(tmp_path / "no_data"),
    )
    assert workflow.check_properties() == []


# ---------------------------------------------------------------------------------- the zoo form itself
@pytest.mark.parametrize("bundle", BUNDLES)
def test_zoo_form_weights_are_read_by_our_loaders(bundle, zoo_bundles):
    """models/*.pt is a bare state dict (what the zoo and MONAI's CheckpointLoader load without a key) whose
    sidecar record our loaders bind to it by hash."""
    folder = zoo_bundles[bundle]
    for entry in large_files(bundle):
        path = folder / entry["path"]
        bare = torch.load(path, map_location="cpu", weights_only=True)
        assert bare and all(isinstance(v, torch.Tensor) for v in bare.values())
        assert os.path.isfile(sidecar_path(path))
        record = read_record(path)
        assert record["bundle"] == ("vqgan_3d_patch" if path.name == "vqgan.pt" else bundle)


# ------------------------------------------------------------------------------------- data and licences
DATA_LICENCES = {"LIDC-IDRI": "CC BY 3.0", "covid-chestxray-dataset": "CC BY-NC-SA", "TotalSegmentator": "Apache-2.0"}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_names_the_data_and_its_licence(bundle):
    """As zoo bundles do: ``data_source``, ``data_type``, and the data's terms (``data_license`` here, the
    zoo's ``docs/data_license.txt`` beside it); each named dataset carries its licence."""
    folder = REPO / "bundles" / bundle
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["data_source"].strip() and meta["data_type"].strip()
    terms = meta["data_license"]
    text = (folder / "docs" / "data_license.txt").read_text()
    for dataset, licence in DATA_LICENCES.items():
        if dataset in meta["data_source"]:
            assert dataset in terms, (bundle, dataset)
        if dataset in terms:
            assert f"{licence}" in terms.split(dataset, 1)[1].split(";")[0], (bundle, dataset)
            assert dataset in text and licence in text, (bundle, dataset)


# ------------------------------------------------------------------------------- self-contained bundles
CODE_ROOTS = ("monai", "torch", "ignite", "numpy", "os", "glob", "json", "common", "data_prep")
IMPORT = re.compile(r"^\$(?:import|from) ([\w.]+)")


def _named_modules(value, bundle: str, where: str = ""):
    """(where, module) of every ``_target_`` with a dotted path and every ``$import`` in a config."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "_target_" and isinstance(v, str) and "." in v:
                yield where, v
            yield from _named_modules(v, bundle, f"{where}#{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _named_modules(v, bundle, f"{where}#{i}")
    elif isinstance(value, str) and IMPORT.match(value):
        yield where, IMPORT.match(value).group(1)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_configs_name_only_the_installed_package(bundle):
    """A bundle folder copied anywhere runs against the installed ``xray2ct`` distribution: its configs name
    MONAI/torch/ignite, the shared ``common``/``data_prep`` packages, or this bundle's own
    ``bundles.<bundle>.scripts`` (installed with it) — never another bundle, never a relative ``scripts.`` that
    would depend on the folder being on ``sys.path``."""
    for path in sorted((REPO / "bundles" / bundle / "configs").glob("*.json")):
        for where, module in _named_modules(json.loads(path.read_text()), bundle):
            root = module.split(".")[0]
            own = module == "bundles" or module.startswith(f"bundles.{bundle}.")
            assert root in CODE_ROOTS or own, f"{path.name}{where}: {module}"


@pytest.mark.slow
def test_a_copied_bundle_folder_runs_inference(tmp_path):
    """vqgan_3d_patch copied out of the repository (as a zoo download or a MONAI Label model folder), zoo-form
    weights, cpu_tiny: inference from the copy writes a CT in HU on the input's grid."""
    import nibabel as nib
    import numpy as np
    from monai.bundle import run

    folder = zoo_bundle("vqgan_3d_patch", tmp_path / "elsewhere")
    configs = folder / "configs"
    shutil.copy(REPO / "bundles" / "vqgan_3d_patch" / "configs" / "cpu_tiny.json", configs / "cpu_tiny.json")
    (tmp_path / "in").mkdir()
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    hu = np.random.default_rng(0).uniform(-1000.0, 400.0, (40, 36, 34)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "in" / "ct.nii.gz"))
    run("run", config_file=[str(configs / "inference.json"), str(configs / "cpu_tiny.json")],
        meta_file=str(configs / "metadata.json"), bundle_root=str(folder), dataset_dir=str(tmp_path / "in"),
        output_dir=str(tmp_path / "out"), previews=False)  # fmt: skip
    written = sorted((tmp_path / "out").glob("*.nii.gz"))
    assert len(written) == 1, sorted(p.name for p in (tmp_path / "out").iterdir())
    out = nib.load(str(written[0]))
    assert out.shape == hu.shape and np.allclose(out.affine, affine)
    assert np.isfinite(out.get_fdata()).all()


# ----------------------------------------------------------------------------------- xray2ct-zoo-export
def _bundle_with(tmp_path: Path, listing: str, weights: dict[str, object]) -> Path:
    root = tmp_path / "b"
    (root / "models").mkdir(parents=True)
    (root / "large_files.yml").write_text(listing)
    for name, obj in weights.items():
        torch.save(obj, root / "models" / name)
    return root


def _training_form() -> dict:
    from common.checkpoint import build_network

    net = build_network("bundles.pix2pix_phase.scripts.networks.PhaseGenerator", **PIX2PIX_TINY)
    return {"model": net.state_dict(), "record": CheckpointRecord("pix2pix_phase", network=net, version="0").state_dict()}


PIX2PIX_TINY = {"image_size": 16, "base_channels": 4, "max_downsamplings": 2}


def test_zoo_export_in_place_is_idempotent_and_loadable(tmp_path):
    root = _bundle_with(tmp_path, 'large_files:\n  - path: "models/model.pt"\n', {"model.pt": _training_form()})
    [(weights, sidecar)] = export_zoo_weights(root)
    first = torch.load(weights, weights_only=True)
    # again: the same pair and weights (torch.save's bytes name the temporary file, so the hash is re-bound)
    assert export_zoo_weights(root) == [(weights, sidecar)]
    bare = torch.load(weights, weights_only=True)
    assert set(bare) == set(_training_form()["model"]) and all(torch.equal(bare[k], first[k]) for k in bare)
    assert read_record(weights)["bundle"] == "pix2pix_phase"  # the sidecar's hash is the file's


@pytest.mark.parametrize(
    "listing, weights, problem",
    [
        ('large_files:\n  - path: "models/model.pt"\n', {}, "not found|no such|does not exist"),
        ('large_files:\n  - path: "models/model.pt"\n', {"model.pt": {"w": torch.zeros(1)}}, "no record"),
        ('large_files:\n  - path: "../outside.pt"\n', {}, "not a file directly under models/"),
        ('large_files:\n  - path: "models/sub/x.pt"\n', {}, "not a file directly under models/"),
        ("large_files: [\n", {}, "unreadable"),
    ],
)
def test_zoo_export_refuses(tmp_path, listing, weights, problem):
    from common.errors import InputError

    root = _bundle_with(tmp_path, listing, weights)
    with pytest.raises(InputError, match=problem):
        export_zoo_weights(root)
    assert not (root / "outside.pt").exists() and not list((root / "models").glob("*.record.json"))


# ----------------------------------------------------------------- train properties, as ci/unit_tests do
TRAIN_DATA = {  # conftest fixture each bundle trains on at CPU size (latent_ddpm needs a latent cache first)
    "vqgan_3d_patch": "phantom_pairs",
    "perx2ct": "phantom_pairs",
    "progressive_cascade": "phantom_pairs",
    "pe_classifier": "phantom_pairs",
    "pix2pix_phase": "phantom_4dct",
}


@pytest.mark.parametrize("bundle", sorted(TRAIN_DATA))
def test_train_properties_with_fake_data(bundle, request, tmp_path):
    """The zoo checks train.json's properties in its ``ci/unit_tests/test_<bundle>.py``, on data it writes
    (``ConfigWorkflow(workflow_type="train", config_file, logging_file, meta_file, **override)``, ``initialize``,
    ``check_properties``): with no data a shuffled ``DataLoader`` of nothing cannot be built, so neither can."""
    data = request.getfixturevalue(TRAIN_DATA[bundle])
    configs = REPO / "bundles" / bundle / "configs"
    workflow = create_workflow(
        workflow_type="train",
        config_file=[str(configs / "train.json"), str(configs / "cpu_tiny.json")],
        logging_file=str(configs / "logging.conf"),
        meta_file=str(configs / "metadata.json"),
        bundle_root=str(tmp_path),
        dataset_dir=str(data["root"]),
    )
    assert workflow.check_properties() == []
    # the property is the trainer's own inferer (the GAN steps call their generator through it, not beside it)
    assert workflow.parser.get_parsed_content("train#trainer").inferer is workflow.train_inferer
