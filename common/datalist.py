"""Datalists: lazy split loading, the one case-id helper, and the check every training runs first.

* :func:`load_split` reads one split of a MONAI datalist and returns ``[]`` when the file does not exist, so a
  bundle config parses (and its networks, transforms and inferers build) on a machine without data, as the
  model zoo's globs do. Whoever needs cases says so: :func:`require_cases` (evaluation on the ``test``
  split, no fallback to another split) and :func:`validate_datalist` (training).
* :func:`case_id` is the case name everywhere (reports, writers, error messages). MONAI's
  ``load_decathlon_datalist`` turns an ``id`` naming an existing case folder into an absolute path; the
  name is its last component.
* :func:`validate_datalist` runs before a training starts: every file exists and is readable, shapes match
  the config, values are finite, with one message naming the case and the problem (a missing file otherwise
  ends in a long traceback from a data-loading thread).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from common.drr import DEFAULT_GEOMETRY, DRRGeometry, detector_geometry, get_geometry
from common.errors import InputError
from common.io import load_nifti_image, load_volume
from common.xray import load_xray

# file names that say nothing about the case (compared without case): the case is the folder holding them
GENERIC_NAMES = (
    "ct", "image", "img", "label", "avg", "phase0", "pa", "lateral", "latent", "volume", "vol", "mask", "scan", "data"
)  # fmt: skip
_SUFFIXES = (".nii.gz", ".nii", ".h5", ".hdf5", ".npy", ".png", ".jpg", ".jpeg", ".dcm")
_SLAB_VOXELS = 16 * 1024 * 1024  # values are checked in slabs of this many voxels (bounded memory)


# ----------------------------------------------------------------------------------------------- splits
def _read_datalist(datalist_file: str) -> dict | None:
    """The datalist's JSON object; ``None`` when the file does not exist; an :class:`InputError` naming the file
    when it cannot be read or is not a JSON object (the one read of a datalist file for the readers below)."""
    if not os.path.isfile(datalist_file):
        return None
    try:
        with open(datalist_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(datalist_file, f"cannot read the datalist ({e})") from None
    if not isinstance(meta, dict):
        raise InputError(datalist_file, "a datalist is a JSON object")
    return meta


def load_split(
    datalist_file: str | os.PathLike, split: str, base_dir: str | os.PathLike | None = None
) -> list[dict]:
    """Items of ``split`` with paths resolved against ``base_dir`` (default: the datalist's folder).

    ``[]`` when the file does not exist or the split is absent or empty (see the module docstring).
    """
    datalist_file = os.fspath(datalist_file)
    meta = _read_datalist(datalist_file)
    if meta is None or not meta.get(split):
        return []
    from monai.data import load_decathlon_datalist

    base = os.fspath(base_dir) if base_dir else os.path.dirname(os.path.abspath(datalist_file))
    return load_decathlon_datalist(datalist_file, is_segmentation=False, data_list_key=split, base_dir=base)


def datalist_field(datalist_file: str | os.PathLike, key: str, default=None):
    """A top-level field of a datalist (``spacing``, ``geometry``...), ``default`` when the file is absent."""
    meta = _read_datalist(os.fspath(datalist_file))
    value = None if meta is None else meta.get(key)
    return default if value is None else value


def dataset_geometry(datalist_file: str | os.PathLike, pixels: int | None = None) -> DRRGeometry:
    """The DRR camera of a dataset's X-rays, read from its datalist: the one reader (training, inference and
    evaluation configs, the cascade's dataset info).

    ``geometry`` as the dataset builders store it (:meth:`DRRGeometry.as_dict` at the DRRs' pixel count), or as
    a preset name (older datasets: at the datalist's ``drr_pixels`` when recorded). Absent (no file: a config
    parsed without data; or an older datalist without the field): the one default,
    :data:`common.drr.DEFAULT_GEOMETRY`, with a warning when the file exists. ``pixels``: the camera at the
    network's X-ray input size, which the X-ray transforms resize to (:func:`common.drr.detector_geometry`):
    what a network and its checkpoint record keep, so nothing below resizes it again. A geometry that cannot be
    read is an :class:`InputError` naming the file.
    """
    datalist_file = os.fspath(datalist_file)
    meta = _read_datalist(datalist_file)
    if meta is None:
        meta = {}
    elif meta.get("geometry") is None:
        warnings.warn(f"{datalist_file}: no DRR 'geometry'; assuming the {DEFAULT_GEOMETRY!r} preset", stacklevel=2)
    value = meta.get("geometry")
    try:
        geometry = get_geometry(DEFAULT_GEOMETRY if value is None else value)
        if isinstance(value, str) and meta.get("drr_pixels") is not None:
            geometry = detector_geometry(geometry, int(meta["drr_pixels"]))
        return geometry if pixels is None else detector_geometry(geometry, int(pixels))
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(datalist_file, f"bad DRR 'geometry' {value!r} ({e})") from None


ON_ERROR = ("raise", "exit")


def _stop(error: InputError, on_error: str):
    """Raise ``error``, or (``on_error="exit"``, what bundle configs use) exit with its one-line message.

    MONAI's config parser wraps every exception of an expression in a ``RuntimeError`` of its own, so the
    cause would sit in the middle of a long traceback; a command-line run should end with the cause.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if on_error == "exit":
        raise SystemExit(f"error: {error}") from None
    raise error


def require_cases(
    items: Sequence[dict],
    datalist_file: str | os.PathLike | None,
    split: str,
    purpose: str = "evaluation",
    on_error: str = "raise",
) -> Sequence[dict]:
    """``items`` unless empty; then :class:`InputError` saying which file and split (no silent fallback).

    ``on_error="exit"`` exits with that message instead (see :func:`validate_datalist`).
    """
    if items:
        return items
    try:
        _require_cases(items, datalist_file, split, purpose)
    except InputError as e:
        _stop(e, on_error)
    return items


def _require_cases(items, datalist_file, split: str, purpose: str) -> None:
    if items:
        return
    source = None if datalist_file is None else os.fspath(datalist_file)
    if source is not None and not os.path.isfile(source):
        raise InputError(source, f"datalist not found: {purpose} needs it (set --dataset_dir)")
    hint = (
        " Quality figures are measured on cases the model never saw: give the datalist a test split"
        " (data_prep's --test_fraction) rather than evaluating on training or validation cases."
        if split == "test"
        else ""
    )
    raise InputError(source, f"split {split!r} has no cases: nothing for {purpose}.{hint}")


def with_keys(items: Sequence[dict], aliases: Mapping[str, str]) -> list[dict]:
    """``items`` with each source key of ``aliases`` (``{"image": "ct"}``) copied to its target where that is absent.

    MONAI Label's train task sends ``{"image", "label"}`` items as ``train#dataset#data``; the bundles' datalists
    name their files ``ct``, ``avg``, ``phase0``. The training transforms apply it to each item (a ``Lambda``
    first in the chain) and the checks before training to the list, so both see the same keys. Unlike MONAI's
    ``CopyItemsd``, an existing target (our datalists' ``phase0`` beside a ``label`` of another meaning) is kept.
    """
    return [{**item, **{t: item[s] for s, t in aliases.items() if s in item and t not in item}} for item in items]


def split_case_ids(datalist_file: str | os.PathLike, split: str) -> list[str]:
    """The case ids of one split (for reports: which evaluated cases were seen in training)."""
    return [case_id(item, i) for i, item in enumerate(load_split(datalist_file, split))]


def split_sources(datalist_file: str | os.PathLike, split: str) -> list[str]:
    """The ``source`` values (the real patient a generated case came from) of one split; absent ones skipped."""
    return [str(item["source"]) for item in load_split(datalist_file, split) if item.get("source")]


# ----------------------------------------------------------------------------------------------- case ids
def case_id_of_path(path: str | os.PathLike) -> str:
    """The case a file belongs to: its name without the suffix, or its folder's name when the name says nothing
    about the case (``<case>/ct.nii.gz``, :data:`GENERIC_NAMES`). The one rule for ids taken from file names:
    datalist items (:func:`case_id`), build inputs (:mod:`data_prep.inputs`), inference inputs."""
    text = os.path.normpath(os.fspath(path))
    stem = os.path.basename(text)
    for suffix in _SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem.lower() in GENERIC_NAMES:
        parent = os.path.basename(os.path.dirname(text))
        return parent or stem
    return stem


def _filename(value):
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        name = meta["filename_or_obj"]
        return name[0] if isinstance(name, (list, tuple)) else name
    if isinstance(value, (str, os.PathLike)):
        return value
    return None


def case_id(item: Mapping | None, index: int | None = None, key: str | None = None) -> str:
    """The case name of a datalist item or a decollated batch item (the one case-id helper).

    ``id`` (its last path component: MONAI makes ids naming a case folder absolute), else ``case``, else
    the file of ``key`` (or of the first image-like value): its name without suffixes, or its folder's name
    when the file is called ``ct``, ``pa``... Falls back to ``case_<index>``.
    """
    item = item or {}
    for name in ("id", "case"):
        value = item.get(name)
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        if value is not None and not isinstance(value, (list, tuple, dict)) and str(value):
            return os.path.basename(os.path.normpath(str(value)))
    candidates = [item.get(key)] if key is not None else list(item.values())
    for value in candidates:
        filename = _filename(value)
        if filename:
            return case_id_of_path(filename)
    return f"case_{0 if index is None else index:04d}"


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}")


def safe_case_name(case: str) -> str:
    """A file-name stem for ``case`` (a case id, uid, file stem) that cannot leave the output folder.

    A name made of letters, digits, ``.``, ``_`` and ``-`` (not starting with ``.`` or ``-``, at most 120
    characters) is kept as is; anything else becomes its sanitised form plus the first 12 hex digits of
    its SHA-256 (``../../escaped`` -> ``escaped-<hash>``), so distinct names keep distinct files.
    """
    case = str(case)
    if _SAFE_NAME.fullmatch(case):
        return case
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", case).strip("-._")[:80] or "uid"
    return f"{clean}-{hashlib.sha256(case.encode()).hexdigest()[:12]}"


def split_batch(batch) -> list:
    """A collated batch (dict of batched values) as a list of per-item dicts; lists are returned as they are."""
    if batch is None:
        return []
    if isinstance(batch, (list, tuple)):
        return list(batch)
    from monai.data import decollate_batch

    return decollate_batch(batch, detach=False)


def batch_case_ids(batch) -> list[str]:
    """The case id of every item of a (collated or decollated) batch."""
    return [case_id(item, i) for i, item in enumerate(split_batch(batch))]


# ----------------------------------------------------------------------------------------------- checks
def _finite_count(array: np.ndarray) -> int:
    """Number of non-finite values (0 for integer arrays)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _check_array_slabs(array_like, shape: tuple[int, ...]) -> int:
    """Non-finite values of an on-disk array, read in slabs along its last axis."""
    if not shape:
        return _finite_count(np.asarray(array_like))
    per_slab = max(1, int(np.prod(shape[:-1])) if len(shape) > 1 else 1)
    step = max(1, _SLAB_VOXELS // per_slab)
    bad = 0
    for start in range(0, shape[-1], step):
        bad += _finite_count(np.asanyarray(array_like[..., start : start + step]))
    return bad


def inspect_file(path: str, check_values: bool = True) -> tuple[tuple[int, ...], int]:
    """``(shape, number of non-finite values)`` of an image file; NIfTI and NPY are read in slabs.

    Trailing singleton axes are dropped (2D DRRs are stored (H, W) or (H, W, 1)); the count is 0 when
    ``check_values`` is False. Unreadable files raise whatever their reader raises.
    """
    lower = path.lower()
    if lower.endswith((".nii", ".nii.gz")):
        img = load_nifti_image(path)
        shape = tuple(int(s) for s in img.shape)
        bad = _check_array_slabs(img.dataobj, shape) if check_values else 0
    elif lower.endswith(".npy"):
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        shape = tuple(int(s) for s in array.shape)
        bad = _check_array_slabs(array, shape) if check_values else 0
    elif lower.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")):
        image, _ = load_xray(path)
        shape, bad = tuple(image.shape), 0
    else:
        array = load_volume(path, dtype=None, allow_nan=True).array
        shape, bad = tuple(int(s) for s in array.shape), (_finite_count(array) if check_values else 0)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, bad


def _shape_matches(shape: Sequence[int], expected: Sequence[int | None]) -> bool:
    return len(shape) == len(expected) and all(e in (None, -1) or int(s) == int(e) for s, e in zip(shape, expected))


def validate_datalist(
    items: Sequence[dict],
    keys: Sequence[str],
    source: str | os.PathLike | None = None,
    split: str = "training",
    shapes: Mapping[str, Sequence[int | None]] | None = None,
    same_shape: Sequence[Sequence[str]] = (),
    check_values: bool = True,
    progress: bool = True,
    on_error: str = "raise",
) -> list[dict]:
    """Check every item before training; returns ``items``. Raises one :class:`InputError` naming the case.

    ``keys``: the files each item must have; ``shapes``: expected shape per key (``-1``/None: any size);
    ``same_shape``: groups of keys whose files must agree (e.g. ``[["avg", "phase0"]]``); ``check_values``:
    read the voxels and refuse NaN/inf (a single NaN voxel makes the loss NaN). ``on_error="exit"`` (the
    bundle configs) ends a command-line run with that one message instead of a traceback.
    """
    try:
        _validate(items, keys, source, split, shapes, same_shape, check_values, progress)
    except InputError as e:
        _stop(e, on_error)
    return list(items)


def _validate(items, keys, source, split, shapes, same_shape, check_values, progress) -> None:
    where_split = f"{split} split" + (f" of {os.fspath(source)}" if source is not None else "")
    _require_cases(items, source, split, purpose="training")
    shapes = dict(shapes or {})
    bar = tqdm(list(items), desc=f"check {split} datalist", unit="case", disable=not progress, leave=False)
    for index, item in enumerate(bar):
        name = case_id(item, index)
        where = f"case {name!r} ({where_split})"
        found: dict[str, tuple[int, ...]] = {}
        for key in keys:
            path = item.get(key)
            if path is None or path == "":
                raise InputError(source, f"{where}: no {key!r} entry")
            path = os.fspath(path)
            if not os.path.exists(path):
                raise InputError(path, f"{where}: {key} file not found")
            try:
                shape, bad = inspect_file(path, check_values)
            except InputError as e:
                raise InputError(path, f"{where}: {key} unreadable ({e.problem})") from None
            except Exception as e:  # readers raise many types for truncated or corrupt files
                raise InputError(path, f"{where}: {key} unreadable ({type(e).__name__}: {e})") from None
            if bad:
                raise InputError(path, f"{where}: {key} has {bad} NaN or infinite value(s)")
            if key in shapes and not _shape_matches(shape, shapes[key]):
                want = tuple("any" if e in (None, -1) else int(e) for e in shapes[key])
                raise InputError(path, f"{where}: {key} has shape {shape}, the config expects {want}")
            found[key] = shape
        for group in same_shape:
            sizes = {k: found[k] for k in group if k in found}
            if len(set(sizes.values())) > 1:
                raise InputError(item.get(group[0]), f"{where}: shapes differ: {sizes}")
