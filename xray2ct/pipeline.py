"""X-ray(s) in, CT out, in one command: reconstruction, previews, DRR consistency, PE probability, one report.

    xray2ct-pipeline --checkpoint perx2ct/models/model.pt --pa PA.png --lateral L.png --output_dir out/
    xray2ct-pipeline --checkpoint ldm/models/model.pt --pa frontal.dcm --output_dir out/ --sampling_steps 50
    xray2ct-pipeline --checkpoint cascade/models/stage3_model.pt --inputs xrays/ --output_dir out/ \\
        --pe_checkpoint pe/models/model.pt [--pe_threshold_report pe/eval/metrics_report.json]

Inputs: PNG, JPEG, DICOM (or our DRR NIfTI files); one frontal X-ray for latent_ddpm, a PA + lateral pair for
perx2ct and progressive_cascade (which bundle a checkpoint belongs to comes from its record). Batch mode
(``--inputs``) takes a folder or a CSV (:func:`find_cases`). Each case gets ``<output_dir>/<case>/``:

    ct.nii.gz | ct.h5        the final CT in HU, canonical RAS, spacing in the header (HDF5: dataset "ct" + attrs)
    stage<k>.<format>        every stage of a cascade
    preview.png              middle axial/coronal/sagittal slices of every stage beside the input X-rays
    axial.gif                the final CT's axial slices
    drr.png                  the X-rays as the model saw them beside DRRs of the CT (what the score compares)
    pe_input.nii.gz          the centred crop a PE classifier read, when it was trained on a smaller field of view
    report.json              written last: inputs, model, volumes, DRR consistency (+ mean-CT baseline), PE

A case with a ``report.json`` is finished (every file is written atomically, the report last), so a killed
batch resumes where it stopped; a case that fails is listed with its reason in ``pipeline_summary.json`` /
``errors.csv`` and the batch goes on. ``pipeline.json`` records the model, classifier and settings of an
output folder: a rerun with others is refused (``--overwrite True`` redoes every case). Case names that are
not plain file names are mapped to ``<sanitised>-<sha256[:12]>`` (:func:`common.datalist.safe_case_name`).
A PE classifier trained on another contrast phase, field of view or a finer grid than the generated CT's is
refused before any case runs (:func:`common.ct_domain.pe_input_plan`; the report's ``pe.input_grid`` says what
was done).
The layer that loads models (``xray2ct.models``) calls each bundle's ``scripts/inference.py`` API only.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from common.agreement import CONVENTION as AGREEMENT_CONVENTION
from common.agreement import MEASURE as AGREEMENT_MEASURE
from common.agreement import agreement_scores
from common.atomic import atomic_path, atomic_write_text, remove_partial_files
from common.checkpoint import file_sha256
from common.datalist import case_id_of_path, safe_case_name
from common.domain_gap import domain_gap
from common.errors import InputError, require_file
from common.handlers import write_json
from common.io import save_volume
from common.plausibility import plausibility
from common.preview import save_montage_png, save_slice_gif
from common.tables import csv_text
from common.volume import Volume
from xray2ct.models import (
    DRR_SCORE_CONVENTION,
    PE_CONVENTION,
    PEModel,
    XrayToCTModel,
    baseline_scores,
    load_model,
    load_pe_model,
    score_against_inputs,
)
from xray2ct.preparation import INTENSITIES, PREPARATIONS, prepare_inputs

logger = logging.getLogger(__name__)

REPORT_FORMAT = "xray2ct.pipeline_report/1"
REPORT = "report.json"
SETTINGS = "pipeline.json"
SUMMARY = "pipeline_summary.json"
FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "h5": ".h5"}
XRAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".nii.gz", ".nii")
# file-name tags of the views: <case>-PA.png, <case>_lateral.dcm, <case>/pa.nii.gz ...
VIEW_TAGS = {"pa": ("pa", "ap", "frontal", "front"), "lateral": ("l", "lat", "lateral")}
CSV_COLUMNS = {"case": ("case", "id", "uid"), "pa": ("pa", "frontal"), "lateral": ("lateral", "lat")}


# ----------------------------------------------------------------------------------------------- inputs
def _suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in XRAY_SUFFIXES if lower.endswith(s)), None)


def _split_view(stem: str) -> tuple[str, str | None]:
    """``"case-PA"`` -> ("case", "pa"); a stem without a view tag -> (stem, None)."""
    for view, tags in VIEW_TAGS.items():
        for tag in tags:
            for sep in ("-", "_", " ", "."):
                if stem.lower().endswith(sep + tag) and len(stem) > len(tag) + 1:
                    return stem[: -len(tag) - 1], view
            if stem.lower() == tag:
                return "", view
    return stem, None


def case_name(path: str) -> str:
    """The case an X-ray file belongs to: its name without suffix and view tag (``a/p1-PA.png`` -> ``p1``),
    then the one rule of :func:`common.datalist.case_id_of_path` (``<case>/pa.png`` -> ``case``)."""
    base = os.path.basename(os.fspath(path))
    suffix = _suffix(base) or os.path.splitext(base)[1]
    stem = base[: len(base) - len(suffix)] if suffix else base
    case, view = _split_view(stem)
    return case_id_of_path(os.path.join(os.path.dirname(os.path.abspath(path)), case or view or stem)) or "case"


def find_cases(inputs: str, needs_lateral: bool) -> list[dict]:
    """``[{"case", "pa", "lateral" (or None), "error" (when the case cannot run)}]`` from a folder or a CSV.

    * CSV: columns ``pa`` (or ``frontal``), ``lateral`` (optional for one-view models), ``case`` (or ``id``,
      ``uid``; default: the PA file's name); relative paths are relative to the CSV's folder.
    * Folder: X-ray files named ``<case>-PA.<ext>`` / ``<case>-L.<ext>`` (separator ``-``, ``_``, space or
      ``.``; tags PA, AP, frontal / L, LAT, lateral, any case), or subfolders ``<case>/`` holding
      ``pa.*`` and ``lateral.*`` (the dataset layout). For one-view models an untagged file is a frontal X-ray.
    A case without the views its model needs, or with two files for one view, gets an ``error``.
    """
    path = require_file(inputs)
    if os.path.isfile(path):
        if not path.lower().endswith(".csv"):
            raise InputError(path, "--inputs must be a folder of X-rays or a CSV file")
        return _cases_from_csv(path, needs_lateral)
    found: dict[str, dict[str, list[str]]] = {}

    def add(case: str, view: str, file: str) -> None:
        found.setdefault(case, {"pa": [], "lateral": []})[view].append(file)

    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith("."):
            continue
        if os.path.isdir(full):
            for inner in sorted(os.listdir(full)):
                suffix = _suffix(inner)
                if suffix and not inner.startswith("."):
                    tag, view = _split_view(inner[: -len(suffix)])
                    if view is not None and not tag:
                        add(name, view, os.path.join(full, inner))
            continue
        suffix = _suffix(name)
        if suffix is None:
            continue
        case, view = _split_view(name[: -len(suffix)])
        if view is None and not needs_lateral:
            view = "pa"
        if view is not None and case:
            add(case, view, full)
    if not found:
        raise InputError(path, "no X-ray found (<case>-PA.png / <case>-L.png files or <case>/pa.* folders)")
    cases = []
    for case, views in found.items():
        item = {"case": case, "pa": None, "lateral": None}
        problems = [f"{len(v)} {k} files ({', '.join(os.path.basename(f) for f in v)})"
                    for k, v in views.items() if len(v) > 1]  # fmt: skip
        item.update({k: v[0] for k, v in views.items() if len(v) == 1})
        if problems:
            item["error"] = "; ".join(problems)
        elif item["pa"] is None:
            item["error"] = "no PA (frontal) X-ray"
        elif needs_lateral and item["lateral"] is None:
            item["error"] = "no lateral X-ray (this model needs a PA + lateral pair)"
        cases.append(item)
    return cases


def _cases_from_csv(path: str, needs_lateral: bool) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = {c.strip().lower(): c for c in reader.fieldnames or []}
        column = {k: next((fields[n] for n in names if n in fields), None) for k, names in CSV_COLUMNS.items()}
        if column["pa"] is None:
            raise InputError(path, f"CSV needs a 'pa' (or 'frontal') column; has {sorted(fields)}")
        if needs_lateral and column["lateral"] is None:
            raise InputError(path, "this model needs a PA + lateral pair: the CSV needs a 'lateral' column")
        base = os.path.dirname(os.path.abspath(path))
        cases = []
        for k, row in enumerate(reader):
            pa, lateral = (_csv_file(row, column[key], base) for key in ("pa", "lateral"))
            name = (row.get(column["case"]) or "").strip() if column["case"] else ""
            if not name and pa:
                name = case_name(pa)
            item = {"case": name or f"row{k + 1}", "pa": pa, "lateral": lateral}
            if pa is None:
                item["error"] = f"row {k + 1}: no PA file"
            elif needs_lateral and lateral is None:
                item["error"] = f"row {k + 1}: no lateral file (this model needs a PA + lateral pair)"
            cases.append(item)
    if not cases:
        raise InputError(path, "CSV lists no case")
    names = [c["case"] for c in cases]
    for item in cases:
        if names.count(item["case"]) > 1 and "error" not in item:
            item["error"] = f"case name {item['case']!r} appears {names.count(item['case'])} times in the CSV"
    return cases


def _csv_file(row: Mapping, column: str | None, base: str) -> str | None:
    value = (row.get(column) or "").strip() if column else ""
    return None if not value else value if os.path.isabs(value) else os.path.join(base, value)


def _input_info(path: str | None) -> dict | None:
    if path is None:
        return None
    return {"file": os.path.abspath(path), "sha256": file_sha256(require_file(path))}


# ----------------------------------------------------------------------------------------------- outputs
def _label(image: Image.Image, text: str) -> Image.Image:
    out = Image.new("L", (image.width, image.height + 14), 0)
    out.paste(image, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill=255)
    return out


def save_drr_comparison(path: str, views: np.ndarray, drrs: Mapping[str, np.ndarray], names: Sequence[str],
                        scores: Mapping | None, panel: int = 192) -> str:  # fmt: skip
    """A PNG: each input view (as the model saw it) beside the CT's DRR of that view, with its scores."""
    panels = []
    for i, view in enumerate(names):
        pair = [("input " + view, views[i])] + ([("DRR " + view, drrs[view])] if view in drrs else [])
        for label, image in pair:
            u8 = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
            if label.startswith("DRR") and scores:
                label += f"  L1 {scores[f'drr_l1_{view}']:.3f}  PSNR {scores[f'drr_psnr_{view}']:.1f} dB"
            panels.append(_label(u8.resize((panel, panel), Image.Resampling.BILINEAR), label))
    sheet = Image.new("L", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), 0)
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 4
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _volume_info(volume: Volume, file: str | None) -> dict:
    array = np.asarray(volume.array, dtype=np.float32)
    return {
        "file": None if file is None else os.path.basename(file),
        "shape": list(volume.shape),
        "spacing_mm": [float(s) for s in volume.spacing],
        "origin_mm": [float(o) for o in volume.origin],
        "orientation": volume.orientation,
        "hu": {"min": float(array.min()), "max": float(array.max()), "mean": float(array.mean())},
    }


