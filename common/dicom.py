"""DICOM series: find them in a folder (headers only) and stack one into a RAS :class:`Volume` in HU.

Why our own loader on top of pydicom instead of MONAI's ``PydicomReader``/``ITKReader``: both sort
and stack whatever they find and return a volume even when slices are missing, duplicated, unevenly
spaced or tilted. Here every such defect raises :class:`InputError` naming the folder or file, so a
silently wrong volume never reaches training data. ITK is used in the tests as the reference for the
geometry (``tests/test_dicom.py`` compares the affines).

Geometry: DICOM patient coordinates are LPS. With ``r``/``c`` the ImageOrientationPatient row and
column directions, ``n = r x c`` the slice normal and slices sorted by ``IPP . n`` (ascending),
the LPS affine of array index (i=column, j=row, k=slice) is ``[r*dx, c*dy, n*dz, IPP_0]``; flipping
the x and y rows gives RAS.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from common.atomic import is_partial_file
from common.errors import InputError
from common.limits import check_voxel_count
from common.volume import ORTHOGONALITY_TOL, Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Header fields copied into SeriesInfo.meta (first file of the series) for data_prep.analyze.
META_TAGS = (
    "Modality",
    "PatientID",
    "StudyInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "KVP",
    "ConvolutionKernel",
    "SliceThickness",
    "Manufacturer",
    "ManufacturerModelName",
    "ContrastBolusAgent",
    "Rows",
    "Columns",
    "PixelSpacing",
)
# Tolerances: positions are decimal strings with ~6 digits, so 1e-3 mm is far above rounding noise.
ABS_TOL_MM = 1e-3
REL_GAP_TOL = 0.01  # a gap may differ from the median gap by 1 % before the series counts as irregular
TILT_TOL = 2e-3  # in-plane drift per mm along the normal (about 0.1 degree)
ORIENTATION_TOL = 1e-4
# Where the slice spacing comes from: "positions" (ours: the step of ImagePositionPatient along the normal,
# checked for gaps and irregularity) or "slice_thickness" (PerX2CT's data_preprocessing/0_dicom2mhd.py l. 45:
# SliceThickness, which stretches series whose slices overlap, e.g. 2.5 mm thick every 1.25 mm in LIDC-IDRI).
Z_SPACINGS = ("positions", "slice_thickness")
DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is zlib'd
MAX_INFLATED_BYTES = int(os.environ.get("XRAY2CT_MAX_DICOM_INFLATED_BYTES", 256 * 2**20))


@dataclasses.dataclass
class SeriesInfo:
    """One series found by :func:`scan_dicom_folder` (headers only, no pixels read)."""

    uid: str  # SeriesInstanceUID, or a synthetic "no-uid-..." key when the header has none
    folder: str  # the deepest folder holding all its files (named in errors)
    files: list[str]
    meta: dict  # META_TAGS of the first file, JSON-friendly values

    @property
    def n_files(self) -> int:
        return len(self.files)


@dataclasses.dataclass
class FileProblem:
    path: str
    problem: str


class DicomScan(list):
    """``list[SeriesInfo]`` plus ``problems``: DICOM-looking files that could not be read."""

    def __init__(self, series: Sequence[SeriesInfo] = (), problems: Sequence[FileProblem] = ()):
        super().__init__(series)
        self.problems = list(problems)


def scan_dicom_folder(folder: str | os.PathLike, recursive: bool = True) -> DicomScan:
    """Group the DICOM files under ``folder`` by series, reading headers only.

    Non-DICOM files (no ``DICM`` marker, not parseable) are ignored; files that look like DICOM but are
    unreadable or truncated go to ``.problems``. Series are sorted by (PatientID, SeriesNumber, uid).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise InputError(folder, "DICOM folder not found")
    groups: dict[str, list[tuple[str, pydicom.Dataset]]] = {}
    problems: list[FileProblem] = []
    for path in _list_files(folder, recursive):
        try:
            ds = _read_header(path)
        except _NotDicom:
            continue
        except InputError as e:
            problems.append(FileProblem(path, e.problem))
            continue
        groups.setdefault(_series_key(ds), []).append((path, ds))
    series = [
        SeriesInfo(
            uid=uid,
            folder=os.path.commonpath([os.path.dirname(p) for p, _ in items]),
            files=[p for p, _ in items],
            meta=_meta(items[0][1]),
        )
        for uid, items in groups.items()
    ]
    series.sort(
        key=lambda s: (str(s.meta.get("PatientID") or ""), _int_or(s.meta.get("SeriesNumber")), s.uid)
    )
    return DicomScan(series, problems)


