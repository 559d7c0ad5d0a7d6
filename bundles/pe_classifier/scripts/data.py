"""Datalists, generated-CT matching, the volume reader, label conversion and batch preparation.

Image keys: ``ct`` (3D CTPA, real or generated, HU), ``pa`` (2D PA radiograph/DRR in [0, 1]).
``label`` is 0/1 (PE present); it becomes a float tensor of shape (1,) for ``BCEWithLogitsLoss``. The
per-modality transform chains are ``_target_`` lists in the configs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import numpy as np
import torch
from monai.data import ImageReader, MetaTensor
from monai.engines import PrepareBatch
from monai.transforms import Identityd, MapTransform, Randomizable
from torch.utils.data import WeightedRandomSampler

from common.datalist import case_id, case_id_of_path
from common.datalist import load_split as common_load_split
from common.errors import InputError
from common.io import load_volume

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".h5", ".hdf5", ".npy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BALANCE_MODES = ("loss", "sampler", "none")


def image_keys(modality: str, ct_key: str = "ct", xray_key: str = "pa") -> list[str]:
    """The data keys a modality reads (datalists: ``ct``/``pa``; inference.json reads the CT as ``image``)."""
    return {"ct": [ct_key], "xray": [xray_key], "fusion": [ct_key, xray_key]}[modality]


def load_split(dataset_dir: str, split: str, require_label: bool = True) -> list[dict]:
    """Items of one split of ``<dataset_dir>/dataset.json`` with absolute paths and an integer label.

    A missing ``label`` is read from the case's ``label.json`` (``{"pe": 0|1}``). ``[]`` when the datalist
    does not exist (:func:`common.datalist.load_split`); the checks before training and evaluation say so.
    """
    datalist = os.path.join(dataset_dir, "dataset.json")
    items = common_load_split(datalist, split, dataset_dir)
    for item in items:
        if "label" not in item and "ct" in item:
            label_file = os.path.join(os.path.dirname(item["ct"]), "label.json")
            if os.path.isfile(label_file):
                with open(label_file) as f:
                    item["label"] = int(json.load(f)["pe"])
        if require_label and item.get("label") not in (0, 1):
            raise InputError(datalist, f"case {item.get('id')!r} in {split!r} has no 0/1 label")
        item.setdefault("id", case_id(item, key="ct" if "ct" in item else "pa"))
        # load_decathlon_datalist turns any value naming an existing path (the case folder) into a path
        if os.path.isabs(str(item["id"])):
            item["id"] = os.path.relpath(item["id"], dataset_dir)
    return items


def find_generated(folder: str, case_id: str) -> str | None:
    """The file ``{case_id}*.nii.gz|.nii|.h5|.npy`` in ``folder`` (the id must end at a non-alphanumeric
    character so ``case_1`` never matches ``case_10``); the shortest name wins when several match."""
    pattern = re.compile(re.escape(case_id) + r"($|[^0-9A-Za-z])")
    hits = [
        name
        for name in os.listdir(folder)
        if name.lower().endswith(VOLUME_SUFFIXES) and pattern.match(name) and not name.startswith(".")
    ]
    return os.path.join(folder, min(hits, key=len)) if hits else None


def with_generated(items: list[dict], generated_dir: str | None) -> list[dict]:
    """Replace each item's ``ct`` by its synthesised volume from ``generated_dir`` (no-op when empty)."""
    if not generated_dir:
        return items
    if not os.path.isdir(generated_dir):
        raise InputError(generated_dir, "generated-CT folder not found")
    out, missing = [], []
    for item in items:
        path = find_generated(generated_dir, str(item["id"]))
        if path is None:
            missing.append(str(item["id"]))
        out.append({**item, "ct": path, "ct_real": item.get("ct"), "ct_source": "generated"})
    if missing:
        raise InputError(generated_dir, f"no generated volume for {len(missing)} case(s): {missing[:5]}")
    return out


def best_checkpoint(ckpt_dir: str) -> str:
    """``model.pt`` (best validation AUC) if training wrote it, else ``model_final.pt``."""
    for name in ("model.pt", "model_final.pt"):
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path):
            return path
    raise InputError(ckpt_dir, "no model.pt or model_final.pt: train first or pass --ckpt_path")