def software_versions() -> dict:
    from importlib import metadata

    import monai
    import torch

    try:
        version = metadata.version("xray2ct")
    except metadata.PackageNotFoundError:
        version = None
    return {"torch": torch.__version__, "monai": monai.__version__, "xray2ct": version}


CONVENTIONS = {
    "ct": "HU, canonical RAS (array axes run to patient right, anterior, superior), centred on the DRR "
    "isocentre (origin of the middle voxel 0); spacing_mm is the voxel size",
    "views": "X-rays as the model saw them: float [0, 1], DRR convention (bones bright), radiological display "
    "(PA: patient's right on the left; lateral: anterior on the left)",
    "drr_consistency": DRR_SCORE_CONVENTION,
    "pe": PE_CONVENTION,
    "agreement": AGREEMENT_CONVENTION,
    "domain_gap": "structure statistics of each view as the model saw it (spectral slope, gradient CV, "
    "fine-to-coarse energy, body width fraction; common.domain_gap) against the training DRRs' range recorded at "
    "training; score = mean |z|; a warning per statistic outside the range widened by half its width",
    "plausibility": "the final CT against published adult ranges (lung volume, body width and depth, "
    "cardiothoracic ratio, heart offset; common.plausibility, sources in the block), not the training set's",
}


def run_case(
    model: XrayToCTModel,
    pa: str,
    lateral: str | None,
    output_dir: str,
    case: str,
    pe: PEModel | None = None,
    fmt: str = "nii.gz",
    options: Mapping | None = None,
    previews: bool = True,
    progress=None,
    preparation: str = "geometry",
    intensity: str = "match",
) -> dict:
    """Reconstruct one case into ``<output_dir>/<safe case name>/`` and return its report (also written)."""
    suffix = FORMATS.get(str(fmt).lstrip("."))
    if suffix is None:
        raise InputError(None, f"unknown --format {fmt!r}; choose from {sorted(FORMATS)}")
    folder = os.path.join(output_dir, safe_case_name(case))
    os.makedirs(folder, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    start = clock
    options = model.check_options(options)
    views, prepared, aligned = prepare_inputs(model, pa, lateral, preparation, intensity)
    lap("preprocess")
    volumes = model.run(views, options, progress)
    lap("reconstruct")
    names = list(volumes)
    final = volumes[names[-1]]
    stage_scores = {name: score_against_inputs(model, vol, views) for name, vol in volumes.items()}
    scores, drrs = stage_scores[names[-1]]
    baseline = baseline_scores(model, views)
    agreement = _agreement(model, drrs, aligned)
    gap = domain_gap(views, model.views, ((model.record or {}).get("inputs") or {}).get("drr_statistics"))
    plausible = plausibility(final)
    lap("checks")
    lap("drr_consistency")
    ct_file = save_volume(final, os.path.join(folder, "ct" + suffix))
    stage_files = {}
    if len(names) > 1:
        stage_files = {n: save_volume(v, os.path.join(folder, n + suffix)) for n, v in volumes.items()}
    lap("write")
    pe_result = None
    if pe is not None:
        pe_result = pe.assess_volume(final, model.contrast_phase, ct_file, views[0], folder)
        lap("pe")
    preview_files = {}
    if previews:
        xrays = {("PA" if v == "pa" else "lateral"): views[i] for i, v in enumerate(model.views)}
        preview_files["montage"] = os.path.basename(
            save_montage_png(os.path.join(folder, "preview.png"), volumes, xrays=xrays)
        )
        preview_files["gif"] = os.path.basename(save_slice_gif(os.path.join(folder, "axial.gif"), final))
        if drrs:
            preview_files["drr"] = os.path.basename(
                save_drr_comparison(os.path.join(folder, "drr.png"), views, drrs, model.views, scores)
            )
        lap("previews")
    seconds["total"] = round(time.perf_counter() - start, 3)
    baseline_block = (model.baseline or {}).copy()
    baseline_block.pop("volume", None)
    report = {
        "format": REPORT_FORMAT,
        "case": case,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"pa": _input_info(pa), "lateral": _input_info(lateral if model.needs_lateral else None)},
        "model": {**model.fingerprint(), "views": list(model.views), "image_size": model.image_size},
        "options": options,
        "preparation": prepared,
        "agreement": agreement,
        "domain_gap": gap,
        "plausibility": plausible,
        "ct": _volume_info(final, ct_file),
        "stages": [
            {"name": n, **_volume_info(v, stage_files.get(n, ct_file)), "drr_consistency": stage_scores[n][0]}
            for n, v in volumes.items()
        ],
        "drr_consistency": scores,
        "drr_consistency_baseline": (
            None if baseline is None else {"name": "mean_training_ct", **baseline_block, "scores": baseline}
        ),
        "drr_consistency_note": None if scores is not None else "the checkpoint records no DRR geometry",
        "pe": pe_result,
        "previews": preview_files,
        "conventions": CONVENTIONS,
        "seconds": seconds,
        "software": software_versions(),
    }
    write_json(os.path.join(folder, REPORT), report)
    return report