def load_dicom_series(
    folder: str | os.PathLike, series_uid: str | None = None, max_voxels: int | None = None,
    z_spacing: str = "positions",
) -> Volume:  # fmt: skip
    """Load one series from ``folder`` as a RAS volume of float32 HU (axes: column, row, slice).

    Raises :class:`InputError` when the folder holds several series and ``series_uid`` is None, when a
    DICOM file is unreadable, and for any geometry defect (see :func:`series_geometry`).
    ``max_voxels``: see :func:`common.limits.check_voxel_count`. ``z_spacing``: see :func:`load_series`.
    """
    folder = os.fspath(folder)
    scan = scan_dicom_folder(folder)
    if scan.problems:
        listing = "; ".join(f"{p.path}: {p.problem}" for p in scan.problems[:5])
        raise InputError(folder, f"{len(scan.problems)} unreadable DICOM file(s): {listing}")
    if not scan:
        raise InputError(folder, "no DICOM files found")
    if series_uid is None:
        if len(scan) > 1:
            listing = "; ".join(_describe(s) for s in scan)
            raise InputError(folder, f"{len(scan)} series found, pass series_uid to choose one: {listing}")
        info = scan[0]
    else:
        matches = [s for s in scan if s.uid == series_uid]
        if not matches:
            raise InputError(folder, f"series {series_uid} not found; present: {[s.uid for s in scan]}")
        info = matches[0]
    return load_series(info, max_voxels=max_voxels, z_spacing=z_spacing)


def load_series(info: SeriesInfo, max_voxels: int | None = None, z_spacing: str = "positions") -> Volume:
    """Read the pixels of a scanned series, checking its geometry and declared size first.

    ``z_spacing`` (:data:`Z_SPACINGS`): "positions" (default) spaces the slices as their positions do;
    "slice_thickness" uses the SliceThickness tag instead, as PerX2CT's conversion does (slices are still
    ordered and checked by position). Raises :class:`InputError` naming the file for undecodable pixels,
    non-finite rescale values or non-finite voxels, so a NaN volume is never returned.
    """
    if z_spacing not in Z_SPACINGS:
        raise ValueError(f"z_spacing must be one of {Z_SPACINGS}, got {z_spacing!r}")
    headers = read_headers(info)
    affine, order = series_geometry(headers, info.files, info.folder)
    if z_spacing == "slice_thickness":
        thickness = headers[order[0]].get("SliceThickness")
        try:
            dz = float(thickness)
        except (TypeError, ValueError):
            dz = float("nan")
        if not np.isfinite(dz) or dz <= 0:
            raise InputError(info.files[order[0]], f"z_spacing slice_thickness needs a positive SliceThickness, got {thickness!r}")
        affine = affine.copy()
        affine[:3, 2] *= dz / np.linalg.norm(affine[:3, 2])
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    check_voxel_count(info.folder, (cols, rows, len(order)), max_voxels, what="DICOM series")
    array = np.empty((cols, rows, len(order)), dtype=np.float32)  # (col i, row j, slice k)
    for k, i in enumerate(order):
        array[..., k] = _read_slice(info.files[i], (cols, rows))
    return Volume(array, affine)


def check_series_pixels(info: SeriesInfo) -> dict:
    """Decode every slice of a series one at a time (no stacking): ``{"min", "max"}`` in HU.

    Raises :class:`InputError` naming the first file whose pixel data is truncated, undecodable,
    of the wrong size or non-finite after rescaling. Memory: one slice.
    """
    headers = read_headers(info)
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    low, high = np.inf, -np.inf
    for path in info.files:
        hu = _read_slice(path, (cols, rows))
        low, high = min(low, float(hu.min())), max(high, float(hu.max()))
    return {"min": low, "max": high}


