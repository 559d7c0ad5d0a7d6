"""Python API: a trained PerX2CT bundle as an object that turns a PA + lateral pair into a CT ``Volume``.

    from bundles.perx2ct.scripts.inference import PerX2CTInference
    model = PerX2CTInference.from_bundle("bundles/perx2ct", device="cuda")
    volume = model.predict("patient-PA.png", "patient-L.png")     # common.volume.Volume in HU
    common.io.save_volume(volume, "ct.nii.gz")

The output is canonical RAS, centred on the isocenter (origin 0), with the voxel spacing the model was
trained for (stored in the checkpoint). Whole volumes are decoded in batched chunks of slices, with AMP
(float16 autocast) on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from bundles.perx2ct.scripts.data import load_view_perx2ct
from common.checkpoint import build_for_inference, load_weights, network_state, record_of, unwrap
from common.checkpoint import read_checkpoint as common_read_checkpoint
from common.datalist import case_id
from common.errors import InputError
from common.intensity import get_window
from common.io import load_volume, save_volume
from common.volume import Volume
from common.xray import load_view

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "h5": ".h5", "npy": ".npy"}


def read_checkpoint(path: str) -> dict:
    """The network state dict of a bundle checkpoint (:func:`common.checkpoint.read_checkpoint`)."""
    return network_state(common_read_checkpoint(path), path)


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
    """Preprocess two radiographs, run the network, return a HU :class:`Volume` with spacing and affine."""

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
    ):
        """``reference_drr`` (a training DRR, path or array): real radiographs are histogram-matched to it.

        ``views``: ``"xray2ct"`` (our preprocessing, :func:`common.xray.load_view`) or ``"perx2ct"`` (the
        released model's 8-bit PNG intensities, :func:`data.load_view_perx2ct`); default: ``perx2ct``
        when the network uses the released camera. ``chunk_size`` None: chosen for the machine
        (``PerX2CTNet.machine_chunk_size``: timed once, cached; ``$XRAY2CT_PERX2CT_CHUNK`` fixes it). ``channels_last``: NHWC weights and activations (faster convolutions
        on CPU, same result; ``benchmarks/perx2ct_synthesis.py``).
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
        self.window = get_window(window)
        self.chunk_size = 0 if chunk_size is None else int(chunk_size)

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
        **overrides,
    ) -> PerX2CTInference:
        """The trained network of ``checkpoint`` (default ``<bundle_root>/models/model.pt``), ready to predict.

        The network is built from the checkpoint's record (:func:`common.checkpoint.build_for_inference`), so
        it always has the size, spacing and DRR geometry it was trained with. ``config_files``
        (``inference.json`` + overlays such as ``cpu_tiny.json``) and ``overrides`` (config ids, e.g.
        ``network_def#chunk_size``) are checked against the record: a contradiction (another volume size,
        another HU window...) is refused with the differing values named; ``chunk_size`` may differ. A
        checkpoint saved before records is built from ``config_files`` (default: the bundle's
        ``inference.json``) with a warning, spacing and geometry taken from the weights' buffers.
        """
        bundle_root = os.fspath(bundle_root)
        checkpoint = checkpoint or os.path.join(bundle_root, "models", "model.pt")
        contents = common_read_checkpoint(checkpoint)
        record = record_of(contents)
        if record is None:  # old checkpoints: the network's buffers know spacing and geometry
            state = network_state(contents, checkpoint)
            overrides = {**legacy_geometry(state, config_files, bundle_root), **overrides}
        network, record, parser = build_for_inference(
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
        window = ((record or {}).get("inputs") or {}).get("hu_window") or parser.get("hu_window", "xray2ct")
        views = parser.get("predictor#views", None) if parser is not None else None
        return cls(network, device=device, amp=amp, window=window, reference_drr=reference_drr, views=views)

    def load_checkpoint(self, path: str) -> PerX2CTInference:
        """Load weights into the config-built network (``inference.json``); a contradicting record is refused."""
        load_weights(self.network, path, expected_bundle="perx2ct")
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
        """(B, 2, H, W) -> (B, 1, N, N, N) in the network window [0, 1] (float32, on CPU)."""
        chunk = chunk_size if chunk_size is not None else self.chunk_size
        with self._autocast():
            out = self.net.reconstruct(x.to(self.device, torch.float32), chunk_size=chunk)
        return out.float().clamp(0.0, 1.0).cpu()

    def to_volume(self, unit: torch.Tensor | np.ndarray) -> Volume:
        """A (N, N, N) [0, 1] array -> HU :class:`Volume`, RAS, centred on the isocenter."""
        hu = self.window.from_unit(np.asarray(unit, dtype=np.float32))
        return Volume.from_spacing(hu.astype(np.float32), self.spacing)

    def predict(self, pa, lateral, chunk_size: int | None = None) -> Volume:
        """Reconstruct a CT (HU) from a PA and a lateral radiograph (paths or arrays)."""
        x = self.preprocess(pa, lateral)
        return self.to_volume(self.predict_tensor(x, chunk_size)[0, 0].numpy())

    __call__ = predict

    def predict_datalist(
        self, items: Sequence[dict], output_dir: str, fmt: str = "nii.gz", previews: bool = True
    ) -> list[str]:
        """Reconstruct every ``{"id", "pa", "lateral"}`` item to ``<output_dir>/<id>_ct.<fmt>`` (+ previews)."""
        suffix = FORMATS.get(fmt.lstrip("."))
        if suffix is None:
            raise InputError(None, f"unknown output format {fmt!r}; choose from {sorted(FORMATS)}")
        written = []
        for i, item in enumerate(tqdm(items, desc="perx2ct inference", unit="case")):
            case = case_id(item, i)
            x = self.preprocess(item["pa"], item["lateral"])
            volume = self.to_volume(self.predict_tensor(x)[0, 0].numpy())
            path = save_volume(volume, os.path.join(output_dir, f"{case}_ct{suffix}"))
            written.append(path)
            if previews:
                reference = load_volume(item["ct"]) if item.get("ct") else None
                save_previews(volume, x[0].numpy(), os.path.join(output_dir, f"{case}_preview"), reference)
        return written


def save_previews(volume: Volume, views: np.ndarray, stem: str, reference: Volume | None = None) -> list[str]:
    """Montage PNG (reconstruction, optional ground truth, input views) and an axial slice GIF."""
    from common.preview import save_montage_png, save_slice_gif

    volumes = {"PerX2CT": volume} if reference is None else {"ground truth": reference, "PerX2CT": volume}
    xrays = {"PA": views[0], "lateral": views[1]}
    png = save_montage_png(stem + ".png", volumes, xrays=xrays)
    gif = save_slice_gif(stem + ".gif", volume, compare=reference)
    return [os.fspath(png), os.fspath(gif)]