def _checks(report: Mapping) -> dict:
    """The batch summary's per-case figures: domain gap, plausibility warnings, scale sources, agreement."""
    gap, plausible = report.get("domain_gap") or {}, report.get("plausibility") or {}
    views = (report.get("preparation") or {}).get("views") or {}
    agreement = (report.get("agreement") or {}).get("ct") or {}
    return {
        "domain_gap": gap.get("score"),
        "warnings": list(gap.get("warnings") or []) + list(plausible.get("warnings") or []),
        "scale_source": {v: info.get("scale_source") for v, info in views.items()},
        "agreement": agreement.get("mean"),
    }


def _agreement(model: XrayToCTModel, drrs: Mapping[str, np.ndarray], aligned: np.ndarray) -> dict | None:
    """The fixed-reference agreement of the CT and of the mean training CT (None without a DRR geometry)."""
    if not drrs:
        return None
    mean_ct = None
    if model.baseline and "volume" in model.baseline:
        _, base_drrs = score_against_inputs(model, model.baseline["volume"], aligned)
        mean_ct = agreement_scores(base_drrs, aligned, model.views)
    return {"measure": AGREEMENT_MEASURE, "ct": agreement_scores(drrs, aligned, model.views), "mean_ct": mean_ct}


# ----------------------------------------------------------------------------------------------- batch
def _settings(model: XrayToCTModel, pe: PEModel | None, fmt: str, options: Mapping,
              preparation: str = "geometry", intensity: str = "match") -> dict:  # fmt: skip
    return {
        "format": REPORT_FORMAT,
        "model": {"bundle": model.bundle, "sha256": model.sha256(), "checkpoint": model.checkpoint},
        "pe": None if pe is None else {"sha256": file_sha256(pe.checkpoint), "checkpoint": pe.checkpoint,
                                       "threshold": pe.api.threshold},  # fmt: skip
        "volume_format": fmt,
        "options": dict(options),
        "preparation": preparation,
        "intensity": intensity,
    }