def series_warnings(info: SeriesInfo, scan: Sequence[SeriesInfo] = ()) -> list[str]:
    """Things about a series that are legal but usually a mistake (e.g. one stray slice)."""
    warnings = []
    if info.n_files == 1:
        rows, cols = info.meta.get("Rows"), info.meta.get("Columns")
        others = [s for s in scan if s is not info and s.folder == info.folder and s.n_files > 1]
        where = (
            f"; {info.folder} also holds series {others[0].uid} ({others[0].n_files} files)" if others else ""
        )
        warnings.append(
            f"single slice {os.path.basename(info.files[0])}: it becomes a {cols}x{rows}x1 volume "
            f"(a file from another series?{where})"
        )
    return warnings


def instance_number_direction(info: SeriesInfo) -> str:
    """Which way InstanceNumber runs in patient space: "superior_to_inferior", "inferior_to_superior",
    "mixed" or "unknown" (tags missing, or the slices are not axial).

    PerX2CT's conversion stacks slices by InstanceNumber (``data_preprocessing/0_dicom2mhd.py`` l. 57-74)
    and its released model reads array axis D0 as superior -> inferior (true of LIDC-IDRI-0001: instance 1
    at z = -10 mm, 133 at -340 mm); a series numbered the other way would be flipped in its pipeline. Ours
    sorts by position, so our volumes are right either way; this says when the original's would not be.
    """
    headers = read_headers(info)
    try:
        numbers = [int(h.InstanceNumber) for h in headers]
        z = [float(h.ImagePositionPatient[2]) for h in headers]
        iop = [float(v) for v in headers[0].ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError, IndexError):
        return "unknown"
    if len(headers) < 2 or abs(np.cross(iop[:3], iop[3:])[2]) < 0.5:  # one slice, or not axial
        return "unknown"
    dz = np.diff(np.asarray(z)[np.argsort(numbers, kind="stable")])  # DICOM z (LPS) grows superior
    if np.all(dz < 0):
        return "superior_to_inferior"
    if np.all(dz > 0):
        return "inferior_to_superior"
    return "mixed"


def read_headers(info: SeriesInfo) -> list[pydicom.Dataset]:
    """The headers (no pixels) of every file of a scanned series, in ``info.files`` order."""
    return [_read_header(p) for p in info.files]


def series_geometry(
    headers: Sequence[pydicom.Dataset], files: Sequence[str], folder: str
) -> tuple[np.ndarray, list[int]]:
    """RAS affine and slice order (indices into ``headers``) of one series, from headers only.

    Raises :class:`InputError` for: missing geometry tags, mismatched rows/columns/pixel spacing/
    orientation, multi-frame files, duplicate positions, gantry tilt, missing slices, uneven spacing.
    """
    for h, f in zip(headers, files, strict=True):
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if h.get(tag) is None:
                raise InputError(f, f"no {tag}: not a CT/MR image slice with known geometry")
        if int(h.get("NumberOfFrames") or 1) != 1:
            raise InputError(f, "multi-frame DICOM files are not supported")
        _require_positive(f, "PixelSpacing", h.PixelSpacing, 2)
    _require_same(headers, files, "Rows", lambda h: int(h.Rows))
    _require_same(headers, files, "Columns", lambda h: int(h.Columns))
    _require_close(headers, files, "PixelSpacing", lambda h: [float(v) for v in h.PixelSpacing], 1e-4)
    _require_close(
        headers,
        files,
        "ImageOrientationPatient",
        lambda h: [float(v) for v in h.ImageOrientationPatient],
        ORIENTATION_TOL,
    )
    iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    if max(abs(np.linalg.norm(row_dir) - 1), abs(np.linalg.norm(col_dir) - 1)) > ORTHOGONALITY_TOL:
        raise InputError(files[0], f"ImageOrientationPatient {iop.tolist()} is not made of unit vectors")
    if abs(row_dir @ col_dir) > ORTHOGONALITY_TOL:
        raise InputError(files[0], f"ImageOrientationPatient {iop.tolist()} has non-orthogonal directions")
    normal = np.cross(row_dir, col_dir)
    positions = np.asarray([[float(v) for v in h.ImagePositionPatient] for h in headers])
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    positions, along = positions[order], along[order]
    sorted_files = [files[i] for i in order]
    dy, dx = (float(v) for v in headers[0].PixelSpacing)  # PixelSpacing = [between rows, between columns]
    if len(headers) == 1:
        dz = float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0)
        if not np.isfinite(dz) or dz <= 0:
            raise InputError(files[0], f"slice thickness must be positive, got {dz}")
    else:
        dz = _check_stacking(positions, along, normal, sorted_files, folder)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dx
    lps[:3, 1] = col_dir * dy
    lps[:3, 2] = normal * dz
    lps[:3, 3] = positions[0]
    return LPS_TO_RAS @ lps, order