def inference_items(input_path: str, key: str = "ct") -> list[dict]:
    """Items ``{"id", key}`` for one image file or every image in a folder (id: :func:`common.datalist.case_id_of_path`,
    the name without suffix, or the folder's name for ``<case>/ct.nii.gz``)."""
    if os.path.isdir(input_path) and not any(n.lower().endswith(".dcm") for n in os.listdir(input_path)):
        names = sorted(
            n for n in os.listdir(input_path) if n.lower().endswith(VOLUME_SUFFIXES + IMAGE_SUFFIXES)
        )
        paths = [os.path.join(input_path, n) for n in names if not n.startswith(".")]
    elif os.path.exists(input_path):
        paths = [input_path]
    else:
        raise InputError(input_path, "input volume or folder not found")
    if not paths:
        raise InputError(input_path, f"no volume ({', '.join(VOLUME_SUFFIXES)}) in folder")
    return [{"id": case_id_of_path(p), key: p} for p in paths]


class VolumeReader(ImageReader):
    """MONAI reader over :func:`common.io.load_volume`, so ``LoadImaged`` reads NIfTI, HDF5 (``ct``
    dataset), NPY + JSON sidecar and DICOM folders with their affine (MONAI has no HDF5/sidecar reader)."""

    def verify_suffix(self, filename) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return all(str(n).lower().endswith(VOLUME_SUFFIXES) or os.path.isdir(n) for n in names)

    def read(self, data, **kwargs):
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        vols = [(os.fspath(n), load_volume(n)) for n in names]
        return vols[0] if len(vols) == 1 else vols

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        path, vol = img if isinstance(img, tuple) else img[0]
        meta = {
            "affine": vol.affine.copy(),
            "original_affine": vol.affine.copy(),
            "spatial_shape": np.asarray(vol.shape),
            "space": "RAS",
            "filename_or_obj": path,
            "original_channel_dim": float("nan"),
        }
        return vol.array.astype(np.float32), meta


def label_to_tensor(label) -> torch.Tensor:
    """0/1 label -> float tensor of shape (1,) (the target of ``BCEWithLogitsLoss`` and ``ROCAUC``)."""
    return torch.as_tensor(np.asarray(label, dtype=np.float32).reshape(1))


def positive_weight(items: list[dict], mode: str = "loss") -> torch.Tensor | None:
    """``pos_weight = n_negative / n_positive`` for ``BCEWithLogitsLoss`` when ``mode == "loss"``, else None."""
    _check_mode(mode)
    if mode != "loss":
        return None
    labels = np.asarray([int(i["label"]) for i in items])
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise InputError(None, f"training split needs both classes (positives={n_pos} of {labels.size})")
    return torch.tensor([(labels.size - n_pos) / n_pos], dtype=torch.float32)


def balanced_sampler(items: list[dict], mode: str = "sampler", seed: int = 0) -> WeightedRandomSampler | None:
    """A sampler drawing both classes equally often when ``mode == "sampler"``, else None (plain shuffle)."""
    _check_mode(mode)
    if mode != "sampler":
        return None
    labels = np.asarray([int(i["label"]) for i in items])
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weights = 1.0 / counts[labels]
    return WeightedRandomSampler(
        torch.as_tensor(weights), len(items), replacement=True, generator=torch.Generator().manual_seed(seed)
    )


def _check_mode(mode: str) -> None:
    if mode not in BALANCE_MODES:
        raise ValueError(f"class_balance must be one of {BALANCE_MODES}, got {mode!r}")


class PEPrepareBatch(PrepareBatch):
    """``ct``: network(ct); ``xray``: network(pa); ``fusion``: network(ct, pa). Label None when absent.

    ``ct_key``/``xray_key`` name the batch keys of the two images (``image`` for the CT in inference.json).
    """

    def __init__(self, modality: str = "ct", label_key: str = "label", ct_key: str = "ct", xray_key: str = "pa"):
        if modality not in ("ct", "xray", "fusion"):
            raise ValueError(f"modality must be ct, xray or fusion, got {modality!r}")
        self.modality, self.label_key, self.ct_key, self.xray_key = modality, label_key, ct_key, xray_key

    def __call__(
        self,
        batchdata: dict,
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        def get(key: str) -> torch.Tensor:
            return torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking, **kwargs)

        image = get(self.xray_key if self.modality == "xray" else self.ct_key)
        label = get(self.label_key) if self.label_key in batchdata else None
        args = (get(self.xray_key),) if self.modality == "fusion" else ()
        return image, label, args, {}


