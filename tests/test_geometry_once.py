"""The DRR geometry is resolved once on each side (issue 25): built by ``common.drr.detector_geometry``, read back by
``common.datalist.dataset_geometry``, then carried as is through training config -> network -> record -> inference."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from common.checkpoint import CheckpointRecord, read_config, read_record, resolve_settings
from common.datalist import dataset_geometry
from common.drr import DEFAULT_GEOMETRY, DRRGeometry, detector_geometry, get_geometry
from common.errors import InputError
from data_prep.phantom import make_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
PIXELS = 32  # the cpu_tiny X-ray input size of perx2ct (image_size) and the cascade (xray_size)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny phantom dataset rendered with the clinical camera (not the default preset: a default cannot pass)."""
    root = tmp_path_factory.mktemp("geometry")
    make_phantom_dataset(root, n_cases=2, size=16, geometry="clinical", drr_pixels=PIXELS, val_fraction=0, test_fraction=0)
    return root


def _configs(bundle: str, kind: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / f"{kind}.json"), str(BUNDLES / bundle / "configs" / "cpu_tiny.json")]


def _checkpoint(bundle: str, dataset: Path, path: Path) -> tuple[DRRGeometry, torch.nn.Module]:
    """Train-config network and its record saved as training saves them; returns (config geometry, network)."""
    parser = read_config(_configs(bundle, "train"), {"bundle_root": str(BUNDLES / bundle), "dataset_dir": str(dataset)})
    geometry, net = parser.get_parsed_content("geometry"), parser.get_parsed_content("network_def")
    record = CheckpointRecord(bundle, network=net, inputs={"geometry": geometry}, version="0")
    torch.save({"model": net.state_dict(), "record": record.state_dict()}, path)
    return geometry, net


def test_one_geometry_from_build_to_inference(dataset, tmp_path):
    built = detector_geometry("clinical", PIXELS)
    meta = json.loads((dataset / "dataset.json").read_text())
    assert get_geometry(meta["geometry"]) == built and meta["drr_pixels"] == PIXELS  # stored as rendered
    assert dataset_geometry(dataset / "dataset.json") == built  # the one reader

    from bundles.perx2ct.scripts.inference import PerX2CTInference

    configured, net = _checkpoint("perx2ct", dataset, tmp_path / "perx2ct.pt")
    assert configured == built and net.geometry == built  # training config -> network
    assert get_geometry(read_record(tmp_path / "perx2ct.pt")["network_def"]["geometry"]) == built  # -> record
    predictor = PerX2CTInference.from_bundle(BUNDLES / "perx2ct", tmp_path / "perx2ct.pt", _configs("perx2ct", "inference"))
    assert predictor.settings.geometry == built and predictor.net.geometry == built  # -> inference, as recorded

    from bundles.progressive_cascade.scripts.inference import CascadePredictor

    configured, net = _checkpoint("progressive_cascade", dataset, tmp_path / "cascade.pt")
    assert configured == built
    assert get_geometry(read_record(tmp_path / "cascade.pt")["network_def"]["geometry"]) == built
    cascade = CascadePredictor.from_checkpoint(
        str(tmp_path / "cascade.pt"), _configs("progressive_cascade", "inference"), bundle_root=str(BUNDLES / "progressive_cascade")
    )
    assert cascade.settings.geometry == built

    # latent_ddpm records the dataset's camera at its X-ray size in its inputs
    parser = read_config(_configs("latent_ddpm", "train"), {"bundle_root": str(BUNDLES / "latent_ddpm"), "dataset_dir": str(dataset)})
    recorded = parser.get_parsed_content("checkpoint_record#inputs#geometry")
    assert recorded == detector_geometry(built, parser.get_parsed_content("xray_size"))


def test_the_reader_gives_the_input_size_and_old_records_still_resolve(dataset):
    """Another input size: the reader resizes (the one place); a record stored at the DRRs' size (before 0.4)
    resolves to the same camera at the network's input size."""
    at_64 = dataset_geometry(dataset / "dataset.json", 64)
    assert at_64 == detector_geometry("clinical", 64) and at_64.detector_pixels == (64, 64)
    old = {"network_def": {"image_size": 64, "geometry": detector_geometry("clinical", PIXELS).as_dict()}}
    assert resolve_settings(old).geometry == at_64
    built = detector_geometry("clinical", PIXELS)
    assert detector_geometry(built, PIXELS) is built  # nothing to resize: the same object


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"geometry": "perx2ct", "drr_pixels": 48}, detector_geometry("perx2ct", 48)),  # older: a preset name
        ({"geometry": "perx2ct"}, get_geometry("perx2ct")),  # a preset name without drr_pixels: the preset's 128
        ({"geometry": detector_geometry("x2ctgan", 20).as_dict()}, detector_geometry("x2ctgan", 20)),
        ({"training": []}, get_geometry(DEFAULT_GEOMETRY)),  # no geometry: the one default (warned)
        (None, get_geometry(DEFAULT_GEOMETRY)),  # no file: a config parsed without data
    ],
)
def test_dataset_geometry_reads_every_datalist(tmp_path, content, expected):
    path = tmp_path / "dataset.json"
    if content is not None:
        path.write_text(json.dumps(content))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dataset_geometry(path) == expected
    assert any("no DRR 'geometry'" in str(w.message) for w in caught) == (content == {"training": []})