def _check_settings(output_dir: str, settings: dict, overwrite: bool) -> None:
    """Refuse an output folder written with another model, classifier or settings (unless ``overwrite``)."""
    import json

    path = os.path.join(output_dir, SETTINGS)
    if os.path.isfile(path) and not overwrite:
        with open(path) as f:
            previous = json.load(f)
        keys = ("model", "pe", "volume_format", "options", "preparation", "intensity")
        differ = [k for k in keys if _without_paths(previous.get(k)) != _without_paths(settings.get(k))]
        if differ:
            raise InputError(
                output_dir,
                f"was written with another {', '.join(differ)} ({path}): use another --output_dir, or "
                "--overwrite True to redo every case",
            )
    write_json(path, settings)


def _without_paths(value):
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k != "checkpoint"}
    return value


def run_batch(
    model: XrayToCTModel,
    cases: Sequence[Mapping],
    output_dir: str,
    pe: PEModel | None = None,
    fmt: str = "nii.gz",
    options: Mapping | None = None,
    previews: bool = True,
    overwrite: bool = False,
    progress_bars: bool = True,
    preparation: str = "geometry",
    intensity: str = "match",
) -> dict:
    """Run every case (resumable); returns and writes the summary. Per-case errors never stop the batch."""
    if str(fmt).lstrip(".") not in FORMATS:
        raise InputError(None, f"unknown --format {fmt!r}; choose from {sorted(FORMATS)}")
    options = model.check_options(options)
    os.makedirs(output_dir, exist_ok=True)
    remove_partial_files(output_dir)  # leftovers of a killed run (an hour old: never a live writer's)
    if preparation not in PREPARATIONS:
        raise InputError(None, f"unknown --preparation {preparation!r}; choose from {PREPARATIONS}")
    if intensity not in INTENSITIES:
        raise InputError(None, f"unknown --intensity {intensity!r}; choose from {INTENSITIES}")
    _check_settings(output_dir, _settings(model, pe, fmt, options, preparation, intensity), overwrite)
    names = [safe_case_name(c["case"]) for c in cases]
    rows, counts = [], {"cases": len(cases), "written": 0, "already_done": 0, "failed": 0}
    for item, name in tqdm(list(zip(cases, names)), desc="X-ray -> CT", unit="case", disable=not progress_bars):
        row = {"case": item["case"], "folder": name, "status": "", "error": None}
        report = os.path.join(output_dir, name, REPORT)
        if "error" in item:
            row.update(status="failed", error=item["error"])
        elif names.count(name) > 1:
            row.update(status="failed", error=f"{names.count(name)} cases map to the folder name {name!r}")
        elif os.path.isfile(report) and not overwrite:
            row["status"] = "already_done"
        else:
            bar = _step_bar(model, progress_bars)
            try:
                report = run_case(model, item["pa"], item.get("lateral"), output_dir, item["case"], pe, fmt,
                                  options, previews, bar.update if bar else None, preparation, intensity)  # fmt: skip
                row.update(status="written", **_checks(report))
            except InputError as exc:
                row.update(status="failed", error=str(exc))
            except Exception as exc:  # one case's failure (a decoder's error, out of memory) must not end the batch
                logger.warning("case %s failed: %s: %s", item["case"], type(exc).__name__, exc)
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                if bar:
                    bar.close()
        counts[row["status"]] += 1
        rows.append(row)
    summary = {**counts, "output_dir": os.path.abspath(output_dir), "cases_detail": rows}
    write_json(os.path.join(output_dir, SUMMARY), summary)
    failed = [r for r in rows if r["status"] == "failed"]
    atomic_write_text(os.path.join(output_dir, "errors.csv"), csv_text(failed, ["case", "error"]))
    return summary


