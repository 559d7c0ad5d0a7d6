"""Trivial predictors every model is scored against, on the same cases and in the same conventions.

A quality figure only means something beside the figure of a predictor that does not do the task:

``mean_training_ct`` (X-ray -> CT: perx2ct, progressive_cascade, latent_ddpm)
    The voxel-wise mean of the training split's CTs (HU), the same volume for every case: it ignores
    the X-rays. A model that does not beat it has not learnt anything from the radiographs.
``box_down_up`` (autoencoders: vqgan_3d_patch)
    Average-pool the volume by the latent factor ``f`` and upsample it trilinearly: the same latent grid
    as the autoencoder, with one float per latent voxel instead of a code.
``copy_input`` (pix2pix_phase)
    The input (average CT) itself as the prediction of the phase CT.

:func:`with_mean_prior` gives networks built with ``mean_prior=True`` the mean training CT as their
starting point (the model then learns what the X-rays change; an untrained one equals the baseline).
The PE classifier's baselines (prevalence, X-ray only) are classification baselines and live in its
report. :func:`compare` gives the difference block every ``metrics_report.json`` carries.

:class:`MeanTrainingCT`, :class:`BoxDownUp` and :class:`CopyInput` are the same predictors as objects that
:class:`common.handlers.MetricsReport` calls per case, ``baseline(label, output, item)``: a prediction shaped
like ``label``, in the network's intensities, so model and baseline go through the same conversion to HU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.checkpoint_records import file_sha256
from common.checkpoint_registry import unwrap
from common.datalist import load_split
from common.drr import get_geometry
from common.errors import InputError
from common.intensity import XRAY2CT, get_window
from common.io import load_volume
from common.volume import Volume
from common.xray import load_view

MEAN_TRAINING_CT = "mean_training_ct"
BOX_DOWN_UP = "box_down_up"
COPY_INPUT = "copy_input"

DESCRIPTIONS = {
    MEAN_TRAINING_CT: "voxel-wise mean of the training split's CTs (HU), the same volume for every case; "
    "ignores the X-rays",
    BOX_DOWN_UP: "average-pool by the latent factor, trilinear upsampling back (align_corners=False), "
    "replicate padding to a multiple of the factor: the autoencoder's latent grid with one float per "
    "latent voxel",
    COPY_INPUT: "the input volume itself as the prediction",
}

# Metric names containing one of these are errors (lower is better); every other metric is a score.
_LOWER_IS_BETTER = ("mae", "mse", "l1", "loss", "rmse", "error", "brier", "ece")


def lower_is_better(metric: str) -> bool:
    """True for error-like metrics (MAE, MSE, L1, loss...), False for scores (PSNR, SSIM, AUC...)."""
    name = metric.lower()
    return any(token in name for token in _LOWER_IS_BETTER)


def mean_training_ct(paths: Iterable[str | os.PathLike], shape: Sequence[int] | None = None) -> np.ndarray:
    """Voxel-wise mean (float32 HU, canonical RAS (X, Y, Z)) of the CT files ``paths``, read one at a time.

    Every CT must have the same shape (data_prep resamples datasets to one size); ``shape`` checks it
    against what the model predicts. Raises :class:`InputError` naming the first offending file.
    """

    total: np.ndarray | None = None
    count = 0
    first = None
    for path in paths:
        path = os.fspath(path)
        array = np.asarray(load_volume(path).to_canonical().validate(path).array, dtype=np.float64)
        if total is None:
            if shape is not None and tuple(array.shape) != tuple(int(s) for s in shape):
                raise InputError(path, f"CT shape {array.shape} differs from the model's {tuple(shape)}")
            total, first = np.zeros_like(array), path
        elif array.shape != total.shape:
            raise InputError(path, f"CT shape {array.shape} differs from {total.shape} of {first}")
        total += array
        count += 1
    if total is None:
        raise InputError(None, "no training CTs to average for the mean-CT baseline")
    return (total / count).astype(np.float32)


def mean_training_ct_of_datalist(
    datalist_file: str | os.PathLike,
    split: str = "training",
    shape: Sequence[int] | None = None,
    base_dir: str | os.PathLike | None = None,
    key: str = "ct",
) -> np.ndarray | None:
    """:func:`mean_training_ct` of the ``key`` files of ``split`` (:func:`common.datalist.load_split` resolves them).

    None when the datalist does not exist or the split is empty (e.g. at inference, where a model's stored
    prior is used instead).
    """

    items = load_split(datalist_file, split, base_dir)
    if not items:
        return None
    return mean_training_ct([item[key] for item in items], shape=shape)


# The bundles whose checkpoints carry the mean training CT (entry BASELINE_KEY): their reports' and the web
# app's baseline. Saved once per training run by common.checkpoint.CheckpointSaver.
MEAN_CT_BUNDLES = ("perx2ct", "progressive_cascade", "latent_ddpm")
BASELINE_KEY = "baseline"
MAX_BASELINE_VOXELS = 1024**3  # a 1024^3 CT: above every grid of the project; a larger stored array is refused


def mean_ct_state(record: Mapping | None) -> dict:
    """The checkpoint entry of the mean training CT of the datalist ``record`` names: ``{"mean_ct": (X, Y, Z)
    float32 HU tensor, "spacing": (3,) float64 mm, "n_cases", "datalist_sha256"}``; ``{}`` when it cannot be
    built (no datalist, no training CTs): loaders then fall back to the datalist (:func:`mean_ct_baseline`)."""

    datalist = (record or {}).get("datalist") or {}
    path = datalist.get("file")
    if not path or not os.path.isfile(path):
        return {}
    items = [i for i in load_split(path, "training") if i.get("ct")]
    if not items:
        return {}
    try:
        mean = mean_training_ct(i["ct"] for i in items)
        spacing = load_volume(items[0]["ct"]).to_canonical().spacing
    except (InputError, OSError):
        return {}
    return {
        "mean_ct": torch.from_numpy(mean),
        "spacing": torch.tensor([float(v) for v in spacing], dtype=torch.float64),
        "n_cases": len(items),
        "datalist_sha256": str(datalist.get("sha256") or ""),
    }


def _stored_mean_ct(state: object, source: str | None) -> dict | None:
    """``{"volume", "n_cases"}`` from a checkpoint's :data:`BASELINE_KEY` entry; None when absent or empty;
    :class:`InputError` naming ``source`` when it is not a finite 3D float volume with a positive spacing."""

    if not isinstance(state, Mapping) or "mean_ct" not in state:
        return None
    mean, spacing = state.get("mean_ct"), state.get("spacing")
    if not isinstance(mean, torch.Tensor) or mean.ndim != 3 or not mean.is_floating_point():
        raise InputError(source, "stored mean training CT is not a 3D float volume")
    if mean.numel() > MAX_BASELINE_VOXELS:
        raise InputError(source, f"stored mean training CT has {mean.numel()} voxels, above {MAX_BASELINE_VOXELS}")
    if not isinstance(spacing, torch.Tensor) or tuple(spacing.shape) != (3,) or not bool((spacing > 0).all()):
        raise InputError(source, "stored mean training CT has no valid spacing (3 positive mm values)")
    array = mean.float().numpy()
    if not np.isfinite(array).all():
        raise InputError(source, "stored mean training CT holds NaN or infinite values")
    volume = Volume.from_spacing(np.ascontiguousarray(array), tuple(float(v) for v in spacing.tolist()))
    n_cases = state.get("n_cases")
    return {"volume": volume, "n_cases": int(n_cases) if isinstance(n_cases, int) else None}


def mean_ct_baseline(record: Mapping | None, checkpoint: Mapping | None = None, source: str | None = None) -> dict:
    """``{"volume": mean training CT (HU Volume), "source", "n_cases"}`` or ``{"unavailable": reason}``.

    From the checkpoint's stored entry (``checkpoint``: its contents, :func:`common.checkpoint.read_checkpoint`;
    ``source``: its file) when it has one; else (checkpoints saved before it was stored) rebuilt from the
    training datalist the record names, refused when that file moved or changed since training (sha256).
    """

    stored = _stored_mean_ct((checkpoint or {}).get(BASELINE_KEY), source)
    if stored is not None:
        return {**stored, "source": f"{source or 'checkpoint'} (stored mean training CT)"}
    datalist = (record or {}).get("datalist") or {}
    path = datalist.get("file")
    if not path:
        return {"unavailable": "the checkpoint records no training datalist"}
    if not os.path.isfile(path):
        return {"unavailable": f"training datalist {path} not found"}
    if datalist.get("sha256"):
        if file_sha256(path) != datalist["sha256"]:
            return {"unavailable": f"training datalist {path} changed since training (sha256 differs)"}
    if not any(i.get("ct") for i in load_split(path, "training")):
        return {"unavailable": f"{path} lists no training CTs"}
    state = mean_ct_state(record)
    if not state:
        return {"unavailable": f"cannot average the training CTs of {path}"}
    stored = _stored_mean_ct(state, path)
    return {**stored, "source": path}


def with_mean_prior(
    network: torch.nn.Module,
    datalist_file: str | os.PathLike,
    window: str = "xray2ct",
    split: str = "training",
    base_dir: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """Give a network built with ``mean_prior=True`` the mean-CT baseline as its starting point; returns it.

    The prior is :func:`mean_training_ct_of_datalist` of ``split`` in the network's intensities (``window``
    scaled to [0, 1]), passed to the network's ``set_mean_prior`` (perx2ct, progressive_cascade), which keeps
    it in a persistent buffer: it travels in every checkpoint, and ``network_def`` records ``mean_prior``,
    so :func:`common.checkpoint.build_from_checkpoint` rebuilds the same network. Networks without a prior,
    and missing datalists or empty splits (inference: the prior comes from the checkpoint), are returned
    unchanged.
    """

    target = unwrap(network)
    if not getattr(target, "mean_prior", False):
        return network
    mean_hu = mean_training_ct_of_datalist(datalist_file, split, base_dir=base_dir)
    if mean_hu is not None:
        target.set_mean_prior(torch.from_numpy(get_window(window).to_unit(mean_hu)))
    return network


def resize_volume(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, C, *size) by trilinear interpolation (identity when the size matches)."""
    size = tuple(int(s) for s in size)
    if tuple(volume.shape[2:]) == size:
        return volume
    return F.interpolate(volume.float(), size=size, mode="trilinear", align_corners=False)


