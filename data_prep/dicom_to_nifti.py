"""Convert every DICOM series under a folder to NIfTI (RAS, float32 HU), one file per series.

Usage::

    python -m data_prep.dicom_to_nifti <input_dir> <output_dir> [--series_uid UID] [--recursive False]

Output names: ``<PatientID>_<SeriesNumber>_<SeriesInstanceUID>.nii.gz`` (unsafe characters replaced).
A series that fails (missing slices, tilt, corrupt files...) is reported with its reason and does not
stop the others; unreadable files that belong to no series are reported too. The exit code is 1 when
anything failed, so scripts notice.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from tqdm import tqdm

from common.dicom import SeriesInfo, load_series, scan_dicom_folder
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

    @property
    def ok(self) -> bool:
        return self.error is None


def output_name(info: SeriesInfo) -> str:
    """``PatientID_SeriesNumber_uid.nii.gz`` with anything but ``[A-Za-z0-9.-]`` replaced by ``-``."""
    parts = [info.meta.get("PatientID") or "unknown", info.meta.get("SeriesNumber"), info.uid]
    return "_".join(sanitize(str(p if p is not None else "na")) for p in parts) + ".nii.gz"


def sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", text).strip("-.") or "na"


def convert_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    series_uid: str | None = None,
    recursive: bool = True,
) -> tuple[list[ConversionResult], list[str]]:
    """Convert each series; returns per-series results and the unreadable-file problems of the scan."""
    scan = scan_dicom_folder(input_dir, recursive=recursive)
    problems = [f"{p.path}: {p.problem}" for p in scan.problems]
    series = [s for s in scan if series_uid is None or s.uid == series_uid]
    if series_uid is not None and not series:
        raise InputError(input_dir, f"series {series_uid} not found; present: {[s.uid for s in scan]}")
    results = []
    for info in tqdm(series, desc="DICOM -> NIfTI", unit="series"):
        result = ConversionResult(uid=info.uid, n_files=info.n_files)
        try:
            vol = load_series(info)
            result.output = save_volume(vol, os.path.join(os.fspath(output_dir), output_name(info)))
            result.shape, result.spacing = vol.shape, tuple(round(s, 4) for s in vol.spacing)
        except InputError as e:  # a bad series is reported, the others still convert
            result.error = str(e)
        results.append(result)
    return results, problems


def format_table(results: list[ConversionResult]) -> str:
    rows = [("status", "files", "shape", "spacing (mm)", "output / reason")]
    for r in results:
        rows.append(
            (
                "ok" if r.ok else "FAILED",
                str(r.n_files),
                "x".join(map(str, r.shape)) if r.shape else "-",
                "x".join(f"{s:g}" for s in r.spacing) if r.spacing else "-",
                os.path.basename(r.output) if r.ok else r.error,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows
    )


def main(input_dir: str, output_dir: str, series_uid: str | None = None, recursive: bool = True) -> None:
    """Convert and print a summary table; exit code 1 if any series or file failed."""
    results, problems = convert_folder(input_dir, output_dir, series_uid=series_uid, recursive=recursive)
    print(format_table(results))
    for p in problems:
        print(f"UNREADABLE  {p}")
    n_failed = sum(not r.ok for r in results)
    print(f"{len(results) - n_failed} of {len(results)} series converted, {len(problems)} unreadable file(s)")
    if not results:
        print(f"no DICOM series found under {input_dir}")
    if n_failed or problems or not results:
        sys.exit(1)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
