"""Every X-ray -> CT bundle behind one interface, built from its checkpoint's record (web app and pipeline).

:func:`load_model` reads a checkpoint's record to find its bundle and calls that bundle's Python inference
API (``bundles/<name>/scripts/inference.py``: ``PerX2CTInference``, ``CascadePredictor``,
``LatentCTGenerator``); :func:`load_pe_model` does the same for ``pe_classifier``. Nothing else of a bundle
is imported and no bundle imports this module. An :class:`XrayToCTModel` preprocesses uploads or files to
the model domain (``preprocess``), reconstructs every stage (``run``: cascade stages, or one ``ct``), and
says how to score the result against its inputs (:func:`score_against_inputs`, the DRR consistency of
:mod:`common.drr_loss`) beside the mean training CT (:func:`common.baselines.mean_ct_baseline`, stored in the
checkpoint). Every bundle is driven through :class:`common.predictor.Predictor`; the checkpoint is read once.

Config overlays (``configs=["cpu_tiny"]``) are optional: without them the record alone builds the network;
with them a config that contradicts the record is refused (:func:`common.checkpoint.build_for_inference`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from common.baselines import mean_ct_baseline
from common.checkpoint import file_sha256, read_checkpoint, read_record, record_of
from common.drr import DRRGeometry
from common.drr_loss import add_view_means, drr_consistency_with_drrs
from common.errors import InputError, require_file
from common.volume import Volume

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XRAY_TO_CT = ("perx2ct", "progressive_cascade", "latent_ddpm")
Progress = Callable[[float, str], None]  # (fraction of the reconstruction done in [0, 1], what is running)


@dataclasses.dataclass
class XrayToCTModel:
    """A reconstruction model ready to serve: what a page or a report needs to know, and how to run it.

    ``preprocess(pa, lateral)`` -> (V, S, S) float32 views in [0, 1] (V = 1 or 2, [PA, lateral]);
    ``reconstruct(views)`` -> the final HU :class:`Volume` (canonical RAS, centred on the isocentre);
    ``reconstruct_stages(views, options, progress)`` (optional) -> ``{stage name: Volume}`` in order, the
    last the final CT. ``options`` describes the run-time controls (``{name: {"type", "default", "min",
    "max", "label"}}``, e.g. the diffusion's sampling steps). ``geometry``: the DRR camera of the X-rays the
    model was trained on (None: no DRR-consistency score).
    """

    name: str
    bundle: str
    needs_lateral: bool
    image_size: int
    volume_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    geometry: DRRGeometry | None
    preprocess: Callable[[str, str | None], np.ndarray]
    reconstruct: Callable[[np.ndarray], Volume]
    reconstruct_stages: Callable[[np.ndarray, dict, Progress | None], dict[str, Volume]] | None = None
    options: dict[str, dict] = dataclasses.field(default_factory=dict)
    stages: tuple[dict, ...] = ()  # [{"name", "shape", "spacing"}] when the model has several stages
    checkpoint: str | None = None
    record: dict | None = None
    baseline: dict | None = None  # mean training CT: {"volume": Volume, "source"} or {"unavailable": reason}
    _sha256: str | None = dataclasses.field(default=None, repr=False)

    @property
    def views(self) -> tuple[str, ...]:
        return ("pa", "lateral") if self.needs_lateral else ("pa",)

    @property
    def contrast_phase(self) -> str:
        """The contrast phase of the CTs the model was trained on (its record; ``"unknown"`` without one)."""
        from common.ct_domain import UNKNOWN

        return str(((self.record or {}).get("inputs") or {}).get("contrast_phase") or UNKNOWN)

    def check_options(self, options: Mapping | None) -> dict:
        """``options`` validated against :attr:`options` (defaults filled in); :class:`InputError` otherwise."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            have = ", ".join(sorted(self.options)) or "none"
            raise InputError(None, f"model {self.name} has no option {', '.join(unknown)} (options: {have})")
        out = {}
        for key, spec in self.options.items():
            value = options.get(key, spec["default"])
            try:
                value = int(value) if spec["type"] == "int" else float(value)
            except (TypeError, ValueError):
                raise InputError(None, f"{key} must be a number, got {value!r}") from None
            if spec["type"] == "int" and float(options.get(key, value)) != value:
                raise InputError(None, f"{key} must be a whole number, got {options[key]!r}")
            if not (spec["min"] <= value <= spec["max"]) or not np.isfinite(value):
                raise InputError(None, f"{key} must be in [{spec['min']}, {spec['max']}], got {value}")
            out[key] = value
        return out

    def run(self, views: np.ndarray, options: Mapping | None = None, progress: Progress | None = None) -> dict:
        """Every stage's HU volume for model-domain ``views`` (V, S, S): ``{name: Volume}``, final last."""
        options = self.check_options(options)
        if self.reconstruct_stages is not None:
            return self.reconstruct_stages(views, options, progress)
        return {"ct": self.reconstruct(views)}

    def sha256(self) -> str | None:
        if self._sha256 is None and self.checkpoint:
            self._sha256 = file_sha256(self.checkpoint)
        return self._sha256

    def fingerprint(self) -> dict:
        """What identifies the model in a report: bundle, checkpoint (path, sha256), version, training progress."""
        record = self.record or {}
        return {
            "name": self.name,
            "bundle": self.bundle,
            "checkpoint": None if self.checkpoint is None else os.path.abspath(self.checkpoint),
            "sha256": self.sha256(),
            "version": record.get("version"),
            "progress": record.get("progress"),
            "has_record": self.record is not None,
        }

    def describe(self) -> dict:
        stages = list(self.stages) or [
            {"name": "ct", "shape": list(self.volume_shape), "spacing": list(self.spacing)}
        ]
        baseline = self.baseline or {}
        return {
            "name": self.name,
            "bundle": self.bundle,
            "needs_lateral": self.needs_lateral,
            "views": list(self.views),
            "image_size": self.image_size,
            "volume_shape": list(self.volume_shape),
            "spacing": list(self.spacing),
            "stages": stages,
            "options": self.options,
            "geometry": None if self.geometry is None else self.geometry.name,
            "baseline": None if "volume" not in baseline else baseline.get("source"),
        }


# ----------------------------------------------------------------------------------------------- configs
def config_paths(bundle: str, configs: Sequence[str] = ()) -> list[str]:
    """``inference.json`` then overlays given by path or by name (``cpu_tiny`` -> ``configs/cpu_tiny.json``)."""
    folder = os.path.join(REPO_ROOT, "bundles", bundle, "configs")
    paths = [os.path.join(folder, "inference.json")]
    for config in configs:
        paths.append(config if os.path.exists(config) else os.path.join(folder, f"{config}.json"))
    return [require_file(p) for p in paths]


def _configs(bundle: str, configs: Sequence[str]) -> list[str] | None:
    """The config files a user named (None: the checkpoint's record alone builds the network)."""
    return config_paths(bundle, configs) if configs else None


def bundle_of(checkpoint: str, default: str | None = None) -> str:
    """The bundle a checkpoint's record names (``default`` for checkpoints without a record, with a warning)."""
    return _bundle_of_record(read_record(checkpoint), checkpoint, default)


def _bundle_of_record(record: Mapping | None, checkpoint: str, default: str | None = None) -> str:
    if record is not None:
        return str(record.get("bundle"))
    if default is None:
        raise InputError(checkpoint, "checkpoint has no record: say which bundle it belongs to (--bundle)")
    logger.warning("%s: checkpoint has no record; loading it as a %s checkpoint", checkpoint, default)
    return default


# ----------------------------------------------------------------------------------------------- loaders
def _from_predictor(predictor, bundle: str, checkpoint: str, record: dict | None, volume_shape: Sequence[int],
                    stages: tuple[dict, ...] = (), options: dict | None = None,
                    option_names: Mapping[str, str] | None = None) -> XrayToCTModel:  # fmt: skip
    """An :class:`XrayToCTModel` driving a :class:`common.predictor.Predictor` (its settings resolved once by
    :func:`common.checkpoint.build_for_inference`). ``option_names``: page option -> the predictor's option."""
    settings = predictor.settings
    names = dict(option_names or {})

    def preprocess(pa: str, lateral: str | None) -> np.ndarray:
        return predictor.prepare({"pa": pa, "lateral": lateral})

    def stages_of(views: np.ndarray, chosen: dict, progress: Progress | None) -> dict[str, Volume]:
        def step(done: int, total: int) -> None:
            if progress is not None and total > 1:
                progress(0.9 * done / total, f"diffusion step {done}/{total}")

        run_options = {names.get(k, k): v for k, v in chosen.items()}
        return predictor.infer_views(views, run_options, step).volumes

    def reconstruct(views: np.ndarray) -> Volume:
        chosen = {k: v["default"] for k, v in (options or {}).items()}
        return list(stages_of(views, chosen, None).values())[-1]

    spacing = tuple(stages[-1]["spacing"]) if stages else tuple(settings.spacing)
    return XrayToCTModel(
        name=bundle,
        bundle=bundle,
        needs_lateral=len(predictor.view_names) > 1,
        image_size=int(settings.image_size),
        volume_shape=tuple(int(n) for n in volume_shape),  # type: ignore[arg-type]
        spacing=spacing,  # type: ignore[arg-type]
        geometry=settings.geometry,
        preprocess=preprocess,
        reconstruct=reconstruct,
        reconstruct_stages=stages_of,
        options=dict(options or {}),
        stages=stages,
        checkpoint=checkpoint,
        record=record,
    )


def load_perx2ct(checkpoint: str, configs: Sequence[str] = (), device: str = "cpu", contents: Mapping | None = None,
                 **_) -> XrayToCTModel:  # fmt: skip
    from bundles.perx2ct.scripts.inference import BUNDLE_ROOT, PerX2CTInference

    predictor = PerX2CTInference.from_bundle(
        BUNDLE_ROOT, checkpoint, _configs("perx2ct", configs), device=device, contents=contents
    )
    record = None if contents is None else record_of(contents)
    return _from_predictor(predictor, "perx2ct", checkpoint, record, predictor.volume_shape)


def load_progressive_cascade(
    checkpoint: str, configs: Sequence[str] = (), device: str = "cpu", contents: Mapping | None = None, **_
) -> XrayToCTModel:
    from bundles.progressive_cascade.scripts.inference import CascadePredictor

    cascade = CascadePredictor.from_checkpoint(
        checkpoint, _configs("progressive_cascade", configs), device, contents=contents
    )
    shapes = tuple(
        {"name": f"stage{k}", "shape": [n] * 3, "spacing": list(cascade.spacing(n))}
        for k, n in enumerate(cascade.volume_sizes, start=1)
    )
    record = None if contents is None else record_of(contents)
    return _from_predictor(cascade, "progressive_cascade", checkpoint, record, shapes[-1]["shape"], shapes)


def load_latent_ddpm(
    checkpoint: str,
    configs: Sequence[str] = (),
    device: str = "cpu",
    vqgan_checkpoint: str | None = None,
    max_sampling_steps: int = 1000,
    contents: Mapping | None = None,
    **_,
) -> XrayToCTModel:
    from bundles.latent_ddpm.scripts.inference import LatentCTGenerator

    generator = LatentCTGenerator.from_checkpoint(
        checkpoint, vqgan_checkpoint, _configs("latent_ddpm", configs), device, contents=contents
    )
    sampler = generator.inferer
    train_steps = int(sampler.scheduler.num_train_timesteps)
    most = max(1, min(train_steps, int(max_sampling_steps)))
    options = {
        "sampling_steps": {
            "label": "Sampling steps", "type": "int", "min": 1, "max": most, "step": 1,
            "default": min(most, int(sampler.num_inference_steps)),
            "help": f"DDIM steps (the model was trained with {train_steps} diffusion steps)",
        },
        "guidance_scale": {
            "label": "Guidance scale", "type": "float", "min": 0.0, "max": 20.0, "step": 0.1,
            "default": float(sampler.guidance_scale),
            "help": "1 = the conditional model; other values: classifier-free guidance",
        },
        "seed": {
            "label": "Seed", "type": "int", "min": 0, "max": 2**31 - 1, "step": 1, "default": int(sampler.seed),
            "help": "the initial noise (same seed, same CT)",
        },
    }  # fmt: skip
    shape = tuple(int(s) for s in generator.latent_space["image_size"])
    record = None if contents is None else record_of(contents)
    return _from_predictor(generator, "latent_ddpm", checkpoint, record, shape, options=options,
                           option_names={"sampling_steps": "num_inference_steps"})  # fmt: skip


LOADERS: dict[str, Callable[..., XrayToCTModel]] = {
    "perx2ct": load_perx2ct,
    "progressive_cascade": load_progressive_cascade,
    "latent_ddpm": load_latent_ddpm,
}


def load_model(
    checkpoint: str,
    bundle: str | None = None,
    configs: Sequence[str] = (),
    device: str = "cpu",
    vqgan_checkpoint: str | None = None,
    max_sampling_steps: int = 1000,
    baseline: bool = True,
) -> XrayToCTModel:
    """The X-ray -> CT model of ``checkpoint``; its bundle comes from the record (``bundle`` must agree).

    ``configs``: overlays of the bundle's ``inference.json`` (checked against the record); ``vqgan_checkpoint``
    for latent_ddpm (default: the file its record names); ``max_sampling_steps`` caps the diffusion's
    steps option; ``baseline``: the mean training CT (stored in the checkpoint; older checkpoints: averaged
    from the training CTs the record names). The checkpoint file is read once (``torch.load``).
    """
    checkpoint = require_file(os.fspath(checkpoint))
    contents = read_checkpoint(checkpoint)
    found = _bundle_of_record(record_of(contents, checkpoint), checkpoint, default=bundle or "perx2ct")
    if bundle is not None and found != bundle:
        raise InputError(checkpoint, f"is a {found!r} checkpoint, not {bundle!r}")
    if found not in LOADERS:
        raise InputError(checkpoint, f"is a {found!r} checkpoint: no X-ray -> CT loader (have {sorted(LOADERS)})")
    model = LOADERS[found](
        checkpoint, configs, device, vqgan_checkpoint=vqgan_checkpoint, max_sampling_steps=max_sampling_steps,
        contents=contents,
    )  # fmt: skip
    if baseline:
        model.baseline = mean_ct_baseline(model.record, contents, checkpoint)
    return model


# ----------------------------------------------------------------------------------------------- scores
DRR_SCORE_CONVENTION = (
    "DRR consistency: DRRs of the generated CT (HU -> attenuation, common.drr cone beam with the DRR geometry "
    "of the model's training X-rays, at the input's pixel count) against the X-rays as the model saw them "
    "(preprocessed, [0, 1]); drr_l1_<view> = mean |DRR - X-ray|, drr_psnr_<view> = PSNR in dB with data "
    "range 1; drr_l1 / drr_psnr = mean over the views. It measures agreement with the inputs only (no "
    "ground-truth CT); 'baseline' scores the mean training CT, which ignores the X-rays, the same way."
)


def score_against_inputs(
    model: XrayToCTModel, volume: Volume, views: np.ndarray
) -> tuple[dict[str, float] | None, dict[str, np.ndarray]]:
    """(DRR-consistency scores, DRRs (view -> (S, S) [0, 1])) of ``volume`` against the model-domain ``views``.

    ``(None, {})`` when the model records no DRR geometry.
    """
    if model.geometry is None:
        return None, {}
    volume = volume.to_canonical()
    hu = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None, None]
    xrays = {view: torch.from_numpy(np.ascontiguousarray(views[i], np.float32))[None, None]
             for i, view in enumerate(model.views)}  # fmt: skip
    scores, drrs = drr_consistency_with_drrs(hu, xrays, volume.spacing, model.geometry)
    return add_view_means(scores, model.views), {view: drr[0, 0].numpy() for view, drr in drrs.items()}