@pytest.mark.parametrize("geometry", ["nope", {"sad": 1.0}, {"sad": 900.0, "sid": 800.0, "detector_pixels": [8, 8], "detector_size_mm": [1, 1]}])
def test_dataset_geometry_names_the_file_of_a_bad_geometry(tmp_path, geometry):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"geometry": geometry}))
    with pytest.raises(InputError, match=re.escape(str(path)) + ": bad DRR 'geometry'"):
        dataset_geometry(path)


BUILD_AND_READ_PATH = [  # modules a geometry passes through between build_pairs and an inference
    "data_prep/*.py", "common/datalist.py", "common/checkpoint*.py", "common/baselines.py", "common/predictor.py",
    "bundles/*/scripts/*.py", "xray2ct/*.py",
]  # fmt: skip


def test_nothing_on_the_path_resizes_a_geometry_itself():
    """``.resized(`` lives in ``common.drr.detector_geometry`` only: builders and readers call that."""
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for pattern in BUILD_AND_READ_PATH
        for path in sorted(ROOT.glob(pattern))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if ".resized(" in line
    ]
    assert offenders == []
    drr = (ROOT / "common" / "drr.py").read_text()
    calls = [m.start() for m in re.finditer(r"\.resized\(", drr)]
    start = drr.index("def detector_geometry(")
    assert calls and all(start < c < drr.index("\ndef ", start + 1) for c in calls)


VIEWS = {
    "lateral": "left-lateral, beam right->left; row 0 superior, col 0 anterior",
    "pa": "source posterior, detector anterior; row 0 superior, col 0 patient right",
}
# dataset.json "geometry" of clinical builds as written before the refactor (commit de8c170): unchanged since
BEFORE_12 = {
    "detector_pixels": [12, 12], "detector_size_mm": [430.0, 430.0], "detector_spacing_mm": [430.0 / 12] * 2,
    "lateral": [1320.0, 1500.0], "name": "clinical", "sad": 1640.0, "sid": 1800.0, "views": VIEWS,
}  # fmt: skip


def test_datasets_store_the_geometry_they_stored_before(tmp_path):
    from data_prep.build_pairs import build_settings
    from data_prep.phantom import make_pe_dataset

    path = make_phantom_dataset(tmp_path / "a", n_cases=1, size=16, geometry="clinical", drr_pixels=12, val_fraction=0, test_fraction=0)
    meta = json.loads(Path(path).read_text())
    assert meta["geometry"] == BEFORE_12 and meta["drr_pixels"] == 12
    pe = make_pe_dataset(tmp_path / "b", n_patients=(1, 0, 0), size=16, geometry="clinical", drr_pixels=12)
    assert json.loads(Path(pe).read_text())["geometry"] == BEFORE_12
    assert build_settings((16,) * 3, (12.0,) * 3, "clinical", 12)["geometry"] == BEFORE_12


@pytest.mark.parametrize("camera, loads", [("x2ctgan", True), ("perx2ct", False)])
def test_a_record_with_the_geometry_at_the_drr_size_still_loads(tmp_path, camera, loads):
    """Records written before the configs stored the camera at the input size (here 128-pixel DRRs, a 32-pixel
    network) load into today's config network: one camera, another pixel count; another camera is refused."""
    from common.checkpoint import load_weights

    parser = read_config(_configs("perx2ct", "train"), {"bundle_root": str(BUNDLES / "perx2ct"), "dataset_dir": str(tmp_path)})
    net = parser.get_parsed_content("network_def")  # no dataset: the default camera at image_size
    assert net.geometry == detector_geometry(DEFAULT_GEOMETRY, PIXELS)
    record = json.loads(CheckpointRecord("perx2ct", network=net, version="0").state_dict()["json"])
    record["network_def"]["geometry"] = detector_geometry(camera, 128).as_dict()
    torch.save({"model": net.state_dict(), "record": {"json": json.dumps(record)}}, tmp_path / "old.pt")
    if loads:
        load_weights(net, tmp_path / "old.pt", expected_bundle="perx2ct")
    else:
        with pytest.raises(InputError, match="geometry="):
            load_weights(net, tmp_path / "old.pt", expected_bundle="perx2ct")


@pytest.mark.parametrize("view", ["pa", "lateral"])
def test_the_cascade_grid_is_the_same_at_the_drr_or_the_input_size(view):
    """A cascade trained now holds the camera at xray_size, one trained before at the DRRs' size: the normalised
    back-projection grid is the same bits (power-of-two pixel counts scale exactly), so results do not change."""
    from bundles.progressive_cascade.scripts.networks import backprojection_grid

    at_drr = backprojection_grid(detector_geometry("clinical", 128), 16, (320.0,) * 3, view)
    assert torch.equal(at_drr, backprojection_grid(detector_geometry("clinical", 512), 16, (320.0,) * 3, view))