def box_down_up(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool (B, C, X, Y, Z) by ``factor`` and upsample trilinearly back to the same shape.

    The volume is replicate-padded at its far end to a multiple of ``factor`` (as the sliding-window
    codec pads), pooled, upsampled to the padded size and cropped back.
    """
    if volume.ndim != 5:
        raise InputError(None, f"expected a (B, C, X, Y, Z) volume, got shape {tuple(volume.shape)}")
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if factor == 1:
        return volume.clone()
    size = volume.shape[2:]
    pads: list[int] = []
    for s in reversed(size):
        pads += [0, -(-int(s) // factor) * factor - int(s)]
    x = volume.float()
    if any(pads):
        x = F.pad(x, pads, mode="replicate")
    coarse = F.avg_pool3d(x, kernel_size=factor, stride=factor)
    up = F.interpolate(coarse, size=x.shape[2:], mode="trilinear", align_corners=False)
    return up[(slice(None), slice(None), *(slice(0, int(s)) for s in size))].to(volume.dtype)


def copy_input(volume: torch.Tensor) -> torch.Tensor:
    """The pix2pix baseline: the input itself."""
    return volume


def compare(model: Mapping[str, float], baseline: Mapping[str, float]) -> dict:
    """``{"difference": model - baseline, "model_better": bool}`` per metric both have.

    ``difference`` is always model minus baseline (positive PSNR/SSIM difference = model better; negative
    MAE difference = model better); ``model_better`` applies each metric's direction.
    """
    difference, better = {}, {}
    for key, value in model.items():
        if key not in baseline:
            continue
        try:
            m, b = float(value), float(baseline[key])
        except (TypeError, ValueError):
            continue
        difference[key] = m - b
        better[key] = bool(m < b) if lower_is_better(key) else bool(m > b)
    return {"difference": difference, "model_better": better}


# ----------------------------------------------------------------------------------------------- report objects
def _like(reference: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    t = torch.as_tensor(reference)
    return t.device, t.dtype if torch.is_floating_point(t) else torch.float32


class MeanTrainingCT:
    """The mean training CT as a per-case prediction (the X-ray -> CT baseline).

    ``datalist`` (items with a ``key`` path, the *training* split) or ``paths``; the mean (HU) is computed on
    first use, converted to the network's intensities (``window``, ``symmetric``) and resized to each
    label's spatial shape (``mode``: ``area`` when shrinking, as the cascade's targets are; ``trilinear``
    when growing), so every cascade stage is scored against the mean at its own size.
    """

    name = MEAN_TRAINING_CT
    description = DESCRIPTIONS[MEAN_TRAINING_CT]

    def __init__(
        self,
        datalist: Sequence[Mapping] | None = None,
        key: str = "ct",
        paths: Sequence[str] | None = None,
        window: str = "xray2ct",
        symmetric: bool = False,
    ):
        if paths is None:
            paths = [item[key] for item in (datalist or [])]
        self.paths = [os.fspath(p) for p in paths]
        self.window, self.symmetric = window, symmetric
        self._mean: np.ndarray | None = None

    @property
    def volume_hu(self) -> np.ndarray:
        """The mean training CT (X, Y, Z), HU."""
        if self._mean is None:
            if not self.paths:
                raise InputError(None, "no training CTs to average for the mean-CT baseline (empty training split)")
            self._mean = mean_training_ct(self.paths)
        return self._mean

    def __call__(self, label: torch.Tensor, output=None, item=None) -> torch.Tensor:
        return self._prediction(torch.from_numpy(self.volume_hu), label)

    def _prediction(self, hu: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """(X, Y, Z) HU -> a prediction like ``label`` in the network's intensities, resized to its shape."""

        window = get_window(self.window)
        network = window.to_symmetric(hu) if self.symmetric else window.to_unit(hu)
        size = tuple(int(s) for s in torch.as_tensor(label).shape[-3:])
        volume = network[None, None].float()
        if tuple(volume.shape[2:]) != size:
            shrink = all(s <= v for s, v in zip(size, volume.shape[2:]))
            mode = "area" if shrink else "trilinear"
            kwargs = {} if mode == "area" else {"align_corners": False}
            volume = F.interpolate(volume, size=size, mode=mode, **kwargs)
        device, dtype = _like(label)
        return volume[0].expand(torch.as_tensor(label).shape[0], *size).to(device, dtype)


