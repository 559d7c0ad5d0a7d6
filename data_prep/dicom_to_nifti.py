"""Convert every DICOM series under a folder to NIfTI (RAS, float32 HU), one file per series.

Usage::

    python -m data_prep.dicom_to_nifti <input_dir> <output_dir> [--series_uid UID] [--recursive False] \
        [--z_spacing positions|slice_thickness]

Output names: ``<PatientID>_<SeriesNumber>_<SeriesInstanceUID>.nii.gz`` (unsafe characters replaced;
when that changed the key, e.g. the synthetic key of a series without a SeriesInstanceUID, a short hash
of the original key is appended so ``Lung (soft)`` and ``Lung [soft]`` never share a file). An existing
output is never overwritten silently: it is kept and reported as ``exists`` unless ``--overwrite True``.
A series that fails (missing slices, tilt, corrupt files, non-finite rescale values...) is reported
with its reason and does not stop the others; unreadable files that belong to no series are reported
too. Legal but suspicious series (a single slice, likely a stray file) are converted with a WARNING.
``--z_spacing slice_thickness`` spaces slices by their SliceThickness tag as PerX2CT's conversion does
(``data_preprocessing/0_dicom2mhd.py`` l. 45), to feed its released model data like its training data:
a series whose slices overlap (thicker than their step) is then stretched along z, and a WARNING says
so, and also when InstanceNumber runs inferior -> superior (PerX2CT's conversion, which stacks by
InstanceNumber, would flip that series; ours sorts by position either way).
The exit code is 1 when anything failed, so scripts notice. Leftovers of a killed earlier run (hidden
``.*.part*`` files in the output folder) are removed first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys

import numpy as np
from tqdm import tqdm

from common.atomic import remove_partial_files
from common.dicom import (
    Z_SPACINGS,
    SeriesInfo,
    instance_number_direction,
    load_series,
    read_headers,
    scan_dicom_folder,
    series_geometry,
    series_warnings,
)
from common.errors import InputError
from common.io import save_volume


@dataclasses.dataclass
class ConversionResult:
    uid: str
    n_files: int
    output: str | None = None
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    error: str | None = None
    exists: bool = False  # the output was already there and was kept
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        if not self.ok:
            return "FAILED"
        return "exists" if self.exists else ("WARNING" if self.warnings else "ok")


def output_name(info: SeriesInfo) -> str:
    """``PatientID_SeriesNumber_uid.nii.gz`` with anything but ``[A-Za-z0-9.-]`` replaced by ``-``.

    Sanitising can map two keys to one name (``Lung (soft)`` / ``Lung [soft]``): a part that changed gets
    the first 8 hex digits of its SHA-1 appended, so distinct keys always give distinct names.
    """
    parts = [info.meta.get("PatientID") or "unknown", info.meta.get("SeriesNumber"), info.uid]
    return "_".join(safe_part(str(p if p is not None else "na")) for p in parts) + ".nii.gz"


def safe_part(text: str) -> str:
    """``sanitize(text)``, plus a hash of ``text`` when sanitising lost information."""
    clean = sanitize(text)
    if clean == text:
        return clean
    return f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-.") or "na"


def convert_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    series_uid: str | None = None,
    recursive: bool = True,
    overwrite: bool = False,
    z_spacing: str = "positions",
) -> tuple[list[ConversionResult], list[str]]:
    """Convert each series; returns per-series results and the unreadable-file problems of the scan.

    ``z_spacing``: "positions" (slice step from ImagePositionPatient) or "slice_thickness" (PerX2CT's)."""
    if z_spacing not in Z_SPACINGS:
        raise ValueError(f"z_spacing must be one of {Z_SPACINGS}, got {z_spacing!r}")
    scan = scan_dicom_folder(input_dir, recursive=recursive)
    problems = [f"{p.path}: {p.problem}" for p in scan.problems]
    series = [s for s in scan if series_uid is None or s.uid == series_uid]
    if series_uid is not None and not series:
        raise InputError(input_dir, f"series {series_uid} not found; present: {[s.uid for s in scan]}")
    output_dir = os.fspath(output_dir)
    remove_partial_files(output_dir, recursive=False)
    results, used = [], set()
    for info in tqdm(series, desc="DICOM -> NIfTI", unit="series"):
        result = ConversionResult(uid=info.uid, n_files=info.n_files, warnings=series_warnings(info, scan))
        name, k = output_name(info), 2
        while name in used:  # distinct keys never collide (see output_name); this is a last guard
            name, k = output_name(info)[: -len(".nii.gz")] + f"-{k}.nii.gz", k + 1
        used.add(name)
        target = os.path.join(output_dir, name)
        results.append(result)
        if os.path.exists(target) and not overwrite:
            result.output, result.exists = target, True
            continue
        try:
            vol = load_series(info, z_spacing=z_spacing)
            vol.validate(info.folder)  # never write NaN/inf voxels (load_series already refuses them)
            if z_spacing == "slice_thickness":
                result.warnings += _perx2ct_warnings(info, vol)
            result.output = save_volume(vol, target)
            result.shape, result.spacing = vol.shape, tuple(round(s, 4) for s in vol.spacing)
        except InputError as e:  # a bad series is reported, the others still convert
            result.error = str(e)
    return results, problems


def _perx2ct_warnings(info: SeriesInfo, vol) -> list[str]:
    """What ``z_spacing=slice_thickness`` (PerX2CT's convention) changes for this series."""
    out = []
    by_position = _series_step(info)
    if by_position is not None and abs(vol.spacing[2] - by_position) > 1e-3:
        out.append(
            f"z spacing {vol.spacing[2]:g} mm from SliceThickness, slices are {by_position:g} mm apart: "
            f"stretched x{vol.spacing[2] / by_position:.3g} along z, as in PerX2CT"
        )
    direction = instance_number_direction(info)
    if direction == "inferior_to_superior":
        out.append("InstanceNumber runs inferior -> superior: PerX2CT's conversion would flip this series in z")
    return out


def _series_step(info: SeriesInfo) -> float | None:
    """The slice step (mm) from the positions, None for a single slice or an invalid series."""
    if info.n_files < 2:
        return None
    try:
        affine, _ = series_geometry(read_headers(info), info.files, info.folder)
    except InputError:
        return None
    return float(np.linalg.norm(affine[:3, 2]))


def format_table(results: list[ConversionResult]) -> str:
    rows = [("status", "files", "shape", "spacing (mm)", "output / reason")]
    for r in results:
        if not r.ok:
            detail = r.error
        elif r.exists:
            detail = f"{os.path.basename(r.output)} already exists, kept (--overwrite True replaces it)"
        else:
            detail = os.path.basename(r.output)
        if r.ok and r.warnings:
            detail += "  WARNING: " + "; ".join(r.warnings)
        rows.append(
            (
                r.status,
                str(r.n_files),
                "x".join(map(str, r.shape)) if r.shape else "-",
                "x".join(f"{s:g}" for s in r.spacing) if r.spacing else "-",
                detail,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows
    )


def main(
    input_dir: str,
    output_dir: str,
    series_uid: str | None = None,
    recursive: bool = True,
    overwrite: bool = False,
    z_spacing: str = "positions",
) -> None:
    """Convert and print a summary table; exit code 1 if any series or file failed.

    ``z_spacing``: "positions" (default) or "slice_thickness" (PerX2CT's conversion; see the module doc)."""
    results, problems = convert_folder(
        input_dir, output_dir, series_uid=series_uid, recursive=recursive, overwrite=overwrite,
        z_spacing=z_spacing,
    )  # fmt: skip
    print(format_table(results))
    for p in problems:
        print(f"UNREADABLE  {p}")
    n_failed = sum(not r.ok for r in results)
    n_kept = sum(r.exists for r in results)
    n_warned = sum(bool(r.warnings) for r in results if r.ok)
    kept = f" ({n_kept} already there, kept)" if n_kept else ""
    warned = f", {n_warned} with warnings" if n_warned else ""
    print(
        f"{len(results) - n_failed} of {len(results)} series converted{kept}{warned}, "
        f"{len(problems)} unreadable file(s)"
    )
    if not results:
        print(f"no DICOM series found under {input_dir}")
    if n_failed or problems or not results:
        sys.exit(1)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