def baseline_scores(model: XrayToCTModel, views: np.ndarray) -> dict | None:
    """The mean training CT scored like the model's output (None when the model has no baseline volume)."""
    if model.geometry is None or not model.baseline or "volume" not in model.baseline:
        return None
    scores, _ = score_against_inputs(model, model.baseline["volume"], views)
    return scores


# ----------------------------------------------------------------------------------------------- PE
@dataclasses.dataclass
class PEModel:
    """A PE classifier: :meth:`assess` gives the probability for a generated CT file and/or the PA view."""

    name: str
    checkpoint: str
    api: object  # bundles.pe_classifier.scripts.inference.PEClassifierInference

    def plan(self, shape: Sequence[int], spacing: Sequence[float], phase: str) -> dict | None:
        """How a generated CT of this grid and contrast phase may reach the classifier
        (:func:`common.ct_domain.pe_input_plan`); None for an X-ray classifier (it reads the input PA)."""
        if "ct" not in self.api.needs:
            return None
        from common.ct_domain import pe_input_plan

        return pe_input_plan((self.api.record or {}).get("inputs"), shape, spacing, phase)

    def check(self, model: XrayToCTModel) -> dict | None:
        """The plan for ``model``'s final CT; :class:`InputError` naming the classifier when it is refused."""
        from common.ct_domain import describe_plan

        plan = self.plan(model.volume_shape, model.spacing, model.contrast_phase)
        if plan is not None and plan["action"] == "refused":
            raise InputError(self.checkpoint, f"{describe_plan(plan)} (generator {model.name})")
        return plan

    def assess_volume(self, volume: Volume, phase: str, ct_file: str | None, pa_view: np.ndarray | None,
                      work_dir: str | None = None) -> dict:  # fmt: skip
        """:meth:`assess` of a generated CT after the grid check: ``{"refused", "input_grid"}`` when the
        classifier does not fit the CT (no probability), else its result with ``input_grid`` (what was done).
        A crop is written to ``<work_dir>/pe_input.nii.gz`` (the file the classifier read)."""
        from common.ct_domain import crop_centre, describe_plan
        from common.io import save_volume

        volume = volume.to_canonical()
        plan = self.plan(volume.shape, volume.spacing, phase)
        if plan is None:
            return {**self.assess(None, pa_view), "input_grid": None}
        plan = {**plan, "summary": describe_plan(plan)}
        if plan["action"] == "refused":
            return {"refused": plan["summary"], "probability": None, "input_grid": plan,
                    "classifier": self._identity()}  # fmt: skip
        if plan["action"] == "crop_and_resample":
            crop = crop_centre(volume, plan["crop_voxels"])
            if work_dir is None:
                raise InputError(None, "cropping a CT for the PE classifier needs a folder to write it in")
            ct_file = save_volume(crop, os.path.join(work_dir, "pe_input.nii.gz"))
            plan["file"] = os.path.basename(ct_file)
        return {**self.assess(ct_file, pa_view), "input_grid": plan}

    def _identity(self) -> dict:
        return {"name": self.name, "checkpoint": os.path.abspath(self.checkpoint),
                "sha256": file_sha256(self.checkpoint)}  # fmt: skip

    def assess(self, ct_file: str | None, pa_view: np.ndarray | None) -> dict:
        """``{"probability", "threshold", "positive", "training_prevalence", "modality", "input", "classifier"}``.

        No grid check: callers with a generated CT use :meth:`assess_volume`."""
        api = self.api
        probability = api.probability(ct=ct_file, xray=pa_view)
        threshold = api.threshold
        inputs = {"ct": "the generated CT", "xray": "the input PA X-ray", "fusion": "the generated CT and the PA"}
        return {
            "probability": probability,
            "threshold": threshold,
            "positive": None if threshold is None else bool(probability >= threshold),
            "training_prevalence": api.training_prevalence,
            "modality": api.modality,
            "input": inputs[api.modality],
            "classifier": self._identity(),
        }

    def describe(self) -> dict:
        inputs = (self.api.record or {}).get("inputs") or {}
        return {
            "name": self.name,
            "modality": self.api.modality,
            "contrast_phase": inputs.get("contrast_phase"),
            "ct_grid": inputs.get("ct_grid"),
            "threshold": self.api.threshold,
            "training_prevalence": self.api.training_prevalence,
        }