class BoxDownUp:
    """:func:`box_down_up` of the label (the autoencoder's target is its input) at the latent ``factor``."""

    name = BOX_DOWN_UP
    description = DESCRIPTIONS[BOX_DOWN_UP]

    def __init__(self, factor: int):
        self.factor = int(factor)

    def __call__(self, label: torch.Tensor, output=None, item=None) -> torch.Tensor:
        t = torch.as_tensor(label).as_subclass(torch.Tensor)
        return box_down_up(t.reshape(1, -1, *t.shape[-3:]).float(), self.factor).reshape(t.shape).to(t.dtype)


class CopyInput:
    """The network input (``output[key]``, e.g. the average CT) as the prediction (the pix2pix baseline)."""

    name = COPY_INPUT
    description = DESCRIPTIONS[COPY_INPUT]

    def __init__(self, key: str = "image"):
        self.key = key

    def __call__(self, label: torch.Tensor, output: Mapping, item=None) -> torch.Tensor:
        image = torch.as_tensor(output[self.key]).as_subclass(torch.Tensor)
        if tuple(image.shape) != tuple(torch.as_tensor(label).shape):
            raise InputError(None, f"input {tuple(image.shape)} and target {tuple(label.shape)} differ in shape")
        return image


# ----------------------------------------------------------------------------------------------- X-ray extent
EXTENT_SCALED_MEAN_CT = "extent_scaled_mean_ct"
DESCRIPTIONS[EXTENT_SCALED_MEAN_CT] = (
    "the mean training CT scaled and shifted, per axis, so its body matches the body extent seen in the case's "
    "X-rays (PA: left-right width and superior-inferior height; lateral: anterior-posterior depth) relative to "
    "the training cases' X-rays; uses the X-rays crudely: a model must beat it too, or it has only learnt the outline"
)

