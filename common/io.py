"""Volume I/O: NIfTI, HDF5, NPY (+ JSON sidecar) and DICOM series in; NIfTI, HDF5, NPY out.

Geometry survives every round trip:
- NIfTI keeps the affine in its header (sform and qform).
- HDF5 stores the voxels in dataset ``ct`` (the X2CT-GAN/PerX2CT key) with attributes
  ``affine`` (4x4, RAS), ``spacing`` and ``origin`` (redundant, for readers that ignore the affine).
- NPY writes ``<name>.json`` beside ``<name>.npy`` holding the affine and spacing.
Writes are atomic (see :mod:`common.atomic`). Every load is validated (3D, finite, spacing > 0)
and failures raise :class:`common.errors.InputError` naming the file.

Before any voxel is allocated, the size a header declares is checked against the file (an
uncompressed file must hold every byte; a gzip stream cannot inflate more than 1032:1; every chunk
of an HDF5 dataset must be written) and against a voxel limit (``max_voxels`` argument, default
:data:`common.limits.MAX_VOXELS`, environment variable ``XRAY2CT_MAX_VOXELS``), so a forged 76-byte header
never costs gigabytes of memory.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct

import h5py
import nibabel as nib
import numpy as np

from common.atomic import atomic_path, atomic_write_text, is_partial_file
from common.errors import InputError, require_file
from common.limits import DEFLATE_MAX_RATIO, MAX_VOXELS, check_payload_fits, check_voxel_count  # noqa: F401
from common.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
HDF5_SUFFIXES = (".h5", ".hdf5")
NPY_SUFFIXES = (".npy",)
H5_KEY = "ct"
# NIfTI header extensions (comments, AFNI/CIFTI XML, DICOM tags) are kilobytes; nibabel reads them whole.
MAX_NIFTI_EXTENSION_BYTES = int(os.environ.get("XRAY2CT_MAX_NIFTI_EXTENSION_BYTES", 1 << 20))


def volume_format(path: str | os.PathLike) -> str:
    """``"nifti"``, ``"hdf5"``, ``"npy"`` or ``"dicom"`` (a folder), from the path."""
    p = os.fspath(path).lower()
    if is_partial_file(p):
        raise InputError(path, "unfinished temporary file left by an interrupted write, not a volume")
    if p.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if p.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if p.endswith(NPY_SUFFIXES):
        return "npy"
    if os.path.isdir(path):  # the path as given: folder names may have capitals
        return "dicom"
    raise InputError(
        path, "unknown volume format (expected .nii, .nii.gz, .h5, .hdf5, .npy or a DICOM folder)"
    )


def load_volume(
    path: str | os.PathLike, dtype=np.float32, allow_nan: bool = False, max_voxels: int | None = None
) -> Volume:
    """Load a volume from any supported format; the array is cast to ``dtype`` (None keeps it).

    ``max_voxels`` (default :data:`MAX_VOXELS`): larger declared volumes are refused before loading.
    """
    path = require_file(path)
    fmt = volume_format(path)
    try:
        if fmt == "nifti":
            vol = _load_nifti(path, max_voxels)
        elif fmt == "hdf5":
            vol = _load_hdf5(path, max_voxels)
        elif fmt == "npy":
            vol = _load_npy(path, max_voxels)
        else:
            # imported here: pydicom is needed only for DICOM input (the GPU machine and NIfTI-only users lack it)
            from common.dicom import load_dicom_series

            vol = load_dicom_series(path, max_voxels=max_voxels)
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


def read_nifti_header(
    path: str | os.PathLike, max_voxels: int | None = None, max_extension_bytes: int | None = None
) -> dict:
    """Check a .nii/.nii.gz header ourselves, before ``nib.load`` reads (and inflates) its extensions.

    ``nib.load`` reads every header extension into memory before any check of ours can run, and trusts
    each extension's declared size: a 1.2 MB ``.nii.gz`` with a 1.2 GB extension costs 1.2 GB, an
    extension size below 8 or a ``vox_offset`` inside the header makes it read the whole file. Here the
    348-byte NIfTI-1 (540-byte NIfTI-2) header is read (gzip: only its first bytes are inflated),
    ``dim`` is checked against ``max_voxels``, and the extensions must fit in ``vox_offset`` and in
    ``max_extension_bytes`` (default :data:`MAX_NIFTI_EXTENSION_BYTES`, ``XRAY2CT_MAX_NIFTI_EXTENSION_BYTES``).
    Returns ``{"version", "shape", "vox_offset", "extension_bytes"}``; :class:`InputError` naming the file.
    """
    path = os.fspath(path)
    limit = MAX_NIFTI_EXTENSION_BYTES if max_extension_bytes is None else int(max_extension_bytes)
    opener = gzip.open if path.lower().endswith(".gz") else open  # as nibabel chooses: by the suffix
    try:
        with opener(path, "rb") as fh:
            head = fh.read(544)
            version, endian, size = _nifti_version(head, path)
            if version == 1:
                ndim, *dims = struct.unpack_from(endian + "8h", head, 40)
                vox_offset = float(struct.unpack_from(endian + "f", head, 108)[0])
            else:
                ndim, *dims = struct.unpack_from(endian + "8q", head, 16)
                vox_offset = float(struct.unpack_from(endian + "q", head, 168)[0])
            if not 1 <= ndim <= 7:
                raise InputError(path, f"NIfTI header dim[0] = {ndim}: not 1 to 7 dimensions")
            shape = tuple(int(d) for d in dims[:ndim])
            check_voxel_count(path, shape, max_voxels)
            if not math.isfinite(vox_offset) or vox_offset < 0:
                raise InputError(path, f"NIfTI vox_offset {vox_offset} is not a non-negative number")
            flag = head[size : size + 4]
            extension_bytes = 0
            if len(flag) == 4 and flag[0] != 0:
                extension_bytes = int(vox_offset) - (size + 4)
                if extension_bytes < 0:
                    raise InputError(
                        path,
                        f"NIfTI header announces extensions but vox_offset {vox_offset:.0f} lies inside the "
                        "header (nibabel would read the whole file as extensions)",
                    )
                if extension_bytes > limit:
                    raise InputError(
                        path,
                        f"NIfTI header extensions take {extension_bytes:,} bytes, over the limit of {limit:,} "
                        "(XRAY2CT_MAX_NIFTI_EXTENSION_BYTES raises it for genuine files)",
                    )
                _check_nifti_extensions(
                    head[size + 4 :] + fh.read(extension_bytes), extension_bytes, endian, path
                )
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(path, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
    return {"version": version, "shape": shape, "vox_offset": vox_offset, "extension_bytes": extension_bytes}


def _nifti_version(head: bytes, path: str) -> tuple[int, str, int]:
    """(1 or 2, struct byte order, header size) from ``sizeof_hdr``, in either byte order."""
    if len(head) >= 4:
        for endian in "<>":
            sizeof_hdr = struct.unpack_from(endian + "i", head)[0]
            if sizeof_hdr in (348, 540) and len(head) >= sizeof_hdr:
                return (1 if sizeof_hdr == 348 else 2), endian, sizeof_hdr
    raise InputError(path, f"not a NIfTI-1/2 file: no 348- or 540-byte header in the first {len(head)} bytes")


def _check_nifti_extensions(block: bytes, size: int, endian: str, path: str) -> None:
    """Walk the extensions as nibabel does (``esize`` includes its 8-byte head); each must fit in ``size``."""
    pos = 0
    while size >= 16:  # nibabel's loop condition
        if pos + 8 > len(block):
            raise InputError(path, "NIfTI header extension is truncated")
        esize = struct.unpack_from(endian + "i", block, pos)[0]
        if esize < 8 or esize > size:
            raise InputError(
                path, f"NIfTI header extension declares {esize} bytes where {size} remain before the data"
            )
        pos, size = pos + esize, size - esize


def check_nifti_header(img, path: str, max_voxels: int | None = None) -> None:
    """Declared shape of a loaded (not yet read) NIfTI image against the limit and the file size."""
    shape = img.shape
    check_voxel_count(path, shape, max_voxels)
    itemsize = np.dtype(img.get_data_dtype()).itemsize
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    check_payload_fits(
        path, offset, math.prod(int(s) for s in shape) * itemsize, path.lower().endswith(".gz")
    )


def load_nifti_image(path: str, max_voxels: int | None = None):
    """``nib.load`` of a file of unknown origin: its raw header checked first, its declared size after.

    Voxels stay unread (``img.dataobj`` is a proxy). :class:`InputError` naming the file.
    """
    read_nifti_header(path, max_voxels)
    img = nib.load(path)
    check_nifti_header(img, path, max_voxels)
    return img


def _load_nifti(path: str, max_voxels: int | None = None) -> Volume:
    img = load_nifti_image(path, max_voxels)
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


HDF5_LAYOUTS = {h5py.h5d.COMPACT: "compact", h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.CHUNKED: "chunked"}


def _check_hdf5_link(f: h5py.File, path: str) -> None:
    """``ct`` must be a hard link: an external or soft link would open another file or name.

    Checked before ``f[H5_KEY]`` is touched, since resolving an external link already opens its file.
    """
    link = f.get(H5_KEY, getlink=True)
    if link is None:
        raise InputError(path, f"HDF5 file has no '{H5_KEY}' dataset (found: {list(f.keys())})")
    if not isinstance(link, h5py.HardLink):
        target = getattr(link, "filename", None) or getattr(link, "path", None)
        raise InputError(
            path,
            f"HDF5 '{H5_KEY}' is a {type(link).__name__} to {target!r}: only data stored in the file is read",
        )


def _check_hdf5_storage(ds: h5py.Dataset, path: str) -> None:
    """Only bytes stored inside this file: HDF5 can point a dataset at any other file on the host.

    External storage (raw bytes of e.g. /etc/shadow read as voxels) and virtual datasets (mapped from
    other files) are refused; compact, contiguous and chunked layouts are kept.
    """
    if ds.external:
        files = sorted({os.fsdecode(e[0]) for e in ds.external})
        raise InputError(path, f"HDF5 dataset '{H5_KEY}' is stored in external file(s) {files}: refused")
    if ds.is_virtual:
        raise InputError(
            path, f"HDF5 dataset '{H5_KEY}' is a virtual dataset mapped from other files: refused"
        )
    layout = ds.id.get_create_plist().get_layout()
    if layout not in HDF5_LAYOUTS:
        raise InputError(
            path, f"HDF5 dataset '{H5_KEY}' has storage layout {layout}: only compact, contiguous or chunked"
        )


def _check_hdf5_dataset(ds, path: str, max_voxels: int | None) -> None:
    """Every byte of the dataset must be stored: unwritten chunks or space would read as fill values."""
    if not isinstance(ds, h5py.Dataset):
        raise InputError(path, f"'{H5_KEY}' is an HDF5 group, not a dataset")
    _check_hdf5_storage(ds, path)
    count = check_voxel_count(path, ds.shape, max_voxels)
    nbytes = count * ds.dtype.itemsize
    stored = int(ds.id.get_storage_size())
    if ds.chunks is None:
        if ds.compression is None and stored < nbytes:
            raise InputError(
                path, f"HDF5 dataset '{H5_KEY}' stores {stored:,} of its {nbytes:,} bytes (never written)"
            )
        offset = ds.id.get_offset()
        if offset is not None:
            check_payload_fits(path, int(offset), nbytes, compressed=False)
        return
    n_chunks = math.prod(math.ceil(s / c) for s, c in zip(ds.shape, ds.chunks, strict=True))
    written = int(ds.id.get_num_chunks())
    if written < n_chunks:
        raise InputError(
            path,
            f"HDF5 dataset '{H5_KEY}' has {written} of its {n_chunks} chunks written "
            "(the rest would read as zeros): interrupted or forged file",
        )
    if ds.compression in (None, "gzip") and ds.scaleoffset is None and stored * DEFLATE_MAX_RATIO < nbytes:
        raise InputError(path, f"HDF5 dataset '{H5_KEY}' stores {stored:,} bytes, too few for {nbytes:,}")


def _load_hdf5(path: str, max_voxels: int | None = None) -> Volume:
    with h5py.File(path, "r") as f:
        _check_hdf5_link(f, path)
        ds = f[H5_KEY]
        _check_hdf5_dataset(ds, path, max_voxels)
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


def read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file, without reading its data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InputError(path, f"unsupported .npy format version {version}")
        return tuple(int(s) for s in shape), np.dtype(dtype), f.tell()


def _load_npy(path: str, max_voxels: int | None = None) -> Volume:
    sidecar = sidecar_path(path)
    if not os.path.exists(sidecar):
        raise InputError(path, f"no geometry sidecar {os.path.basename(sidecar)}: voxel spacing unknown")
    shape, dtype, offset = read_npy_header(path)
    if dtype.hasobject:
        raise InputError(path, "object arrays are refused (they would need unpickling)")
    count = check_voxel_count(path, shape, max_voxels)
    check_payload_fits(path, offset, count * dtype.itemsize, compressed=False)
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
