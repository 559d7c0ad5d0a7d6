"""Survey a data folder before training: what scanners, kernels, doses and geometries does it hold?

Usage::

    python -m data_prep.analyze <dir> [--out summary.json] [--decode True] [--clean_partial True]

Reports every DICOM series (kVp, convolution kernel, slice thickness, spacing, shape, manufacturer,
model, contrast agent; geometry defects such as a zero or negative PixelSpacing as ``problem``;
suspicious but legal facts such as a single stray slice as ``warnings``) and every NIfTI file (shape,
spacing, orientation, value range). Prints a table and aggregate counts (kernel histogram...); ``--out``
writes the same as JSON, atomically.

By default DICOM is checked from headers only, which keeps it fast on large archives but cannot see
truncated or corrupt (compressed) pixel data or non-finite rescaled values: ``--decode True`` decodes
every slice, one at a time, and adds the HU range. The summary's ``checks`` says what was and was not
checked. NIfTI voxels are always read (after their declared size was checked against the file).
Hidden leftovers of interrupted atomic writes (``.*.part*``, :mod:`common.atomic`) are never read as
inputs; they are listed under ``partial_files`` and, unless ``--clean_partial False``, those untouched
for an hour are deleted.
"""

from __future__ import annotations

import collections
import json
import os

import nibabel as nib
import numpy as np
from tqdm import tqdm

from common.atomic import (
    DEFAULT_STALE_S,
    atomic_write_text,
    find_partial_files,
    is_partial_file,
    remove_partial_files,
)
from common.dicom import (
    SeriesInfo,
    check_series_pixels,
    read_headers,
    scan_dicom_folder,
    series_geometry,
    series_warnings,
)
from common.errors import InputError
from common.io import NIFTI_SUFFIXES, check_nifti_header, read_nifti_header

HEADER_CHECKS = [
    "DICOM headers: readable, not truncated (uncompressed pixel data length), geometry tags present",
    "DICOM geometry: positive PixelSpacing, consistent rows/columns/orientation, no duplicate, missing, "
    "tilted or unevenly spaced slices",
    "NIfTI: declared size against the file, every voxel read (range, non-finite count), positive spacing",
]
DECODE_CHECK = (
    "DICOM pixel data: every slice decoded (truncated or corrupt compressed data, finite rescaled HU)"
)
NOT_DECODED = (
    "DICOM pixel data was not decoded: truncated or corrupt compressed pixels and non-finite rescaled HU "
    "go unnoticed (run with --decode True)"
)