# DRR intensity 1 - exp(-L / 4) (common.drr.drr_to_image) above 0.1 <=> line integral L > 0.42, about 2 cm of
# water (mu ~ 0.02 / mm) along the ray: inside the body's silhouette. Air outside the body gives 0.
BODY_XRAY_THRESHOLD = 0.1

# (view, image axis) -> volume axis (canonical RAS X=0, Y=1, Z=2) the image axis measures. Detector images
# are displayed as a radiologist reads them (common.drr): PA column 0 = patient right (+X), row 0 = superior
# (+Z); lateral column 0 = anterior (+Y). So world offset = -(pixel - centre) * isocentre pixel size.
_EXTENT_AXES = {("pa", 1): 0, ("pa", 0): 2, ("lateral", 1): 1}


def body_extent(image, threshold: float = BODY_XRAY_THRESHOLD) -> tuple[tuple[float, float] | None, ...]:
    """(H, W) X-ray in [0, 1] -> per image axis (rows, cols) ``(first, last)`` pixel of the body silhouette.

    ``None`` for an axis where nothing exceeds ``threshold`` or the silhouette touches the image border
    (the body is cut by the detector: its extent is not seen, so it is not measured).
    """
    mask = np.asarray(image, dtype=np.float32) > threshold
    out: list[tuple[float, float] | None] = []
    for axis in (0, 1):
        hit = np.nonzero(mask.any(axis=1 - axis))[0]
        if hit.size == 0 or hit[0] == 0 or hit[-1] == mask.shape[axis] - 1:
            out.append(None)
        else:
            out.append((float(hit[0]), float(hit[-1])))
    return tuple(out)


