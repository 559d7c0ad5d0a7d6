"""Python inference API: a PA + lateral pair -> one CT per stage (HU, spacing = FOV / size) + previews.

    from bundles.progressive_cascade.scripts.inference import CascadePredictor
    cascade = CascadePredictor.from_checkpoint("models/stage3_model.pt")        # built from its record
    prediction = cascade.infer({"pa": "patient-PA.png", "lateral": "patient-L.png"})  # common.predictor.Prediction
    prediction.volumes                                                          # {"stage1": Volume, ...}

It implements :class:`common.predictor.Predictor` (the one inference path of the X-ray-in bundles).

Volumes are canonical RAS centred on the isocentre (origin 0, as the DRR geometry). Radiographs (PNG, JPEG,
DICOM) are brought to the model domain by :func:`common.xray.load_view`; the dataset's DRR NIfTI files go
through the config's ``preprocessing`` chain (the same result on DRRs, ``tests/test_pipeline.py``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from common.checkpoint import InferenceSettings, build_for_inference, load_weights, resolve_settings, unwrap
from common.drr import DRRGeometry, detector_geometry, get_geometry
from common.errors import InputError, require_file
from common.intensity import get_window
from common.predictor import (
    Prediction,
    Progress,
    default_postprocessing,
    postprocess,
    require_views,
    unit_to_volume,
    views_tensor,
    write_prediction,
)
from common.volume import Volume
from common.xray import NIFTI_SUFFIXES, load_view

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CascadePredictor:
    """A :class:`common.predictor.Predictor` whose :class:`~common.predictor.Prediction` holds one volume per stage
    (``stage1`` ... ``stage<n>``, the last the final CT). Only the stages the checkpoint trained
    (``network.stage``) are run: a stage-1 checkpoint's later stages are untrained.
    """

    view_names = ("pa", "lateral")

    def __init__(
        self,
        network,
        preprocessing: Callable | None,
        fov_mm: Sequence[float],
        device="cpu",
        hu_window: str | dict = "xray2ct",
        geometry: str | dict | DRRGeometry | None = None,
        postprocessing: Callable | None = None,
        settings: InferenceSettings | None = None,
    ):
        """``preprocessing``: the config's X-ray transform chain (``{"pa", "lateral"}`` DRR paths -> (1, S, S)
        each; None: :func:`common.xray.load_view` for every input). ``geometry``: the DRR camera of the
        training X-rays (for DRR-consistency scores). ``postprocessing``: the config's, on each stage's
        ``{"pred": (1, N, N, N) unit window}`` (default: the clamp to [0, 1]); ``settings``: resolved by
        :func:`common.checkpoint.build_for_inference` (default: from these arguments)."""
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.fov_mm = tuple(float(f) for f in fov_mm)
        self.transform = preprocessing
        self.postprocessing = default_postprocessing() if postprocessing is None else postprocessing
        if settings is None:
            size = int(self.net.xray_size)
            camera = None if geometry is None else detector_geometry(geometry, size)
            settings = InferenceSettings(bundle="progressive_cascade", hu_window=get_window(hu_window),
                                         image_size=size, geometry=camera)  # fmt: skip
        self.settings = settings
        self.window = settings.hu_window
        self.geometry = settings.geometry  # the training DRR camera at the network's input size

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        config_files: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        bundle_root: str = BUNDLE_ROOT,
        contents: Mapping | None = None,
        **overrides,
    ) -> CascadePredictor:
        """The cascade of ``checkpoint`` built from its record (stage, sizes, FOV, geometry), weights loaded.

        ``config_files`` / ``overrides`` are checked against the record (:func:`common.checkpoint.build_for_inference`);
        a checkpoint without a record is built from them (default: ``inference.json``) with a warning.
        ``contents``: the checkpoint already read (:func:`common.checkpoint.read_checkpoint`): one read of the file.
        """
        network, record, parser, settings = build_for_inference(
            checkpoint,
            config_files=config_files,
            default_config_files=[os.path.join(bundle_root, "configs", "inference.json")],
            expected_bundle="progressive_cascade",
            data_arguments=("geometry", "fov_mm"),
            runtime_arguments=("gradient_checkpointing",),
            input_ids=("hu_window",),
            overrides=overrides,
            settings={"bundle_root": bundle_root},
            device=device,
            checkpoint=contents,
        )
        inputs = (record or {}).get("inputs") or {}
        definition = (record or {}).get("network_def") or {}
        stage = int(inputs.get("stage") or parser.get_parsed_content("stage"))
        unwrap(network).set_stage(stage)
        fov_mm = definition.get("fov_mm") or inputs.get("fov_mm") or parser.get_parsed_content("fov_mm")
        if settings.geometry is None:  # a record-less checkpoint: the dataset's camera at xray_size, as the config reads it
            settings = dataclasses.replace(settings, geometry=get_geometry(parser.get_parsed_content("geometry")))
        parser["xray_size"] = int(unwrap(network).xray_size)  # the chain resizes to the network's input
        preprocessing = parser.get_parsed_content("preprocessing")
        post = parser.get_parsed_content("postprocessing") if "postprocessing" in parser else None
        return cls(network, preprocessing, fov_mm, device, postprocessing=post, settings=settings)

    @staticmethod
    def check_inputs(pa_file: str | None, lateral_file: str | None) -> None:
        """:class:`InputError` unless both radiographs are given and exist (before any model is loaded)."""
        if not pa_file or not lateral_file:
            raise InputError(None, "inference needs --pa_file and --lateral_file (a PA and a lateral radiograph)")
        require_file(pa_file)
        require_file(lateral_file)

    def load_checkpoint(self, path: str) -> CascadePredictor:
        """Load a cascade checkpoint (:func:`common.checkpoint.load_weights`: the record is checked)."""
        record = load_weights(self.network, path, expected_bundle="progressive_cascade")
        stage = ((record or {}).get("inputs") or {}).get("stage")
        if stage:
            unwrap(self.network).set_stage(int(stage))
        if record is not None:
            self.settings = resolve_settings(record, checkpoint=os.fspath(path))
            self.window, self.geometry = self.settings.hu_window, self.settings.geometry
        self.network.eval()
        return self

    # -- properties -----------------------------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        return unwrap(self.network)

    @property
    def stage(self) -> int:
        """The last trained stage (outputs of stages 1..stage)."""
        return int(self.net.stage)

    @property
    def xray_size(self) -> int:
        return int(self.net.xray_size)

    @property
    def volume_sizes(self) -> tuple[int, ...]:
        return tuple(self.net.volume_sizes[: self.stage])

    def spacing(self, size: int) -> tuple[float, float, float]:
        """Voxel spacing (mm) of a cubic stage output of ``size`` voxels: the FOV divided by the size."""
        return tuple(f / int(size) for f in self.fov_mm)  # type: ignore[return-value]

    # -- inference ------------------------------------------------------------------------------
    def preprocess(self, pa, lateral) -> torch.Tensor:
        """Two radiographs (paths or 2D arrays) -> (1, 2, S, S) float32 in [0, 1], on CPU."""
        if pa is None or lateral is None:
            raise InputError(None, "the cascade needs both a PA (frontal) and a lateral radiograph")
        paths = [isinstance(v, (str, os.PathLike)) for v in (pa, lateral)]
        drrs = all(paths) and all(os.fspath(v).lower().endswith(NIFTI_SUFFIXES) for v in (pa, lateral))
        if drrs and self.transform is not None:
            data = self.transform({"pa": require_file(pa), "lateral": require_file(lateral)})
            xrays = torch.cat((data["pa"], data["lateral"]), dim=0)[None].float()
        else:
            views = [load_view(pa, self.xray_size, "pa"), load_view(lateral, self.xray_size, "lateral")]
            xrays = torch.from_numpy(np.stack(views))[None]
        if not torch.isfinite(xrays).all():
            raise InputError(None, "X-ray contains NaN or infinite values")
        return xrays

    @torch.no_grad()
    def predict_views(self, xrays: torch.Tensor) -> list[torch.Tensor]:
        """(1, 2, S, S) -> every trained stage's output (1, 1, N_k, N_k, N_k) in the unit window after the
        config's ``postprocessing`` (the clamp to [0, 1]), float32 on CPU."""
        outputs = self.net.forward_all(xrays.to(self.device, torch.float32), upto=self.stage)
        return [postprocess(self.postprocessing, o) for o in outputs]

    def to_volumes(self, outputs: Sequence[torch.Tensor]) -> dict[str, Volume]:
        """Stage outputs -> ``{"stage1": Volume, ...}`` in HU (canonical RAS, spacing FOV / size)."""
        return {
            f"stage{k}": unit_to_volume(out, self.window, self.spacing(out.shape[-1]))
            for k, out in enumerate(outputs, start=1)
        }

    # -- the Predictor protocol (common.predictor) ----------------------------------------------
    def prepare(self, inputs: Mapping) -> np.ndarray:
        """``{"pa", "lateral"}`` (paths or 2D arrays) -> (2, S, S) float32 model-domain views."""
        pa, lateral = require_views(inputs, self.view_names, "the cascade")
        return self.preprocess(pa, lateral)[0].numpy()

    def infer_views(self, views: np.ndarray, options: Mapping | None = None, progress: Progress | None = None) -> Prediction:
        """(2, S, S) views -> :class:`Prediction` with ``{"stage1": Volume, ..., "stage<n>": Volume}``."""
        x = views_tensor(views, 2, "progressive_cascade")
        volumes = self.to_volumes(self.predict_views(x))
        if progress is not None:
            progress(1, 1)
        return Prediction(volumes, x[0].numpy(), self.view_names, {"stage": self.stage})

    def infer(self, inputs: Mapping, options: Mapping | None = None, progress: Progress | None = None) -> Prediction:
        return self.infer_views(self.prepare(inputs), options, progress)

    def predict(self, pa_file: str, lateral_file: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every trained stage's output (B=1, unit window, clamped) and the model-ready X-rays (1, 2, S, S)."""
        xrays = self.preprocess(pa_file, lateral_file)
        return self.predict_views(xrays), xrays

    def predict_volumes(self, pa, lateral) -> dict[str, Volume]:
        """A PA + lateral pair (paths or arrays) -> ``{"stage1": Volume, ..., "stage<n>": Volume}`` in HU."""
        return self.to_volumes(self.predict_views(self.preprocess(pa, lateral)))

    def __call__(
        self, pa_file: str, lateral_file: str, output_dir: str, case_id: str = "case"
    ) -> dict[str, str]:
        """One case written by :func:`common.predictor.write_prediction` (``<case>_ct.nii.gz``, ``<case>_stage<k>``,
        ``<case>_preview.png``, ``<case>_axial.gif``)."""
        self.check_inputs(pa_file, lateral_file)
        return write_prediction(self.infer({"pa": pa_file, "lateral": lateral_file}), output_dir, case_id)