# ----------------------------------------------------------------------------------------------- CT intensities
CT_NORMALIZATIONS = ("auto", "hu_window", "medicalnet")


def resolve_ct_normalization(normalization: str, ct_pretrained: str | None = None) -> str:
    """``auto`` -> ``medicalnet`` when MedicalNet weights are loaded (``ct_pretrained``), else ``hu_window``.

    MedicalNet was pretrained on z-scored volumes (:class:`MedicalNetNormalized`), not on a [0, 1] HU window;
    fine-tuning its weights on another input scale wastes the initialisation, so ``auto`` feeds it what it saw.
    """
    if normalization not in CT_NORMALIZATIONS:
        raise ValueError(f"ct_normalization must be one of {CT_NORMALIZATIONS}, got {normalization!r}")
    if normalization == "auto":
        normalization = "medicalnet" if ct_pretrained else "hu_window"
    return normalization


def medicalnet_normalize(volume: np.ndarray | torch.Tensor, noise: np.ndarray | torch.Tensor):
    """MedicalNet's input normalisation (Tencent/MedicalNet ``datasets/brains18.py`` l. 133-148,
    ``__itensity_normalize_one_volume__``): ``(v - mean) / std`` with mean and std (population, numpy's
    default) of the voxels ``> 0``; voxels ``== 0`` are replaced by ``noise`` (their N(0, 1) draw).
    Any shape; ``noise`` has the volume's shape. Applied to the values as loaded (HU here), after the resize,
    as in their ``__training_data_process__``/``__testing_data_process__``.
    """
    v = torch.as_tensor(volume).as_subclass(torch.Tensor)
    n = torch.as_tensor(noise, dtype=v.dtype if v.is_floating_point() else torch.float32)
    v = v.to(n.dtype)
    if n.shape != v.shape:
        raise InputError("ct", f"noise shape {tuple(n.shape)} differs from the volume's {tuple(v.shape)}")
    pixels = v[v > 0]
    if pixels.numel() < 2:
        raise InputError("ct", "MedicalNet normalisation needs at least two voxels > 0 (mean/std of the positives)")
    std = pixels.std(unbiased=False)
    if not std > 0:
        raise InputError("ct", "MedicalNet normalisation: the voxels > 0 are all equal (std 0)")
    out = (v - pixels.mean()) / std
    return torch.where(v == 0, n, out)


class MedicalNetNormalized(MapTransform, Randomizable):
    """:func:`medicalnet_normalize` as a MONAI dict transform; the noise comes from the transform's seeded
    random state (``set_random_state``; MONAI datasets seed it), so a run is reproducible."""

    def __init__(self, keys, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)

    def randomize(self, data: Any = None) -> None:  # the draw happens per key in __call__
        pass

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            noise = self.R.standard_normal(tuple(img.shape)).astype(np.float32)
            out = medicalnet_normalize(torch.as_tensor(img).as_subclass(torch.Tensor).float(), noise)
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out
        return d


def ct_window_transform(key: str, hu_window: str, normalization: str = "auto", ct_pretrained: str | None = None):
    """The CT transform before the resize: the HU window (``hu_window``), or nothing for MedicalNet's
    normalisation, which works on HU and comes after the resize (:func:`ct_zscore_transform`)."""
    from common.transforms import hu_window_transform

    if resolve_ct_normalization(normalization, ct_pretrained) == "medicalnet":
        return Identityd(keys=key)
    return hu_window_transform(key, hu_window)


def ct_zscore_transform(key: str, normalization: str = "auto", ct_pretrained: str | None = None):
    """The CT transform after the resize: MedicalNet's z-score with noise (:class:`MedicalNetNormalized`)
    when the normalisation is ``medicalnet`` (``auto`` with MedicalNet weights), else nothing. Logged."""
    resolved = resolve_ct_normalization(normalization, ct_pretrained)
    if resolved == "medicalnet":
        logging.getLogger(__name__).info(
            "CT input: MedicalNet's normalisation (z-score over voxels > 0, N(0, 1) noise in the zeros)%s",
            " because MedicalNet weights are loaded" if normalization == "auto" else "",
        )
        return MedicalNetNormalized(keys=key)
    if ct_pretrained:
        logging.getLogger(__name__).warning(
            "CT input: HU window although MedicalNet weights are loaded (%s); MedicalNet was pretrained on "
            "z-scored volumes: ct_normalization 'auto' or 'medicalnet' feeds it that", ct_pretrained
        )
    return Identityd(keys=key)