def extent_to_mm(first_last: tuple[float, float], n_pixels: int, pixel_mm: float) -> tuple[float, float]:
    """A silhouette's ``(first, last)`` pixels on an ``n_pixels`` axis -> ``(centre, width)`` in mm.

    Mapping: the detector pixel size divided by the magnification ``SID / SAD`` (``pixel_mm``, the pixel as
    seen at the isocentre), centre measured from the image centre, width = (last - first + 1) pixels. Its
    sign follows the image axis (see ``_EXTENT_AXES`` for the world direction). Cone-beam parallax (the
    near side is magnified more) is ignored: the baseline scales by ratios of widths in the same geometry,
    in which it cancels to first order.
    """
    first, last = first_last
    return ((first + last) / 2.0 - (n_pixels - 1) / 2.0) * pixel_mm, (last - first + 1.0) * pixel_mm


class ExtentScaledMeanCT(MeanTrainingCT):
    """:class:`MeanTrainingCT` scaled and shifted to the body extent seen in the case's X-rays.

    The case's X-rays are the network input ``output[image_key]`` ((V, H, W) in [0, 1], channels ``views``
    in order); the training cases' are read from their datalist items (``view_keys``: view -> item key) at
    the same size. Per volume axis with a silhouette measured in the case and in the training X-rays
    (:func:`body_extent`, mapped to mm at the isocentre with ``geometry``, :func:`extent_to_mm`):
    ``scale = case width / mean training width`` and the mean CT is resampled (trilinear, air outside) so
    that its point at the training centre moves to the case's centre and distances from it grow by
    ``scale``. Axes that are not seen (no lateral view, a body cut by the detector) keep scale 1, shift 0.
    The factors of the last case are in ``last_transform``.
    """

    name = EXTENT_SCALED_MEAN_CT
    description = DESCRIPTIONS[EXTENT_SCALED_MEAN_CT]

    def __init__(
        self,
        geometry,
        datalist: Sequence[Mapping] | None = None,
        key: str = "ct",
        views: Sequence[str] = ("pa", "lateral"),
        view_keys: Mapping[str, str] | None = None,
        window: str = "xray2ct",
        symmetric: bool = False,
        image_key: str = "image",
        threshold: float = BODY_XRAY_THRESHOLD,
    ):
        super().__init__(datalist, key=key, window=window, symmetric=symmetric)
        self.geometry = get_geometry(geometry)
        self.views = tuple(views)
        unknown = set(self.views) - {"pa", "lateral"}
        if unknown:
            raise ValueError(f"views must be 'pa' and/or 'lateral', got {sorted(unknown)}")
        self.view_keys = dict(view_keys or {v: v for v in self.views})
        self.items = list(datalist or [])
        self.image_key, self.threshold = image_key, float(threshold)
        self._train: dict = {}
        self._spacing: tuple[float, ...] | None = None
        self.last_transform: dict | None = None

    def _extents_mm(self, image: np.ndarray, view: str) -> dict[int, tuple[float, float]]:
        """{volume axis: (centre, width)} mm at the isocentre of one view's (H, W) image."""
        found = {}
        magnification = self.geometry.magnification
        for image_axis, span in enumerate(body_extent(image, self.threshold)):
            axis = _EXTENT_AXES.get((view, image_axis))
            if axis is None or span is None:
                continue
            pixel_mm = self.geometry.detector_size_mm[image_axis] / image.shape[image_axis] / magnification
            centre, width = extent_to_mm(span, image.shape[image_axis], pixel_mm)
            found[axis] = (-centre, width)  # image axes run against the world axes (see _EXTENT_AXES)
        return found

    def training_extents(self, size: tuple[int, int]) -> dict[int, tuple[float, float]]:
        """{volume axis: (mean centre, mean width)} mm over the training X-rays seen at ``size``."""
        if size not in self._train:
            per_axis: dict[int, list[tuple[float, float]]] = {}
            for item in self.items:
                for view in self.views:
                    path = item.get(self.view_keys.get(view, view))
                    if not isinstance(path, (str, os.PathLike)):
                        continue
                    image = load_view(path, int(size[0]))
                    for axis, value in self._extents_mm(image, view).items():
                        per_axis.setdefault(axis, []).append(value)
            self._train[size] = {a: tuple(np.mean(np.asarray(v), axis=0).tolist()) for a, v in per_axis.items()}
        return self._train[size]

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size (mm) of the training CTs (the first one's header)."""
        if self._spacing is None:
            if not self.paths:
                raise InputError(None, "no training CTs for the extent-scaled baseline (empty training split)")
            self._spacing = load_volume(self.paths[0]).to_canonical().spacing
        return self._spacing

    def transform_for(self, image) -> dict:
        """``{"scale": [sx, sy, sz], "shift_mm": [...]}`` of one case's (V, H, W) X-ray input."""
        image = torch.as_tensor(image).as_subclass(torch.Tensor).detach().float().cpu()
        image = image.reshape(-1, *image.shape[-2:]).numpy()
        if image.shape[0] != len(self.views):
            raise InputError(None, f"expected {len(self.views)} X-ray channel(s) {self.views}, got {image.shape[0]}")
        train = self.training_extents(tuple(int(s) for s in image.shape[-2:]))
        scale, shift = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
        for k, view in enumerate(self.views):
            for axis, (centre, width) in self._extents_mm(image[k], view).items():
                if axis in train and train[axis][1] > 0:
                    scale[axis] = width / train[axis][1]
                    shift[axis] = centre - train[axis][0]
        return {"scale": scale, "shift_mm": shift, "train_centre_width_mm": {str(a): v for a, v in train.items()}}

    def scaled_hu(self, transform: Mapping) -> torch.Tensor:
        """The mean training CT (X, Y, Z) HU resampled by ``transform`` (air, -1024 HU, outside)."""

        hu = torch.from_numpy(self.volume_hu)
        fov = [n * s for n, s in zip(hu.shape, self.spacing)]
        train = transform.get("train_centre_width_mm", {})
        theta = torch.zeros(1, 3, 4, dtype=torch.float32)
        # grid_sample's (x, y, z) index (W, H, D) = volume axes (Z, Y, X); normalised u = 2 p / FOV.
        for row, axis in enumerate((2, 1, 0)):
            s = float(transform["scale"][axis])
            c_train = float(train.get(str(axis), (0.0, 0.0))[0])
            c_case = c_train + float(transform["shift_mm"][axis])
            theta[0, row, row] = 1.0 / s
            theta[0, row, 3] = 2.0 * (c_train - c_case / s) / fov[axis]
        air = float(XRAY2CT.lo)
        grid = F.affine_grid(theta, [1, 1, *hu.shape], align_corners=False)
        out = F.grid_sample((hu - air)[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out[0, 0] + air

    def __call__(self, label: torch.Tensor, output: Mapping | None = None, item=None) -> torch.Tensor:
        if output is None or output.get(self.image_key) is None:
            raise InputError(None, f"the extent-scaled baseline needs the X-rays (output key {self.image_key!r})")
        self.last_transform = self.transform_for(output[self.image_key])
        return self._prediction(self.scaled_hu(self.last_transform), label)
