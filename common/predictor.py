"""The one inference path of the X-ray -> CT bundles: a :class:`Predictor` protocol, its :class:`Prediction`, the
config's ``postprocessing`` applied, and the one writer of CTs + previews (:func:`write_prediction`).

Every X-ray-in bundle's ``scripts/inference.py`` API (``PerX2CTInference``, ``CascadePredictor``,
``LatentCTGenerator``) implements :class:`Predictor`: built from a checkpoint by
:func:`common.checkpoint.build_for_inference` (network + :class:`~common.checkpoint.InferenceSettings`, resolved
once), it takes the bundle's inputs (``{"pa": path or (H, W) array, "lateral": ...}``) and returns a
:class:`Prediction`. ``inference.json``, :mod:`xray2ct.models` (pipeline, web app), the perx2ct server and the
demo call it; nothing above it knows a bundle's own method names.

File names (:func:`output_path`, :func:`prediction_paths`), one scheme for every CT and preview the project
writes (inference, evaluation previews, batch synthesis, demos): ``[<case>_]<name>.<ext>`` in ``output_dir``:
``ct.<fmt>`` (the final CT, HU), ``<stage>.<fmt>`` (every volume when there are several, e.g. ``stage1``),
``preview[_<kind>].png`` (montage: every volume, the reference (ground truth, or a CT-in bundle's input) when
known, the model-domain X-rays) and ``axial[_<kind>].gif`` (axial slices of the final CT, beside the reference).
``kind`` tells two montages of one case in one folder apart (the cascade's evaluation writes ``preview_stages``
beside the report's ``preview``). ``case`` is omitted when each case has its own folder (the pipeline, the web
app's jobs).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from common.contract import renamed  # the one deprecation path (legacy_views warns through it)
from common.datalist import case_id, load_split, require_cases, safe_case_name
from common.errors import InputError
from common.io import load_volume, save_volume
from common.preview import save_montage_png, save_slice_gif
from common.volume import Volume
from common.xray import NIFTI_SUFFIXES, RASTER_SUFFIXES

Progress = Callable[[int, int], None]  # (steps done, steps in all)
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "h5": ".h5", "npy": ".npy"}
XRAY_SUFFIXES = (*RASTER_SUFFIXES, ".dcm", ".dicom", *NIFTI_SUFFIXES)
PREVIEW_NAME, GIF_NAME = "preview", "axial"
PREVIEW_FILE, GIF_FILE = f"{PREVIEW_NAME}.png", f"{GIF_NAME}.gif"
VIEW_LABELS = {"pa": "PA", "lateral": "lateral"}


@dataclasses.dataclass
class Prediction:
    """What a :class:`Predictor` returns for one case.

    ``volumes``: ``{name: HU Volume}`` in order, the final CT last (``{"ct": v}`` for one volume,
    ``{"stage1": ..., "stage3": ...}`` for the cascade); ``views``: the model-domain X-rays (V, S, S) float32
    [0, 1] as the network saw them, in ``view_names`` order (None: a CT-in bundle's output, written through the
    same :func:`write_prediction`); ``extras``: anything else the bundle reports.
    """

    volumes: dict[str, Volume]
    views: np.ndarray | None
    view_names: tuple[str, ...] = ("pa", "lateral")
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def ct(self) -> Volume:
        """The final CT (the last volume)."""
        return list(self.volumes.values())[-1]


@runtime_checkable
class Predictor(Protocol):
    """A trained X-ray -> CT network behind one API (see the module doc).

    ``settings``: :class:`common.checkpoint.InferenceSettings`; ``view_names``: the radiographs it reads
    (``("pa", "lateral")`` or ``("pa",)``). ``prepare(inputs)`` -> (V, S, S) model-domain views;
    ``infer_views(views, options, progress)`` -> :class:`Prediction` (``options``: run-time settings such as a
    diffusion's ``num_inference_steps``; the config's ``postprocessing`` applied); ``infer(inputs)`` is both.
    """

    settings: Any
    view_names: tuple[str, ...]

    def prepare(self, inputs: Mapping[str, Any]) -> np.ndarray: ...

    def infer_views(
        self, views: np.ndarray, options: Mapping | None = None, progress: Progress | None = None
    ) -> Prediction: ...

    def infer(
        self, inputs: Mapping[str, Any], options: Mapping | None = None, progress: Progress | None = None
    ) -> Prediction: ...


def views_tensor(views: np.ndarray | torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Model-domain views (V, S, S) -> a (1, n, S, S) float32 batch; :class:`InputError` when fewer than ``n``."""
    array = np.ascontiguousarray(torch.as_tensor(views).detach().cpu().numpy(), dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[0] < n:
        raise InputError(None, f"{name} needs {n} view(s) (V, H, W), got shape {array.shape}")
    return torch.from_numpy(array[:n])[None]


def require_views(inputs: Mapping[str, Any], names: Sequence[str], bundle: str) -> list:
    """The radiographs ``names`` of ``inputs`` (paths or arrays); :class:`InputError` naming what is missing."""
    missing = [n for n in names if inputs.get(n) is None or (isinstance(inputs.get(n), str) and not inputs[n])]
    if missing:
        wanted = " and ".join(f"a {VIEW_LABELS.get(n, n)}" for n in names)
        raise InputError(None, f"{bundle} needs {wanted} radiograph (missing: {', '.join(missing)})")
    return [inputs[n] for n in names]


def default_postprocessing() -> Callable:
    """What every X-ray-in bundle's ``inference.json`` declares as ``postprocessing``: the network output clamped
    to the unit window [0, 1] (the HU window's range), for predictors built without a config."""
    from monai.transforms import Compose, Lambdad

    return Compose([Lambdad(keys="pred", func=lambda x: x.clamp(0.0, 1.0))])


def postprocess(postprocessing: Callable | None, unit: torch.Tensor) -> torch.Tensor:
    """The config's ``postprocessing`` (a MONAI ``Compose`` of dict transforms on ``"pred"``) on one network
    output in the unit window, (1, X, Y, Z) or (B, 1, X, Y, Z) -> same shape, a plain CPU float32 tensor."""
    out = torch.as_tensor(unit).detach().float().cpu()
    if postprocessing is not None:
        batch = out if out.ndim == 5 else out[None]
        items = [postprocessing({"pred": item})["pred"] for item in batch]
        out = torch.stack([torch.as_tensor(i).as_subclass(torch.Tensor).float() for i in items])
        out = out if unit.ndim == 5 else out[0]
    return out.as_subclass(torch.Tensor)


def unit_to_volume(unit: torch.Tensor | np.ndarray, window, spacing: Sequence[float]) -> Volume:
    """A network output in the unit window (any leading singleton axes, then X, Y, Z) -> HU :class:`Volume`,
    canonical RAS, centred on the isocentre (origin at the volume centre), ``spacing`` in mm."""
    array = np.asarray(torch.as_tensor(unit).detach().float().cpu().numpy(), dtype=np.float32)
    array = array.reshape(array.shape[-3:])
    hu = window.from_unit(array)
    return Volume.from_spacing(np.asarray(hu, dtype=np.float32), tuple(float(s) for s in spacing))


def output_path(output_dir: str | os.PathLike, case: str | None, name: str, suffix: str) -> str:
    """``<output_dir>/[<case>_]<name><suffix>``: the one file-name rule (``case`` made a safe file name by
    :func:`common.datalist.safe_case_name`, so every output stays inside ``output_dir``)."""
    prefix = "" if not case else f"{safe_case_name(str(case))}_"
    return os.path.join(os.fspath(output_dir), f"{prefix}{name}{suffix}")


def preview_paths(output_dir: str | os.PathLike, case: str | None, kind: str | None = None) -> dict[str, str]:
    """``{"preview": [<case>_]preview[_<kind>].png, "gif": [<case>_]axial[_<kind>].gif}``."""
    tag = f"_{kind}" if kind else ""
    return {
        "preview": output_path(output_dir, case, PREVIEW_NAME + tag, ".png"),
        "gif": output_path(output_dir, case, GIF_NAME + tag, ".gif"),
    }


def prediction_paths(output_dir: str | os.PathLike, case: str | None, names: Sequence[str],
                     fmt: str = "nii.gz") -> dict[str, str]:  # fmt: skip
    """The file of every output of a case (see the module doc): ``{"ct", <stage>..., "preview", "gif"}``."""
    suffix = FORMATS.get(fmt.lstrip("."))
    if suffix is None:
        raise InputError(None, f"unknown output format {fmt!r}; choose from {sorted(FORMATS)}")
    paths = {"ct": output_path(output_dir, case, "ct", suffix)}
    if len(names) > 1:
        paths.update({n: output_path(output_dir, case, n, suffix) for n in names})
    return {**paths, **preview_paths(output_dir, case)}


def write_volumes(volumes: Mapping[str, Volume], output_dir: str | os.PathLike, case: str | None = None,
                  fmt: str = "nii.gz") -> dict[str, str]:  # fmt: skip
    """Write the final CT and, when there are several volumes, each one (atomically); ``{name: path}``."""

    names = list(volumes)
    if not names:
        raise InputError(None, "nothing to write: the prediction has no volume")
    paths = prediction_paths(output_dir, case, names, fmt)
    os.makedirs(os.fspath(output_dir), exist_ok=True)
    written = {"ct": save_volume(volumes[names[-1]], paths["ct"])}
    if len(names) > 1:
        written.update({n: save_volume(volumes[n], paths[n]) for n in names})
    return written


def write_previews(volumes: Mapping[str, Volume], views: np.ndarray | None, view_names: Sequence[str],
                   output_dir: str | os.PathLike, case: str | None = None, reference: Volume | None = None,
                   kind: str | None = None, gif: bool = True, window: str = "lung",
                   reference_name: str = "ground truth") -> dict[str, str]:  # fmt: skip
    """The montage PNG (``reference`` first when given, labelled ``reference_name``, then every volume, then the
    X-rays ``views`` (V, S, S) [0, 1]) and (``gif``) the axial GIF of the final CT beside ``reference``, in the
    HU display ``window``; ``{"preview": path[, "gif": path]}`` (:func:`preview_paths`)."""

    paths = preview_paths(output_dir, case, kind)
    os.makedirs(os.fspath(output_dir), exist_ok=True)
    shown = dict(volumes) if reference is None else {reference_name: reference, **volumes}
    xrays = None
    if views is not None:
        xrays = {VIEW_LABELS.get(n, n): np.asarray(views[i]) for i, n in enumerate(view_names)}
    written = {"preview": save_montage_png(paths["preview"], shown, xrays=xrays, window=window)}
    if gif:
        final = list(volumes.values())[-1]
        written["gif"] = save_slice_gif(paths["gif"], final, compare=reference, window=window)
    return written


def write_prediction(prediction: Prediction, output_dir: str | os.PathLike, case: str | None = None,
                     fmt: str = "nii.gz", previews: bool = True, reference: Volume | None = None,
                     **preview_options) -> dict[str, str]:  # fmt: skip
    """The one writer of a predicted case: :func:`write_volumes` then (``previews``) :func:`write_previews`
    (``preview_options``: its ``kind``, ``gif``, ``window``, ``reference_name``)."""
    written = write_volumes(prediction.volumes, output_dir, case, fmt)
    if previews:
        written.update(write_previews(prediction.volumes, prediction.views, prediction.view_names, output_dir, case,
                                      reference, **preview_options))  # fmt: skip
    return written


def legacy_views(input_path: Any, pa_file: str | None = None, lateral_file: str | None = None,
                 case: str | None = None) -> Any:  # fmt: skip
    """``input_path``, or ``{"pa", "lateral", "id"}`` from the cascade's old ids ``pa_file`` / ``lateral_file`` /
    ``case_id`` (deprecated: a warning names ``input_path``)."""
    if pa_file is None and lateral_file is None:
        return input_path
    old = {"pa": pa_file, "lateral": lateral_file, "id": case or "case"}
    return renamed(old, "pa_file/lateral_file/case_id", "input_path", input_path)


def inference_items(input_path: str | os.PathLike | Mapping | None, datalist_file: str | os.PathLike,
                    split: str, view_names: Sequence[str],
                    base_dir: str | os.PathLike | None = None) -> list[dict]:  # fmt: skip
    """The cases ``inference.json`` predicts (its ``input_path``, the contract id of every bundle):

    - a dict ``{"pa": ..., "lateral": ..., "id": ...}``: one case;
    - a case folder holding one file per view (``pa.*``, ``lateral.*``, as datasets are written): one case;
    - an X-ray file, or a folder of X-ray files (one-view bundles): one case per file;
    - empty: the datalist's ``split`` (the cases of ``dataset.json``; paths relative to ``base_dir``, default
      the datalist's folder). :class:`InputError` when nothing is found.
    """

    if isinstance(input_path, Mapping):
        item = {k: v for k, v in input_path.items() if v is not None}
        require_views(item, view_names, "inference")
        return [item]
    if not input_path:
        return list(require_cases(load_split(datalist_file, split, base_dir), datalist_file, split, "inference"))
    path = os.fspath(input_path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n[0] != "." and n.lower().endswith(XRAY_SUFFIXES))
        by_view = {n.split(".")[0].lower(): os.path.join(path, n) for n in names}
        if all(v in by_view for v in view_names):
            return [{"id": os.path.basename(os.path.normpath(path)), **{v: by_view[v] for v in view_names}}]
        if len(view_names) == 1 and names:
            return [{view_names[0]: os.path.join(path, n)} for n in names]
        wanted = ", ".join(f"{v}.*" for v in view_names)
        raise InputError(path, f"no X-ray to infer from: a case folder holds {wanted}")
    if os.path.isfile(path):
        if len(view_names) == 1:
            return [{view_names[0]: path}]
        raise InputError(path, "one file is one view: give a case folder with pa.* and lateral.*, or "
                         "--input_path '{\"pa\": ..., \"lateral\": ...}'")  # fmt: skip
    raise InputError(path, "input X-ray file or folder not found")


def predict_items(predictor: Predictor, items: Sequence[Mapping], output_dir: str | os.PathLike,
                  fmt: str = "nii.gz", previews: bool = True, desc: str = "inference") -> list[str]:  # fmt: skip
    """Predict and write every datalist item (``{"id", "pa", "lateral", "ct" (optional ground truth)}``);
    returns the final CTs' paths. The one loop of every bundle's ``inference.json``."""
    from tqdm import tqdm


    items = list(items)
    if not items:
        raise InputError(None, "inference found no input (give --input_path or a datalist with cases)")
    written = []
    for i, item in enumerate(tqdm(items, desc=desc, unit="case")):
        prediction = predictor.infer(item)
        reference = load_volume(item["ct"]) if previews and item.get("ct") else None
        files = write_prediction(prediction, output_dir, case_id(item, i), fmt, previews, reference)
        written.append(files["ct"])
    return written
