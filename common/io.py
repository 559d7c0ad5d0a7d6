"""Volume I/O: NIfTI, HDF5, NPY (+ JSON sidecar) and DICOM series in; NIfTI, HDF5, NPY out.

Geometry survives every round trip:
- NIfTI keeps the affine in its header (sform and qform).
- HDF5 stores the voxels in dataset ``ct`` (the X2CT-GAN/PerX2CT key) with attributes
  ``affine`` (4x4, RAS), ``spacing`` and ``origin`` (redundant, for readers that ignore the affine).
- NPY writes ``<name>.json`` beside ``<name>.npy`` holding the affine and spacing.
Writes are atomic (see :mod:`common.atomic`). Every load is validated (3D, finite, spacing > 0)
and failures raise :class:`common.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import os

import h5py
import nibabel as nib
import numpy as np

from common.atomic import atomic_path, atomic_write_text
from common.errors import InputError, require_file
from common.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
HDF5_SUFFIXES = (".h5", ".hdf5")
NPY_SUFFIXES = (".npy",)
H5_KEY = "ct"


def volume_format(path: str | os.PathLike) -> str:
    """``"nifti"``, ``"hdf5"``, ``"npy"`` or ``"dicom"`` (a folder), from the path."""
    p = os.fspath(path).lower()
    if p.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if p.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if p.endswith(NPY_SUFFIXES):
        return "npy"
    if os.path.isdir(p):
        return "dicom"
    raise InputError(
        path, "unknown volume format (expected .nii, .nii.gz, .h5, .hdf5, .npy or a DICOM folder)"
    )


def load_volume(path: str | os.PathLike, dtype=np.float32, allow_nan: bool = False) -> Volume:
    """Load a volume from any supported format; the array is cast to ``dtype`` (None keeps it)."""
    path = require_file(path)
    fmt = volume_format(path)
    try:
        if fmt == "nifti":
            vol = _load_nifti(path)
        elif fmt == "hdf5":
            vol = _load_hdf5(path)
        elif fmt == "npy":
            vol = _load_npy(path)
        else:
            from common.dicom import load_dicom_series

            vol = load_dicom_series(path)
    except InputError:
        raise
    except Exception as e:  # corrupt or truncated files surface as library-specific errors
        raise InputError(path, f"cannot read {fmt} file ({type(e).__name__}: {e})") from e
    if dtype is not None:
        vol.array = vol.array.astype(dtype, copy=False)
    return vol.validate(path, allow_nan=allow_nan)


def save_volume(vol: Volume, path: str | os.PathLike, dtype=None) -> str:
    """Write ``vol`` atomically to ``path`` (format from the suffix); returns the path."""
    path = os.fspath(path)
    fmt = volume_format(path) if not os.path.isdir(path) else "dicom"
    vol.validate(path, allow_nan=True)
    array = vol.array if dtype is None else vol.array.astype(dtype)
    if fmt == "nifti":
        img = nib.Nifti1Image(array, vol.affine)
        img.set_sform(vol.affine, code=1)
        img.set_qform(vol.affine, code=1)
        img.header.set_xyzt_units("mm")
        with atomic_path(path) as tmp:
            nib.save(img, tmp)
    elif fmt == "hdf5":
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset(H5_KEY, data=array, compression="gzip", compression_opts=4)
            _write_geometry_attrs(f[H5_KEY].attrs, vol)
    elif fmt == "npy":
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
            atomic_write_text(sidecar_path(path), json.dumps(_geometry_dict(vol), indent=2))
    else:
        raise InputError(path, "writing DICOM is not supported; write NIfTI, HDF5 or NPY")
    return path


def sidecar_path(npy_path: str | os.PathLike) -> str:
    """The JSON sidecar holding an .npy volume's geometry."""
    return os.fspath(npy_path)[: -len(".npy")] + ".json"


def _geometry_dict(vol: Volume) -> dict:
    return {
        "affine": vol.affine.tolist(),
        "spacing": list(vol.spacing),
        "origin": list(vol.origin),
        "orientation": vol.orientation,
        "shape": list(vol.shape),
        "space": "RAS",
    }


def _write_geometry_attrs(attrs, vol: Volume) -> None:
    attrs["affine"] = vol.affine
    attrs["spacing"] = np.asarray(vol.spacing)
    attrs["origin"] = np.asarray(vol.origin)
    attrs["space"] = "RAS"


def _load_nifti(path: str) -> Volume:
    img = nib.load(path)
    array = np.asanyarray(img.dataobj)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got an array of shape {array.shape}")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if int(img.header["sform_code"]) == 0 and hasattr(img, "file_map"):
        # nibabel silently "fixes" a zero pixdim to 1 on load; read the header as stored
        with nib.openers.ImageOpener(img.file_map["image"].filename) as fh:
            zooms = np.asarray(type(img.header).from_fileobj(fh, check=False)["pixdim"][1:4], dtype=float)
    if not np.all(zooms > 0):
        raise InputError(path, f"voxel spacing must be positive, got {tuple(zooms)}")
    # np.asanyarray(dataobj) already applies scl_slope/scl_inter
    return Volume(np.asarray(array), img.affine)


def _load_hdf5(path: str) -> Volume:
    with h5py.File(path, "r") as f:
        if H5_KEY not in f:
            raise InputError(path, f"HDF5 file has no '{H5_KEY}' dataset (found: {list(f.keys())})")
        ds = f[H5_KEY]
        array = ds[()]
        if "affine" in ds.attrs:
            affine = np.asarray(ds.attrs["affine"], dtype=np.float64)
        elif "spacing" in ds.attrs:
            _require_positive_spacing(path, ds.attrs["spacing"])
            affine = Volume.from_spacing(array, ds.attrs["spacing"]).affine
        else:
            raise InputError(
                path, "HDF5 dataset has no 'affine' or 'spacing' attribute: voxel spacing unknown"
            )
    return Volume(array, affine)


def _load_npy(path: str) -> Volume:
    sidecar = sidecar_path(path)
    if not os.path.exists(sidecar):
        raise InputError(path, f"no geometry sidecar {os.path.basename(sidecar)}: voxel spacing unknown")
    array = np.load(path, allow_pickle=False)
    with open(sidecar) as f:
        meta = json.load(f)
    if "affine" in meta:
        affine = np.asarray(meta["affine"], dtype=np.float64)
    else:
        _require_positive_spacing(path, meta["spacing"])
        affine = Volume.from_spacing(array, meta["spacing"], meta.get("origin")).affine
    return Volume(array, affine)


def _require_positive_spacing(path: str, spacing) -> None:
    if np.any(np.asarray(spacing, dtype=float) <= 0):
        raise InputError(
            path, f"voxel spacing must be positive, got {list(np.asarray(spacing, dtype=float))}"
        )
