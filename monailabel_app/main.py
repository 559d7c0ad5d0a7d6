"""A MONAI Label (0.8.5) app serving xray2ct's volume-in bundles: one CT study in, one answer out.

Offered (each a bundle folder under the ``bundles_dir`` conf, default ``<app>/model``):

* ``vqgan_3d_patch`` (CT -> reconstructed CT) and ``pix2pix_phase`` (average CT -> phase-0 CT): infer returns a
  float32 NIfTI in HU on the input's grid (same shape, affine and voxel order); both train from the
  datastore's ``{"image", "label"}`` pairs (vqgan reads only ``image``; pix2pix: image = average CT,
  label = phase-0 CT).
* ``pe_classifier``: a classification task: infer returns ``{"prediction": [{"label", "score"}]}`` with the
  probability of pulmonary embolism; not trainable here (its labels are one integer per case, MONAI Label's
  are annotation files).

The X-ray-in bundles (perx2ct, progressive_cascade, latent_ddpm) take two radiographs, not one study: they
are not offered; ``xray2ct-web`` serves them. Run with ``bin/monailabel_check.sh`` (docs/MONAI_LABEL.md).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any

import nibabel as nib
import numpy as np
import torch

logger = logging.getLogger(__name__)


def import_torchvision_beside_cpu_torch() -> None:
    """Import torchvision even where its compiled ops cannot load.

    PyPI's torchvision 0.28.0 (the release paired with torch 2.13.0) is a CUDA build: beside the CPU torch
    its ``_C`` extension does not load (it links libtorch_cuda), and its import then fails registering fake
    kernels for ``torchvision::nms``/``qnms``, ops that were never defined. MONAI Label 0.8.5 imports
    torchvision only for ``make_grid``/``save_image`` (monailabel/transform/post.py); defining the two
    schemas, without kernels, lets the import finish. Nothing here calls nms (it would raise "no kernel").
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:  # not installed: MONAI Label's own import says so (tests stub MONAI Label)
        return
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_torchvision_schemas"] = library  # keep the definitions alive
        import torchvision  # noqa: F401

        logger.warning("torchvision's compiled ops are unavailable (CUDA build beside CPU torch): nms undefined")


import_torchvision_beside_cpu_torch()

from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Orientation, SaveImaged  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402

VOLUME_BUNDLES = ("vqgan_3d_patch", "pix2pix_phase")  # CT in, CT (HU) out
CLASSIFIER_BUNDLES = ("pe_classifier",)  # CT in, a probability out
TRAINABLE_BUNDLES = ("vqgan_3d_patch", "pix2pix_phase")
PE_LABEL = "pulmonary embolism"


