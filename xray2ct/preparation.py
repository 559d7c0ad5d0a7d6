"""How the pipeline brings radiographs to a model (issue 22): the film's geometry, or the legacy centred crop.

``geometry`` (default): :func:`common.radiograph.prepare_view` per view: collimation and markers removed,
the patient's mm per pixel (DICOM tags, else an estimate from the body or lung-field width, said in
``scale_source``) mapped onto the training DRRs' isocentre pixel spacing, centred on the body, then the
bundle's own preprocessing of an array (already square: a plain resize). ``legacy``: the bundle's
preprocessing of the file (percentile normalisation, centred square crop; the film's scale ignored).
DRR NIfTI files are in the model domain already, and models without a recorded DRR geometry (or with the
released PerX2CT camera) cannot be mapped: both take the legacy path, and the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import InputError
from xray2ct.models import XrayToCTModel

PREPARATIONS = ("geometry", "legacy")
INTENSITIES = ("match", "none")  # match: quantiles of the training DRRs (record's drr_quantiles); none: as prepared
LEGACY_NOTE = "none: centred square crop and percentile normalisation (the film's scale is not used)"


def _legacy_reason(model: XrayToCTModel, files: Mapping[str, str | None]) -> str | None:
    if model.geometry is None:
        return "the checkpoint records no DRR geometry"
    if ((model.record or {}).get("network_def") or {}).get("camera") == "perx2ct":
        return "the released PerX2CT camera is not our DRR geometry"
    if any(str(f).lower().endswith((".nii", ".nii.gz")) for f in files.values() if f is not None):
        return "DRR NIfTI input: already in the model domain"
    return None


def prepare_inputs(
    model: XrayToCTModel, pa: str, lateral: str | None, preparation: str = "geometry", intensity: str = "match"
) -> tuple[np.ndarray, dict, np.ndarray]:
    """(views (V, S, S) float32 in [0, 1] as the model sees them, the report's ``preparation`` block, the views
    after geometric alignment only: the fixed reference of :mod:`common.agreement`)."""
    if preparation not in PREPARATIONS:
        raise InputError(None, f"unknown --preparation {preparation!r}; choose from {PREPARATIONS}")
    if intensity not in INTENSITIES:
        raise InputError(None, f"unknown --intensity {intensity!r}; choose from {INTENSITIES}")
    files = {"pa": pa, "lateral": lateral if model.needs_lateral else None}
    reason = None if preparation == "legacy" else _legacy_reason(model, files)
    if preparation == "legacy" or reason is not None:
        aligned = model.preprocess(pa, files["lateral"])
        block = {"method": "legacy", "requested": preparation, "reason": reason,
                 "views": {v: {"scale_source": LEGACY_NOTE} for v in model.views}}  # fmt: skip
    else:
        from common.radiograph import prepare_view

        prepared, infos = {}, {}
        for view in model.views:
            prepared[view], infos[view] = prepare_view(files[view], view, model.geometry, model.image_size)
        aligned = model.preprocess(prepared["pa"], prepared.get("lateral"))
        block = {"method": "geometry", "requested": preparation, "reason": None, "views": infos}
    views, block["intensity"] = match_intensity(model, aligned, intensity)
    return views, block, aligned


def match_intensity(model: XrayToCTModel, views: np.ndarray, intensity: str = "match") -> tuple[np.ndarray, dict]:
    """Views mapped onto the training DRRs' intensity quantiles (per view), and the report's block."""
    from common.radiograph import intensity_summary, match_quantiles

    reference = ((model.record or {}).get("inputs") or {}).get("drr_quantiles")
    before = {v: intensity_summary(views[i]) for i, v in enumerate(model.views)}
    if intensity == "none" or not reference or any(v not in reference for v in model.views):
        note = "not requested" if intensity == "none" else "the checkpoint records no DRR quantiles (retrain)"
        return views, {"method": "none", "requested": intensity, "reason": note, "before": before}
    out = np.stack([match_quantiles(views[i], reference[v]) for i, v in enumerate(model.views)])
    after = {v: intensity_summary(out[i]) for i, v in enumerate(model.views)}
    return out, {"method": "quantile_match", "requested": intensity, "reason": None,
                 "reference": f"training DRRs' percentiles ({reference.get('n_cases')} cases)",
                 "before": before, "after": after}  # fmt: skip
