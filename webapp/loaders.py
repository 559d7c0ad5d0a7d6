"""Trained bundle checkpoints behind one small interface the web app drives (preprocess, reconstruct).

Each supported bundle has a loader here; the app never imports a bundle directly. Only PerX2CT ships a
Python inference API today (``bundles/perx2ct/scripts/inference.py``); other bundles plug in by adding a loader.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from common.drr import DRRGeometry
from common.errors import InputError, require_file
from common.volume import Volume

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class LoadedModel:
    """A reconstruction model ready to serve: what the page needs to know, and how to run it."""

    name: str
    bundle: str
    needs_lateral: bool
    image_size: int
    volume_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    geometry: DRRGeometry  # the model's DRR camera: DRRs of its output are rendered with it
    preprocess: Callable[[str, str | None], np.ndarray]  # upload paths -> (views, H, W) in [0, 1]
    reconstruct: Callable[[np.ndarray], Volume]  # (views, H, W) -> HU volume, canonical RAS

    def describe(self) -> dict:
        return {
            "name": self.name,
            "bundle": self.bundle,
            "needs_lateral": self.needs_lateral,
            "image_size": self.image_size,
            "volume_shape": list(self.volume_shape),
            "spacing": list(self.spacing),
        }


def config_paths(bundle: str, configs: Sequence[str] = ()) -> list[str]:
    """``inference.json`` then overlays given by path or by name (``cpu_tiny`` -> ``configs/cpu_tiny.json``)."""
    folder = os.path.join(REPO_ROOT, "bundles", bundle, "configs")
    paths = [os.path.join(folder, "inference.json")]
    for config in configs:
        paths.append(config if os.path.exists(config) else os.path.join(folder, f"{config}.json"))
    return [require_file(p) for p in paths]


def load_perx2ct(checkpoint: str, configs: Sequence[str] = (), device: str = "cpu") -> LoadedModel:
    from bundles.perx2ct.scripts.inference import PerX2CTInference

    bundle_root = os.path.join(REPO_ROOT, "bundles", "perx2ct")
    try:
        predictor = PerX2CTInference.from_bundle(
            bundle_root, checkpoint, config_paths("perx2ct", configs), device=device
        )
    except (RuntimeError, ValueError) as exc:  # state dict of another architecture or geometry
        if isinstance(exc, InputError):
            raise
        raise InputError(checkpoint, f"does not fit the perx2ct config {list(configs)}: {exc}") from None

    def preprocess(pa: str, lateral: str | None) -> np.ndarray:
        return predictor.preprocess(pa, lateral)[0].numpy()

    def reconstruct(views: np.ndarray) -> Volume:
        unit = predictor.predict_tensor(torch.from_numpy(np.ascontiguousarray(views))[None])
        return predictor.to_volume(unit[0, 0].numpy())

    return LoadedModel(
        name="",
        bundle="perx2ct",
        needs_lateral=True,
        image_size=predictor.image_size,
        volume_shape=predictor.volume_shape,
        spacing=predictor.spacing,
        geometry=predictor.net.geometry,
        preprocess=preprocess,
        reconstruct=reconstruct,
    )


LOADERS: dict[str, Callable[..., LoadedModel]] = {"perx2ct": load_perx2ct}


def load_models(
    checkpoints: str | Sequence[str],
    bundle: str = "perx2ct",
    configs: Sequence[str] = (),
    device: str = "cpu",
) -> dict[str, LoadedModel]:
    """Load every checkpoint of ``bundle``; names are ``<bundle>:<checkpoint file stem>`` (made unique)."""
    if bundle not in LOADERS:
        raise InputError(None, f"bundle {bundle!r} has no web loader; available: {sorted(LOADERS)}")
    checkpoints = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not checkpoints:
        raise InputError(None, "give at least one --checkpoint")
    models: dict[str, LoadedModel] = {}
    for checkpoint in checkpoints:
        model = LOADERS[bundle](require_file(os.fspath(checkpoint)), configs, device)
        stem = os.path.basename(os.fspath(checkpoint)).split(".")[0]
        name, k = f"{bundle}:{stem}", 2
        while name in models:
            name, k = f"{bundle}:{stem}-{k}", k + 1
        model.name = name
        models[name] = model
    return models