def _original_grid(image: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """The request image's file affine (4x4) and spatial shape, from the loader's metadata."""
    meta = image.meta if isinstance(image, MetaTensor) else {}
    affine = meta.get("original_affine", meta.get("affine"))
    shape = meta.get("spatial_shape")
    if affine is None or shape is None:
        raise ValueError("the loaded image carries no original_affine/spatial_shape metadata")
    return np.asarray(torch.as_tensor(affine), dtype=np.float64), tuple(int(s) for s in np.asarray(shape))


def on_input_grid(pred: Any, image: Any) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` (C=1, X, Y, Z) on the preprocessed grid -> (X, Y, Z) float32 array and affine of the input file.

    The bundles hand back HU on the input's world grid but possibly reoriented (vqgan works in RAS); this
    undoes the orientation and refuses anything that is not the input's grid (shape and affine), rather than
    writing a volume that would not overlay the study.
    """
    affine, shape = _original_grid(image)
    axcodes = "".join(nib.orientations.aff2axcodes(affine))
    # the prediction's own affine where the bundle inverted its preprocessing (pix2pix: Invertd), else the
    # preprocessed image's (an inferer's output may carry a default affine: vqgan's CodecInferer)
    grids = ([pred.affine] if isinstance(pred, MetaTensor) else []) + [image.affine]
    values = torch.as_tensor(pred).detach().cpu().float()
    for grid in grids:
        restored = Orientation(axcodes=axcodes)(MetaTensor(values, affine=torch.as_tensor(grid)))
        array = np.asarray(restored.array[0], dtype=np.float32)
        got = np.asarray(torch.as_tensor(restored.affine), dtype=np.float64)
        if array.shape == shape and np.allclose(got, affine, atol=1e-3):
            return array, affine
    raise ValueError(f"prediction grid {tuple(values.shape[1:])} is not the input's {shape} {affine.tolist()}")


class VolumeInferTask(BundleInferTask):
    """A CT -> CT bundle: its own pre/postprocessing (HU out), written as float32 NIfTI on the input grid.

    MONAI Label's default ``Restored`` post-step (nearest-neighbour resize, affine swap) and its uint8 label
    writer are for segmentation masks; neither is used.
    """

    def __init__(self, path: str, conf: dict[str, str]) -> None:
        super().__init__(path, conf, type=InferType.OTHERS, add_post_restore=False, post_filter=[SaveImaged],
                         load_strict=True)  # fmt: skip

    def writer(
        self, data: dict[str, Any], extension: str | None = None, dtype: Any = None
    ) -> tuple[str, dict]:
        array, affine = on_input_grid(data[self.output_label_key], data[self.input_key])
        path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        nib.save(nib.Nifti1Image(array, affine), path)
        finite = np.isfinite(array)
        return path, {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "units": "HU",
            "range": [float(array[finite].min()), float(array[finite].max())] if finite.any() else None,
        }


class ClassificationInferTask(BundleInferTask):
    """pe_classifier as a classification task: the sigmoid probability under one named label, no file."""

    def __init__(self, path: str, conf: dict[str, str]) -> None:
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False,
                         post_filter=[SaveImaged], load_strict=True)  # fmt: skip
        self.labels = {PE_LABEL: 0}

    def writer(
        self, data: dict[str, Any], extension: str | None = None, dtype: Any = None
    ) -> tuple[None, dict]:
        scores = torch.as_tensor(data[self.output_label_key]).detach().cpu().float().reshape(-1)
        if scores.numel() != 1 or not torch.isfinite(scores).all() or not 0.0 <= float(scores[0]) <= 1.0:
            raise ValueError(f"expected one probability in [0, 1], got {scores.tolist()}")
        return None, {"prediction": [{"idx": 0, "label": PE_LABEL, "score": float(scores[0])}]}


class XrayToCTApp(MONAILabelApp):
    """The volume-in xray2ct bundles found in ``conf["bundles_dir"]`` (or ``<app_dir>/model``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles_dir = os.path.realpath(conf.get("bundles_dir", os.path.join(app_dir, "model")))
        wanted = conf.get("models", "all")
        offered = VOLUME_BUNDLES + CLASSIFIER_BUNDLES
        self.models = offered if wanted == "all" else tuple(m for m in wanted.split(",") if m in offered)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="xray2ct",
                         description="xray2ct's CT-in bundles (VQ-GAN reconstruction, phase synthesis, PE)",
                         version="0.1.0")  # fmt: skip

    def _folder(self, name: str) -> str | None:
        path = os.path.join(self.bundles_dir, name)
        if os.path.isfile(os.path.join(path, "configs", "metadata.json")):
            return path
        logger.warning("bundle %s not found under %s: not offered", name, self.bundles_dir)
        return None

    def init_infers(self) -> dict[str, InferTask]:
        tasks: dict[str, InferTask] = {}
        for name in self.models:
            path = self._folder(name)
            if path is None:
                continue
            task_cls = ClassificationInferTask if name in CLASSIFIER_BUNDLES else VolumeInferTask
            task = task_cls(path, self.conf)
            if task.is_valid():
                tasks[name] = task
        return tasks

    def init_trainers(self) -> dict[str, TrainTask]:
        tasks: dict[str, TrainTask] = {}
        for name in self.models:
            path = self._folder(name) if name in TRAINABLE_BUNDLES else None
            if path is not None:
                task = BundleTrainTask(path, self.conf, load_strict=True)
                if task.is_valid():
                    tasks[name] = task
        return tasks

    def init_strategies(self) -> dict:
        return {}  # no active learning: the labels are CTs, not annotations to ask for