def analyze_folder(
    root: str | os.PathLike,
    decode: bool = False,
    clean_partial: bool = True,
    stale_s: float = DEFAULT_STALE_S,
) -> dict:
    """The summary dict: ``dicom_series``, ``nifti``, ``unreadable``, ``partial_files``, ``checks``, ``counts``.

    ``decode``: also decode every DICOM slice (slow; see the module docstring). ``clean_partial``:
    delete leftovers of interrupted writes not modified for ``stale_s`` seconds.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputError(root, "folder not found")
    partial = find_partial_files(root)
    removed = set(remove_partial_files(root, min_age_s=stale_s)) if clean_partial else set()
    scan = scan_dicom_folder(root)
    series = [
        describe_series(s, decode=decode, scan=scan) for s in tqdm(scan, desc="DICOM series", unit="series")
    ]
    nifti_paths = sorted(
        os.path.join(d, n)
        for d, _, names in os.walk(root)
        for n in names
        if n.lower().endswith(NIFTI_SUFFIXES) and not is_partial_file(n)
    )
    nifti = [describe_nifti(p, root) for p in tqdm(nifti_paths, desc="NIfTI files", unit="file")]
    unreadable = [{"path": os.path.relpath(p.path, root), "problem": p.problem} for p in scan.problems]
    not_checked = [] if decode else [NOT_DECODED]
    return {
        "root": os.path.abspath(root),
        "dicom_series": series,
        "nifti": nifti,
        "unreadable": unreadable,
        "partial_files": [{"path": os.path.relpath(p, root), "removed": p in removed} for p in partial],
        "checks": {"checked": HEADER_CHECKS + ([DECODE_CHECK] if decode else []), "not_checked": not_checked},
        "counts": aggregate(series, nifti, unreadable),
    }


def describe_series(info: SeriesInfo, decode: bool = False, scan=()) -> dict:
    """Header facts of one series; geometry from positions, defects as ``problem``; pixels only with ``decode``."""
    meta = info.meta
    row = {
        "uid": info.uid,
        "patient_id": meta.get("PatientID"),
        "series_number": meta.get("SeriesNumber"),
        "description": meta.get("SeriesDescription"),
        "modality": meta.get("Modality"),
        "n_files": info.n_files,
        "kvp": meta.get("KVP"),
        "kernel": _kernel(meta.get("ConvolutionKernel")),
        "slice_thickness": meta.get("SliceThickness"),
        "manufacturer": meta.get("Manufacturer"),
        "model": meta.get("ManufacturerModelName"),
        "contrast_agent": meta.get("ContrastBolusAgent"),
        "shape": None,
        "spacing": None,
        "problem": None,
        "warnings": series_warnings(info, scan),
        "pixels_decoded": False,
        "hu_min": None,
        "hu_max": None,
    }
    try:
        headers = read_headers(info)
        affine, _ = series_geometry(headers, info.files, info.folder)
        row["shape"] = [int(meta["Columns"]), int(meta["Rows"]), info.n_files]
        row["spacing"] = [round(float(s), 4) for s in np.linalg.norm(affine[:3, :3], axis=0)]
        if decode:
            hu = check_series_pixels(info)
            row["pixels_decoded"], row["hu_min"], row["hu_max"] = True, hu["min"], hu["max"]
    except InputError as e:
        row["problem"] = str(e)
    return row


def describe_nifti(path: str, root: str) -> dict:
    row = {"path": os.path.relpath(path, root), "shape": None, "spacing": None, "orientation": None}
    row.update({"min": None, "max": None, "n_nonfinite": None, "problem": None})
    try:
        read_nifti_header(path, max_voxels=2**62)  # header extensions before nib.load; size below
        img = nib.load(path)
        row["shape"] = [int(s) for s in img.shape]
        check_nifti_header(img, path)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        row["spacing"] = [round(float(z), 4) for z in img.header.get_zooms()[: min(3, data.ndim)]]
        row["orientation"] = "".join(nib.orientations.aff2axcodes(img.affine)) if data.ndim >= 3 else None
        finite = np.isfinite(data)
        row["n_nonfinite"] = int(data.size - np.count_nonzero(finite))
        if finite.any():
            row["min"], row["max"] = float(data[finite].min()), float(data[finite].max())
        if not all(z > 0 for z in row["spacing"]):
            row["problem"] = f"voxel spacing must be positive, got {row['spacing']}"
    except InputError as e:
        row["problem"] = e.problem
    except Exception as e:  # corrupt/truncated files: nibabel, gzip and zlib raise many types
        row["problem"] = f"{type(e).__name__}: {e}"
    return row


def aggregate(series: list[dict], nifti: list[dict], unreadable: list[dict]) -> dict:
    def histogram(key: str) -> dict:
        counts = collections.Counter(_label(s[key]) for s in series)
        return dict(sorted(counts.items()))

    return {
        "n_series": len(series),
        "n_series_with_problems": sum(s["problem"] is not None for s in series),
        "n_nifti": len(nifti),
        "n_nifti_with_problems": sum(n["problem"] is not None for n in nifti),
        "n_unreadable_files": len(unreadable),
        "n_series_with_warnings": sum(bool(s["warnings"]) for s in series),
        "kernels": histogram("kernel"),
        "manufacturers": histogram("manufacturer"),
        "kvp": histogram("kvp"),
        "slice_thickness": histogram("slice_thickness"),
        "contrast_agent": histogram("contrast_agent"),
        "modality": histogram("modality"),
    }


def format_report(summary: dict) -> str:
    lines = []
    if summary["dicom_series"]:
        lines.append(
            _table(
                [
                    "series",
                    "files",
                    "shape",
                    "spacing",
                    "kVp",
                    "kernel",
                    "thick",
                    "manufacturer / model",
                    "contrast",
                    "problem",
                ],
                [
                    [
                        f"{s['patient_id'] or '?'}/#{s['series_number']}",
                        s["n_files"],
                        _x(s["shape"]),
                        _x(s["spacing"]),
                        _label(s["kvp"]),
                        s["kernel"],
                        _label(s["slice_thickness"]),
                        f"{s['manufacturer']} / {s['model']}",
                        s["contrast_agent"],
                        s["problem"] or ("WARNING: " + "; ".join(s["warnings"]) if s["warnings"] else ""),
                    ]
                    for s in summary["dicom_series"]
                ],
            )
        )
    if summary["nifti"]:
        lines.append(
            _table(
                ["nifti", "shape", "spacing", "orient", "min", "max", "problem"],
                [
                    [
                        n["path"],
                        _x(n["shape"]),
                        _x(n["spacing"]),
                        n["orientation"],
                        _num(n["min"]),
                        _num(n["max"]),
                        n["problem"] or "",
                    ]
                    for n in summary["nifti"]
                ],
            )
        )
    for u in summary["unreadable"]:
        lines.append(f"UNREADABLE {u['path']}: {u['problem']}")
    for p in summary.get("partial_files", []):
        state = "removed" if p["removed"] else "ignored"
        lines.append(f"PARTIAL {p['path']}: leftover of an interrupted write, {state}")
    c = summary["counts"]
    lines.append(
        f"{c['n_series']} DICOM series ({c['n_series_with_problems']} with problems), {c['n_nifti']} NIfTI files "
        f"({c['n_nifti_with_problems']} with problems), {c['n_unreadable_files']} unreadable files"
    )
    for key in ("kernels", "manufacturers", "kvp", "slice_thickness", "contrast_agent"):
        if c[key]:
            lines.append(f"{key}: " + ", ".join(f"{k} x{v}" for k, v in c[key].items()))
    for item in summary.get("checks", {}).get("not_checked", []):
        lines.append(f"NOT CHECKED: {item}")
    return "\n".join(lines)


def main(root: str, out: str | None = None, decode: bool = False, clean_partial: bool = True) -> None:
    """Print the survey of ``root``; with ``--out`` also write it as JSON."""
    summary = analyze_folder(root, decode=decode, clean_partial=clean_partial)
    print(format_report(summary))
    if out:
        atomic_write_text(out, json.dumps(summary, indent=2))
        print(f"summary written to {out}")


def _label(value) -> str:
    if value is None:
        return "unknown"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _kernel(value) -> str | None:
    if value is None:
        return None
    return " ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _x(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) if values else "-"


def _num(value) -> str:
    return "-" if value is None else f"{value:g}"


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in cells
    )


if __name__ == "__main__":
    import fire

    fire.Fire(main)
