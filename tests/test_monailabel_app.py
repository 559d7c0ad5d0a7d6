"""monailabel_app/main.py's own logic without MONAI Label installed (bin/monailabel_check.sh runs the real
server): volume outputs go back to the study's grid and voxel order, and a grid mismatch is refused.

MONAI Label 0.8.5 lives in its own venv (it pins pydicom 2.4, numpy < 2), so its modules are stubbed here with
the few names main.py imports; the tasks' MONAI Label behaviour is exercised only by the real check.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app_main(monkeypatch_module):
    """main.py imported with stub monailabel modules (classes it subclasses, enums it reads)."""
    stubs = {
        "monailabel": {},
        "monailabel.interfaces": {},
        "monailabel.interfaces.app": {"MONAILabelApp": type("MONAILabelApp", (), {})},
        "monailabel.interfaces.tasks": {},
        "monailabel.interfaces.tasks.infer_v2": {
            "InferTask": type("InferTask", (), {}),
            "InferType": types.SimpleNamespace(OTHERS="others", CLASSIFICATION="classification"),
        },
        "monailabel.interfaces.tasks.train": {"TrainTask": type("TrainTask", (), {})},
        "monailabel.tasks": {},
        "monailabel.tasks.infer": {},
        "monailabel.tasks.infer.bundle": {"BundleInferTask": type("BundleInferTask", (), {})},
        "monailabel.tasks.train": {},
        "monailabel.tasks.train.bundle": {"BundleTrainTask": type("BundleTrainTask", (), {})},
    }
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch_module.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("monailabel_app_main", REPO / "monailabel_app" / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _loaded(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """What LoadImaged + EnsureChannelFirstd + Orientationd(RAS) hand the bundle: RAS tensor, file metadata."""
    image = MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(affine))
    image.meta["original_affine"] = torch.as_tensor(affine)
    image.meta["spatial_shape"] = np.asarray(array.shape)
    return Orientation(axcodes="RAS")(image)


AFFINES = {
    "RAS": np.diag([1.5, 1.5, 2.5, 1.0]),
    "LPS (the CTPA crops)": np.array([[-1.5, 0, 0, 90], [0, -1.5, 0, 80], [0, 0, 1.5, -40], [0, 0, 0, 1.0]]),
    "LAS (the LIDC CT)": np.array([[-0.7, 0, 0, 180], [0, 0.7, 0, -170], [0, 0, 2.5, -300], [0, 0, 0, 1.0]]),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_volume_output_returns_to_the_study_grid(app_main, name):
    affine = AFFINES[name]
    study = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    image = _loaded(study, affine)
    pred = image.clone() * 2.0 - 1000.0  # a bundle's HU output on the preprocessed (RAS) grid
    array, out_affine = app_main.on_input_grid(pred, image)
    assert array.dtype == np.float32 and array.shape == study.shape
    np.testing.assert_allclose(out_affine, affine)
    np.testing.assert_array_equal(array, study * 2.0 - 1000.0)  # same voxel order as the file
    # a plain tensor, or one with an inferer's default affine (vqgan's CodecInferer), lies on the preprocessed grid
    plain = torch.as_tensor(pred).as_subclass(torch.Tensor)
    for other in (plain, MetaTensor(plain.clone(), affine=torch.eye(4, dtype=torch.float64))):
        array, _ = app_main.on_input_grid(other, image)
        np.testing.assert_array_equal(array, study * 2.0 - 1000.0)


def test_volume_output_on_another_grid_is_refused(app_main):
    image = _loaded(np.zeros((5, 6, 7), np.float32), AFFINES["RAS"])
    with pytest.raises(ValueError, match="not the input's"):
        app_main.on_input_grid(MetaTensor(torch.zeros(1, 4, 6, 7), affine=image.affine), image)