class _StepBar:
    """A tqdm bar over a model's own progress (the diffusion's steps), fed by ``update(fraction, text)``."""

    def __init__(self):
        self.bar = tqdm(total=100, desc="  sampling", unit="%", leave=False)

    def update(self, fraction: float, text: str) -> None:
        self.bar.n = round(100 * fraction)
        self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        self.bar.close()


def _step_bar(model: XrayToCTModel, enabled: bool) -> _StepBar | None:
    return _StepBar() if enabled and model.options else None


# ----------------------------------------------------------------------------------------------- CLI
def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return [str(v) for v in value]


def pipeline(
    checkpoint: str,
    output_dir: str,
    pa: str | None = None,
    lateral: str | None = None,
    inputs: str | None = None,
    case: str | None = None,
    bundle: str | None = None,
    config: str | list[str] | None = None,
    vqgan: str | None = None,
    pe_checkpoint: str | None = None,
    pe_threshold_report: str | None = None,
    format: str = "nii.gz",
    device: str = "cpu",
    sampling_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    previews: bool = True,
    baseline: bool = True,
    overwrite: bool = False,
    preparation: str = "geometry",
    intensity: str = "match",
) -> dict:
    """One case (``--pa``, ``--lateral``) or a batch (``--inputs`` folder or CSV) through one model.

    ``--config cpu_tiny`` (overlays of the bundle's inference.json) is checked against the checkpoint's
    record; ``--vqgan`` for latent_ddpm (default: the file its record names); ``--sampling_steps``,
    ``--guidance_scale``, ``--seed``: the diffusion's sampling (latent_ddpm only); ``--baseline False`` skips
    averaging the training CTs for the baseline DRR score. ``--preparation geometry`` (default) maps each film
    onto the training DRRs' scale (DICOM tags, else an estimate: the report's ``preparation`` says which);
    ``legacy``: the centred square crop. ``--intensity match`` (default) maps each view onto the training DRRs'
    intensity quantiles (recorded at training; ``none``: unmatched). ``agreement`` in each report scores the
    CT's DRRs against the geometry-only views (:mod:`common.agreement`). Returns the batch summary.
    """
    if (pa is None) == (inputs is None):
        raise InputError(None, "give either --pa (and --lateral) for one case or --inputs (folder or CSV)")
    model = load_model(checkpoint, bundle, _as_list(config), device, vqgan, baseline=bool(baseline))
    pe = load_pe_model(pe_checkpoint, (), device, pe_threshold_report) if pe_checkpoint else None
    if pe is not None:
        pe.check(model)  # no meaningless PE numbers: another contrast phase, field of view or a finer grid
    options = {"sampling_steps": sampling_steps, "guidance_scale": guidance_scale, "seed": seed}
    options = {k: v for k, v in options.items() if v is not None}
    if inputs is not None:
        cases = find_cases(inputs, model.needs_lateral)
    else:
        if model.needs_lateral and lateral is None:
            raise InputError(pa, f"{model.bundle} needs a PA + lateral pair: give --lateral")
        cases = [{"case": case or case_name(pa), "pa": require_file(pa), "lateral": lateral}]
    return run_batch(model, cases, output_dir, pe, format, options, previews, overwrite, preparation=preparation,
                     intensity=intensity)  # fmt: skip


@functools.wraps(pipeline)
def main(*args, **kwargs) -> dict:
    """``pipeline`` with a one-line ``error: <file>: <problem>`` for bad input instead of a traceback."""
    try:
        summary = pipeline(*args, **kwargs)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    return {k: v for k, v in summary.items() if k != "cases_detail"}


if __name__ == "__main__":
    import fire

    fire.Fire(main)
