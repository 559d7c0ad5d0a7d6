"""Python API: a trained PerX2CT bundle as an object that turns a PA + lateral pair into a CT ``Volume``.

    from bundles.perx2ct.scripts.inference import PerX2CTInference
    model = PerX2CTInference.from_bundle("bundles/perx2ct", device="cuda")
    prediction = model.infer({"pa": "patient-PA.png", "lateral": "patient-L.png"})   # common.predictor.Prediction
    common.predictor.write_prediction(prediction, "out", "patient")   # out/patient_ct.nii.gz + previews

It implements :class:`common.predictor.Predictor` (the one inference path of the X-ray-in bundles);
``predict(pa, lateral) -> Volume`` is the same run for callers that want the CT alone.

The output is canonical RAS, centred on the isocenter (origin 0), with the voxel spacing the model was
trained for (stored in the checkpoint). Whole volumes are decoded in batched chunks of slices, with AMP
(float16 autocast) on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from bundles.perx2ct.scripts.data import load_view_perx2ct
from common.checkpoint import (
    InferenceSettings,
    build_for_inference,
    load_weights,
    network_state,
    read_checkpoint,
    record_of,
    resolve_settings,
    unwrap,
)
from common.errors import InputError
from common.intensity import get_window
from common.predictor import (
    FORMATS,
    Prediction,
    Progress,
    default_postprocessing,
    postprocess,
    predict_items,
    require_views,
    unit_to_volume,
    views_tensor,
)
from common.volume import Volume
from common.xray import load_view

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
__all__ = ["BUNDLE_ROOT", "FORMATS", "PerX2CTInference", "legacy_geometry"]


def legacy_geometry(state: dict, config_files: Sequence[str] | None, bundle_root: str) -> dict:
    """Config overrides for a checkpoint without a record: spacing and DRR geometry from the network's buffers."""
    out: dict = {}
    if "spacing_mm" in state:
        out["spacing"] = [float(v) for v in state["spacing_mm"]]
    if "geometry_mm" in state:
        from common.checkpoint import read_config

        files = config_files or [os.path.join(bundle_root, "configs", "inference.json")]
        size = int(read_config(files)["image_size"])
        sad, sid, dh, dw = (float(v) for v in state["geometry_mm"])
        out["geometry"] = {
            "name": "checkpoint",
            "sad": sad,
            "sid": sid,
            "detector_pixels": [size, size],
            "detector_size_mm": [dh, dw],
        }
    return out