def _check_stacking(
    positions: np.ndarray, along: np.ndarray, normal: np.ndarray, files: Sequence[str], folder: str
) -> float:
    """Slice spacing along the normal, after checking duplicates, tilt, missing slices and regularity."""
    gaps = np.diff(along)
    dupes = np.flatnonzero(gaps < ABS_TOL_MM)
    if dupes.size:
        pairs = ", ".join(f"{files[i]} and {files[i + 1]} at {along[i]:.3f} mm" for i in dupes[:3])
        raise InputError(folder, f"{dupes.size} duplicate slice position(s): {pairs}")
    offsets = positions - positions[0]
    in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    tilted = in_plane > ABS_TOL_MM + TILT_TOL * np.abs(along - along[0])
    if np.any(tilted):
        k = int(np.flatnonzero(tilted)[-1])
        angle = np.degrees(np.arctan2(in_plane[k], abs(along[k] - along[0])))
        raise InputError(
            folder,
            f"gantry tilt / sheared stack: slices drift {in_plane[k]:.3f} mm in-plane over "
            f"{abs(along[k] - along[0]):.2f} mm ({angle:.2f} deg off the ImageOrientationPatient normal); "
            "resample it to an orthogonal grid first",
        )
    base = float(gaps.min())  # the true spacing when the only defect is missing slices
    steps = np.round(gaps / base)
    on_grid = np.abs(gaps - steps * base) <= (ABS_TOL_MM + REL_GAP_TOL * base) * steps
    if np.all(on_grid) and np.any(steps > 1):
        skipped = np.flatnonzero(steps > 1)
        details = ", ".join(f"{gaps[i]:.3f} mm after {os.path.basename(files[i])}" for i in skipped[:5])
        raise InputError(
            folder,
            f"{int(np.sum(steps - 1))} missing slice(s): gaps of {details} where the spacing is {base:.3f} mm",
        )
    if not np.all(on_grid):
        median = float(np.median(gaps))
        uneven = np.flatnonzero(np.abs(gaps - median) > ABS_TOL_MM + REL_GAP_TOL * median)
        details = ", ".join(f"{gaps[i]:.3f} mm after {os.path.basename(files[i])}" for i in uneven[:5])
        raise InputError(
            folder,
            f"irregular slice spacing: gaps from {base:.3f} to {gaps.max():.3f} mm (median {median:.3f} mm); "
            f"uneven: {details}",
        )
    return float((along[-1] - along[0]) / (len(along) - 1))