def load_pe_model(
    checkpoint: str, configs: Sequence[str] = (), device: str = "cpu", threshold_report: str | None = None
) -> PEModel:
    """The pe_classifier of ``checkpoint`` (record-built; ``threshold_report``: its ``metrics_report.json``)."""
    from bundles.pe_classifier.scripts.inference import PEClassifierInference

    checkpoint = require_file(os.fspath(checkpoint))
    api = PEClassifierInference.from_checkpoint(
        checkpoint, _configs("pe_classifier", configs), device, threshold_report=threshold_report
    )
    stem = os.path.basename(checkpoint).split(".")[0]
    return PEModel(name=f"pe_classifier:{stem}", checkpoint=checkpoint, api=api)


PE_CONVENTION = (
    "PE probability: sigmoid of the pe_classifier's logit for the generated CT (its config's HU window and "
    "resize) or the PA X-ray, per the classifier's modality; training_prevalence is the trivial baseline's "
    "probability; threshold (Youden's J on the classifier's validation split) only with its metrics report. "
    "A research figure, not a diagnosis: the classifier's accuracy on generated CTs is measured in its own report. "
    "input_grid: how the generated CT reached the classifier (as_is, resample down, centred crop_and_resample); "
    "a classifier trained on another contrast phase, a larger field of view or a finer grid than the generated "
    "CT's is refused (no probability)."
)
