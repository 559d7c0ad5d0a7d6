"""Trained bundle checkpoints behind the one interface the web app drives (:class:`xray2ct.models.XrayToCTModel`).

Every X-ray -> CT bundle (perx2ct, progressive_cascade, latent_ddpm) is built from its checkpoint's record by
:mod:`xray2ct.models`, which calls the bundles' ``scripts/inference.py`` APIs; the app never imports a bundle.
A ``pe_classifier`` checkpoint adds a PE probability to every job (:func:`load_classifier`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from common.errors import InputError, require_file
from xray2ct.models import LOADERS, PEModel, XrayToCTModel, config_paths, load_model, load_pe_model

LoadedModel = XrayToCTModel  # the name the app and its tests use
__all__ = ["LoadedModel", "classifier_refusals", "config_paths", "load_classifier", "load_models"]


def load_models(
    checkpoints: str | Sequence[str],
    bundle: str | None = None,
    configs: Sequence[str] = (),
    device: str = "cpu",
    vqgan_checkpoint: str | None = None,
    max_sampling_steps: int = 200,
    baseline: bool = True,
) -> dict[str, LoadedModel]:
    """Load every checkpoint; names are ``<bundle>:<checkpoint file stem>`` (made unique).

    Each checkpoint's bundle comes from its record (``bundle``, when given, must agree; it names the bundle
    of checkpoints saved without a record, default perx2ct). ``configs``: overlays (``cpu_tiny``) of each
    bundle's ``inference.json``, checked against the records; ``max_sampling_steps`` caps the diffusion's
    steps a page may ask for (one worker serves every client).
    """
    if bundle is not None and bundle not in LOADERS:
        raise InputError(None, f"bundle {bundle!r} has no web loader; available: {sorted(LOADERS)}")
    checkpoints = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not checkpoints:
        raise InputError(None, "give at least one --checkpoint")
    models: dict[str, LoadedModel] = {}
    for checkpoint in checkpoints:
        path = require_file(os.fspath(checkpoint))
        model = load_model(path, bundle, configs, device, vqgan_checkpoint, max_sampling_steps, baseline)
        found = model.bundle  # load_model reads the checkpoint once and refuses a bundle it cannot serve
        stem = os.path.basename(path).split(".")[0]
        name, k = f"{found}:{stem}", 2
        while name in models:
            name, k = f"{found}:{stem}-{k}", k + 1
        model.name = name
        models[name] = model
    return models


def load_classifier(
    checkpoint: str | None, device: str = "cpu", threshold_report: str | None = None
) -> PEModel | None:
    """The PE classifier of ``checkpoint`` (None when not given)."""
    if not checkpoint:
        return None
    return load_pe_model(checkpoint, (), device, threshold_report)


def classifier_refusals(classifier: PEModel | None, models: Mapping[str, LoadedModel]) -> dict[str, str]:
    """``{model name: why the classifier is refused for its CTs}`` (their jobs show the reason, no probability);
    :class:`InputError` when it fits none of the models (a classifier that can give no meaningful number)."""
    if classifier is None:
        return {}
    refused = {}
    for name, model in models.items():
        try:
            classifier.check(model)
        except InputError as exc:
            refused[name] = exc.problem
    if refused and len(refused) == len(models):
        raise InputError(classifier.checkpoint, "; ".join(refused.values()))
    return refused