class PerX2CTInference:
    """Preprocess two radiographs, run the network, return a HU :class:`Volume` with spacing and affine
    (a :class:`common.predictor.Predictor`)."""

    view_names = ("pa", "lateral")

    def __init__(
        self,
        network: torch.nn.Module,
        device: str | torch.device | None = None,
        amp: bool = True,
        window: str = "xray2ct",
        chunk_size: int | None = None,
        reference_drr: str | np.ndarray | None = None,
        views: str | None = None,
        channels_last: bool = True,
        postprocessing: Callable | None = None,
        settings: InferenceSettings | None = None,
    ):
        """``reference_drr`` (a training DRR, path or array): real radiographs are histogram-matched to it.

        ``views``: ``"xray2ct"`` (our preprocessing, :func:`common.xray.load_view`) or ``"perx2ct"`` (the
        released model's 8-bit PNG intensities, :func:`data.load_view_perx2ct`); default: ``perx2ct``
        when the network uses the released camera. ``chunk_size`` None: chosen for the machine
        (``PerX2CTNet.machine_chunk_size``: timed once, cached; ``$XRAY2CT_PERX2CT_CHUNK`` fixes it). ``channels_last``:
        NHWC weights and activations (faster convolutions on CPU, same result; ``benchmarks/perx2ct_synthesis.py``).
        ``postprocessing``: the config's (on ``{"pred": (1, N, N, N) unit window}``; default
        :func:`common.predictor.default_postprocessing`, the clamp to [0, 1]). ``settings``: resolved by
        :func:`common.checkpoint.build_for_inference` (default: from the network and ``window``).
        """
        if views is None:
            views = "perx2ct" if getattr(unwrap(network), "camera", "drr") == "perx2ct" else "xray2ct"
        if views not in ("xray2ct", "perx2ct"):
            raise ValueError(f"views must be 'xray2ct' or 'perx2ct', got {views!r}")
        self.views = views
        self.reference = None
        if reference_drr is not None:
            self.reference = load_view(reference_drr, int(unwrap(network).image_size), "reference_drr")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.network = network.to(self.device).eval()
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.postprocessing = default_postprocessing() if postprocessing is None else postprocessing
        self.settings = settings if settings is not None else self._network_settings(get_window(window))
        self.window = self.settings.hu_window
        self.chunk_size = 0 if chunk_size is None else int(chunk_size)

    def _network_settings(self, window, checkpoint: str | None = None) -> InferenceSettings:
        """Settings of a network built from a config (no record): its own spacing, input size and camera."""
        net = self.net
        size = int(net.image_size)
        return InferenceSettings(
            bundle="perx2ct", hu_window=window, spacing=tuple(float(v) for v in net.spacing), image_size=size,
            geometry=net.geometry, checkpoint=checkpoint,
        )  # fmt: skip

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_bundle(
        cls,
        bundle_root: str = BUNDLE_ROOT,
        checkpoint: str | None = None,
        config_files: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        amp: bool = True,
        reference_drr: str | np.ndarray | None = None,
        contents: Mapping | None = None,
        **overrides,
    ) -> PerX2CTInference:
        """The trained network of ``checkpoint`` (default ``<bundle_root>/models/model.pt``), ready to predict.

        The network is built from the checkpoint's record (:func:`common.checkpoint.build_for_inference`), so
        it always has the size, spacing and DRR geometry it was trained with. ``config_files``
        (``inference.json`` + overlays such as ``cpu_tiny.json``) and ``overrides`` (config ids, e.g.
        ``network_def#chunk_size``) are checked against the record: a contradiction (another volume size,
        another HU window...) is refused with the differing values named; ``chunk_size`` may differ. A
        checkpoint saved before records is built from ``config_files`` (default: the bundle's
        ``inference.json``) with a warning, spacing and geometry taken from the weights' buffers. ``contents``:
        the checkpoint already read (:func:`common.checkpoint.read_checkpoint`), so the file is loaded once.
        """
        bundle_root = os.fspath(bundle_root)
        checkpoint = checkpoint or os.path.join(bundle_root, "models", "model.pt")
        contents = read_checkpoint(checkpoint) if contents is None else contents  # read once
        record = record_of(contents)
        if record is None:  # old checkpoints: the network's buffers know spacing and geometry
            state = network_state(contents, checkpoint)
            overrides = {**legacy_geometry(state, config_files, bundle_root), **overrides}
        network, record, parser, settings = build_for_inference(
            checkpoint,
            config_files=config_files,
            default_config_files=[os.path.join(bundle_root, "configs", "inference.json")],
            expected_bundle="perx2ct",
            data_arguments=("spacing", "geometry"),
            runtime_arguments=("chunk_size",),
            input_ids=("hu_window",),
            overrides=overrides,
            checkpoint=contents,
            settings={"bundle_root": bundle_root},
        )
        views = parser.get("predictor#views", None) if parser is not None else None
        post = parser.get_parsed_content("postprocessing") if parser is not None and "postprocessing" in parser else None
        return cls(network, device=device, amp=amp, reference_drr=reference_drr, views=views,
                   postprocessing=post, settings=settings)  # fmt: skip

    def load_checkpoint(self, path: str) -> PerX2CTInference:
        """Load weights into the config-built network (``inference.json``); a contradicting record is refused.
        The settings are then the record's (:func:`common.checkpoint.resolve_settings`)."""
        record = load_weights(self.network, path, expected_bundle="perx2ct")
        if record is not None:
            self.settings = resolve_settings(record, checkpoint=os.fspath(path))
        else:
            self.settings = self._network_settings(self.settings.hu_window, os.fspath(path))
        self.window = self.settings.hu_window
        return self

    # -- properties -----------------------------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        return unwrap(self.network)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.net.spacing)  # type: ignore[return-value]

    @property
    def image_size(self) -> int:
        return int(self.net.image_size)

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return (self.net.volume_size,) * 3  # type: ignore[return-value]

    # -- inference ------------------------------------------------------------------------------
    def preprocess(self, pa, lateral) -> torch.Tensor:
        """Two radiographs (paths or 2D arrays) -> (1, 2, H, W) float32 network input."""
        if pa is None or lateral is None:
            raise InputError(None, "PerX2CT needs both a PA (frontal) and a lateral radiograph")
        if self.views == "perx2ct":
            views = [
                load_view_perx2ct(pa, self.image_size, "pa"),
                load_view_perx2ct(lateral, self.image_size, "lateral"),
            ]
        else:
            views = [
                load_view(pa, self.image_size, "pa", self.reference),
                load_view(lateral, self.image_size, "lateral", self.reference),
            ]
        return torch.from_numpy(np.stack(views))[None]

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def predict_tensor(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """(B, 2, H, W) -> (B, 1, N, N, N) in the network window, before ``postprocessing`` (float32, on CPU)."""
        chunk = chunk_size if chunk_size is not None else self.chunk_size
        with self._autocast():
            out = self.net.reconstruct(x.to(self.device, torch.float32), chunk_size=chunk)
        return out.float().cpu()

    def to_volume(self, unit: torch.Tensor | np.ndarray) -> Volume:
        """A (N, N, N) [0, 1] array -> HU :class:`Volume`, RAS, centred on the isocenter."""
        return unit_to_volume(unit, self.window, self.spacing)

    # -- the Predictor protocol (common.predictor) ----------------------------------------------
    def prepare(self, inputs: Mapping) -> np.ndarray:
        """``{"pa", "lateral"}`` (paths or 2D arrays) -> (2, S, S) float32 model-domain views."""
        pa, lateral = require_views(inputs, self.view_names, "PerX2CT")
        return self.preprocess(pa, lateral)[0].numpy()

    def infer_views(self, views: np.ndarray, options: Mapping | None = None, progress: Progress | None = None) -> Prediction:
        """(2, S, S) views -> :class:`Prediction` ``{"ct": Volume}``; ``options``: ``chunk_size``."""
        x = views_tensor(views, 2, "perx2ct")
        unit = postprocess(self.postprocessing, self.predict_tensor(x, (options or {}).get("chunk_size"))[0])
        if progress is not None:
            progress(1, 1)
        return Prediction({"ct": self.to_volume(unit)}, x[0].numpy(), self.view_names)

    def infer(self, inputs: Mapping, options: Mapping | None = None, progress: Progress | None = None) -> Prediction:
        return self.infer_views(self.prepare(inputs), options, progress)

    def predict(self, pa, lateral, chunk_size: int | None = None) -> Volume:
        """Reconstruct a CT (HU) from a PA and a lateral radiograph (paths or arrays): :meth:`infer`'s CT."""
        if pa is None or lateral is None:
            raise InputError(None, "PerX2CT needs both a PA (frontal) and a lateral radiograph")
        return self.infer({"pa": pa, "lateral": lateral}, {"chunk_size": chunk_size}).ct

    __call__ = predict

    def predict_datalist(
        self, items: Sequence[dict], output_dir: str, fmt: str = "nii.gz", previews: bool = True
    ) -> list[str]:
        """Reconstruct every ``{"id", "pa", "lateral"}`` item (:func:`common.predictor.predict_items`)."""
        return predict_items(self, items, output_dir, fmt, previews, desc="perx2ct inference")