def _read_slice(path: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """One slice as float32 HU, transposed to (column i, row j); ``shape`` the expected (cols, rows)."""
    check_inflated_size(path)
    try:
        with SizedFile(path) as f:
            ds = pydicom.dcmread(f)
        slope, intercept = rescale(ds, path)
        raw = ds.pixel_array
    except InputError:
        raise
    except Exception as e:  # truncated pixel data, broken compression: pydicom/pillow raise many types
        raise InputError(path, f"cannot decode pixel data ({type(e).__name__}: {e})") from e
    if raw.ndim != 2:
        raise InputError(
            path, f"expected a single-frame grayscale slice, got pixel array of shape {raw.shape}"
        )
    if shape is not None and raw.T.shape != tuple(shape):
        raise InputError(
            path, f"pixel data is {raw.shape[1]}x{raw.shape[0]}, the header said {shape[0]}x{shape[1]}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.all(np.isfinite(hu)):
        n = int(hu.size - np.count_nonzero(np.isfinite(hu)))
        raise InputError(
            path, f"{n} voxels are NaN or infinite after rescaling (slope {slope}, intercept {intercept})"
        )
    return hu.T


def rescale(ds: pydicom.Dataset, path: str | None = None) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), defaults 1 and 0; :class:`InputError` unless both are finite."""
    values = []
    for tag, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(tag)
        try:
            value = default if raw is None or str(raw).strip() == "" else float(raw)
        except (TypeError, ValueError):
            raise InputError(path, f"{tag} {raw!r} is not a number") from None
        if not np.isfinite(value):
            raise InputError(path, f"{tag} is {value}: the voxels would not be finite")
        values.append(value)
    if values[0] == 0:
        raise InputError(path, "RescaleSlope is 0: every voxel would get the same value")
    return values[0], values[1]


def check_inflated_size(path: str, max_bytes: int | None = None) -> None:
    """Refuse a deflated DICOM whose dataset inflates beyond ``max_bytes`` (default MAX_INFLATED_BYTES).

    pydicom inflates a Deflated Explicit VR file whole, even to read its header, so a 1 MB upload
    could become 300 MB in memory; this counts the inflated bytes in 1 MiB steps first, keeping none.
    """
    limit = MAX_INFLATED_BYTES if max_bytes is None else int(max_bytes)
    try:
        with open(path, "rb") as f:
            head = f.read(144)
            if len(head) < 144 or head[128:132] != b"DICM":
                return  # no Part 10 file meta: pydicom never inflates such a file
            if head[132:136] == b"\x02\x00\x00\x00" and head[136:138] == b"UL":
                meta = f.read(min(struct.unpack("<I", head[140:144])[0], 1 << 16))  # read(n) allocates n
            else:
                meta = head[132:] + f.read(4096)  # no group length: the meta group is small
            if DEFLATED_SYNTAX not in meta:
                return
            inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
            while chunk := f.read(1 << 20):
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 20))
                    if total > limit:
                        raise InputError(
                            path,
                            f"deflated DICOM inflates to more than {limit / 2**20:.0f} MiB (decompression bomb?)",
                        )
                    chunk = inflater.unconsumed_tail
    except (OSError, zlib.error) as e:
        raise InputError(path, f"cannot read deflated DICOM ({type(e).__name__}: {e})") from e


def declared_pixel_bytes(ds: pydicom.Dataset) -> int:
    """Bytes ``ds.pixel_array`` will hold: rows x columns x frames x samples x (BitsAllocated / 8).

    Read from the header, so it is known before decoding: an RLE or JPEG file's size says nothing about it
    (a 4 MB RLE file can declare 8192^2 32-bit pixels: 256 MiB, and a float64 copy each step after).
    Bit-packed 1-bit data decodes to one byte per pixel.
    """
    bits = int(ds.get("BitsAllocated") or 8)
    per_sample = 1 if bits <= 8 else -(-bits // 8)
    dims = (ds.get("Rows"), ds.get("Columns"), ds.get("NumberOfFrames") or 1, ds.get("SamplesPerPixel") or 1)
    count = 1
    for d in dims:
        count *= max(0, int(d or 0))
    return count * per_sample


def check_pixel_bytes(path: str | None, ds: pydicom.Dataset, max_bytes: int) -> int:
    """:func:`declared_pixel_bytes`, or :class:`InputError` naming ``path`` when over ``max_bytes``."""
    nbytes = declared_pixel_bytes(ds)
    if nbytes > max_bytes:
        raise InputError(
            path,
            f"DICOM pixel data of {ds.get('Rows')} x {ds.get('Columns')} pixels, {ds.get('NumberOfFrames') or 1} "
            f"frame(s), {ds.get('SamplesPerPixel') or 1} sample(s) of {ds.get('BitsAllocated')} bits decodes to "
            f"{nbytes / 2**20:,.0f} MiB, over the limit of {max_bytes / 2**20:,.0f} MiB",
        )
    return nbytes


class SizedFile:
    """A read-only file for ``pydicom.dcmread`` whose ``read(n)`` never asks for more bytes than are left.

    pydicom reads an element with ``read(declared length)``, and Python allocates those n bytes before
    reading: a 1 KB file declaring a 4 GB element would cost 4 GB (found by tests/test_fuzz.py).
    """

    def __init__(self, path: str):
        self.name = path
        self._file = open(path, "rb")
        self._size = os.fstat(self._file.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._file.read()
        return self._file.read(min(size, max(0, self._size - self._file.tell())))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SizedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NotDicom(Exception):
    pass


def _read_header(path: str) -> pydicom.Dataset:
    check_inflated_size(path)
    try:
        with SizedFile(path) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
    except InvalidDicomError as e:
        if _has_dicm_marker(path):
            raise InputError(path, f"corrupt DICOM header ({e})") from e
        raise _NotDicom(path) from e
    except Exception as e:  # pydicom raises assorted errors on garbage inside a DICM file
        if _has_dicm_marker(path):
            raise InputError(path, f"corrupt DICOM header ({type(e).__name__}: {e})") from e
        raise _NotDicom(path) from e
    sop_class = str(getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "") or "")
    if sop_class == DICOMDIR_SOP_CLASS:
        raise _NotDicom(path)
    _check_not_truncated(path, ds)
    return ds


def _check_not_truncated(path: str, ds: pydicom.Dataset) -> None:
    """pydicom reads a truncated header without complaint; catch it from the expected pixel bytes."""
    if ds.get("Rows") is None or ds.get("Columns") is None or ds.get("BitsAllocated") is None:
        if ds.get("ImagePositionPatient") is not None or ds.get("Modality") in ("CT", "MR", "PT"):
            raise InputError(path, "truncated or incomplete image header (no Rows/Columns/BitsAllocated)")
        return
    syntax = getattr(ds.get("file_meta"), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed:
        return  # compressed pixel data: length unknown until decoded (decode errors are raised on load)
    frames = int(ds.get("NumberOfFrames") or 1)
    expected = (
        int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8 * int(ds.get("SamplesPerPixel") or 1)
    )
    size = os.path.getsize(path)
    if size < expected * frames:
        raise InputError(path, f"truncated file: {size} bytes, pixel data alone needs {expected * frames}")


def _has_dicm_marker(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _list_files(folder: str, recursive: bool) -> list[str]:
    """Candidate files, without the leftovers of interrupted atomic writes (common.atomic)."""
    if not recursive:
        return sorted(
            os.path.join(folder, n)
            for n in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, n)) and not is_partial_file(n)
        )
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        out.extend(os.path.join(root, n) for n in sorted(names) if not is_partial_file(n))
    return out


def _series_key(ds: pydicom.Dataset) -> str:
    uid = str(ds.get("SeriesInstanceUID") or "").strip()
    if uid:
        return uid
    # anonymised exports may blank the UID: fall back to fields that still separate series
    parts = [
        str(ds.get(t) or "") for t in ("StudyInstanceUID", "SeriesNumber", "SeriesDescription", "Modality")
    ]
    return "no-uid-" + "-".join(p for p in parts if p).replace(" ", "_") if any(parts) else "no-uid"


def _meta(ds: pydicom.Dataset) -> dict:
    out = {}
    for tag in META_TAGS:
        out[tag] = _jsonable(ds.get(tag))
    return out


def _jsonable(value):
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, pydicom.valuerep.DSfloat | pydicom.valuerep.DSdecimal | float):
        return float(value)
    if isinstance(value, pydicom.valuerep.IS | int):
        return int(value)
    return str(value)


def _describe(s: SeriesInfo) -> str:
    desc = s.meta.get("SeriesDescription") or "no description"
    return f"{s.uid} (series number {s.meta.get('SeriesNumber')}, {desc}, {s.n_files} files)"


def _int_or(value, default: int = -1) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _require_same(headers, files, name: str, get) -> None:
    ref = get(headers[0])
    for h, f in zip(headers, files, strict=True):
        if get(h) != ref:
            raise InputError(f, f"{name} {get(h)} differs from {ref} in {files[0]} (same series)")


def _require_positive(path: str, name: str, value, n: int) -> None:
    """A multi-valued spacing tag with ``n`` finite positive numbers (mirror images come from negatives)."""
    try:
        numbers = [
            float(v)
            for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])
        ]
    except (TypeError, ValueError):
        raise InputError(path, f"{name} {value!r} is not numeric") from None
    if len(numbers) != n or not all(np.isfinite(v) and v > 0 for v in numbers):
        raise InputError(path, f"{name} must be {n} positive numbers (mm), got {numbers}")


def _require_close(headers, files, name: str, get, tol: float) -> None:
    ref = np.asarray(get(headers[0]))
    for h, f in zip(headers, files, strict=True):
        value = np.asarray(get(h))
        if value.shape != ref.shape or np.max(np.abs(value - ref)) > tol:
            raise InputError(
                f, f"{name} {value.tolist()} differs from {ref.tolist()} in {files[0]} (same series)"
            )
