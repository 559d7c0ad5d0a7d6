"""data_prep.analyze: per-series header facts, NIfTI ranges, aggregate counts and the JSON summary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from common.errors import InputError
from common.io import save_volume
from common.volume import Volume
from data_prep.analyze import analyze_folder


@pytest.fixture()
def data_root(tmp_path, shared_data, chest_dicom_dir) -> Path:
    """Two DICOM series (one re-labelled as a sharp-kernel 100 kVp scan with a gap), NIfTI files, junk."""
    root = tmp_path / "data"
    abdomen = shared_data / "dicom" / "abdomen_ct_20slices"
    (root / "abdomen").mkdir(parents=True)
    for f in sorted(abdomen.iterdir())[:3]:
        shutil.copy(f, root / "abdomen" / f.name)
    chest_files = sorted(chest_dicom_dir.glob("*.dcm"))[10:14]
    (root / "chest").mkdir()
    (root / "sharp").mkdir()
    for f in chest_files:
        shutil.copy(f, root / "chest" / f.name)
        if f != chest_files[1]:  # leave a gap in the relabelled copy
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.KVP, ds.ConvolutionKernel = "1.2.3.9", 100, "LUNG"
            ds.save_as(root / "sharp" / f.name)
    ramp = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) * 10 - 1000
    save_volume(Volume.from_spacing(ramp, (0.5, 0.75, 2.0)), root / "nifti" / "ramp.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 6), np.float32), np.eye(4)), root / "nifti" / "drr.nii")
    (root / "nifti" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (root / "chest" / "notes.txt").write_text("not DICOM")
    (root / "junk.dcm").write_bytes(open(chest_files[0], "rb").read()[:1500])
    return root


def test_analyze_series_nifti_and_counts(data_root):
    summary = analyze_folder(data_root)
    series = {s["uid"]: s for s in summary["dicom_series"]}
    assert len(series) == 3
    chest = next(s for s in series.values() if s["patient_id"] == "LIDC-IDRI-0001" and s["uid"] != "1.2.3.9")
    assert chest["shape"] == [512, 512, 4]
    assert chest["spacing"] == [0.7031, 0.7031, 2.5]
    assert (chest["kvp"], chest["kernel"], chest["slice_thickness"]) == (120.0, "STANDARD", 2.5)
    assert (chest["manufacturer"], chest["model"], chest["contrast_agent"]) == (
        "GE MEDICAL SYSTEMS",
        "LightSpeed Plus",
        "IV",
    )
    assert chest["problem"] is None
    sharp = series["1.2.3.9"]
    assert (sharp["kvp"], sharp["kernel"], sharp["n_files"]) == (100.0, "LUNG", 3)
    assert "1 missing slice" in sharp["problem"] and sharp["shape"] is None
    abdomen = next(s for s in series.values() if s["manufacturer"] == "SIEMENS")
    assert abdomen["kernel"] == "Br38f 3" and abdomen["shape"] == [512, 512, 3]
    assert abdomen["spacing"] == [0.9766, 0.9766, 2.0]

    nifti = {n["path"]: n for n in summary["nifti"]}
    ramp = nifti[str(Path("nifti") / "ramp.nii.gz")]
    assert ramp["shape"] == [2, 3, 4] and ramp["spacing"] == [0.5, 0.75, 2.0] and ramp["orientation"] == "RAS"
    assert (ramp["min"], ramp["max"], ramp["n_nonfinite"]) == (-1000.0, -770.0, 0)
    assert nifti[str(Path("nifti") / "drr.nii")]["shape"] == [8, 6]
    assert nifti[str(Path("nifti") / "broken.nii.gz")]["problem"]

    assert [u["path"] for u in summary["unreadable"]] == ["junk.dcm"]
    counts = summary["counts"]
    assert counts["kernels"] == {"Br38f 3": 1, "LUNG": 1, "STANDARD": 1}
    assert counts["kvp"] == {"100": 1, "120": 2}
    assert counts["manufacturers"] == {"GE MEDICAL SYSTEMS": 2, "SIEMENS": 1}
    assert (counts["n_series"], counts["n_series_with_problems"]) == (3, 1)
    assert (counts["n_nifti"], counts["n_nifti_with_problems"], counts["n_unreadable_files"]) == (3, 1, 1)


def test_analyze_cli_writes_json(data_root, tmp_path, repo_root):
    out = tmp_path / "reports" / "summary.json"
    cmd = [sys.executable, "-m", "data_prep.analyze", str(data_root), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert "kernels: Br38f 3 x1, LUNG x1, STANDARD x1" in proc.stdout
    assert "3 DICOM series (1 with problems)" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["counts"]["n_series"] == 3
    assert [p.name for p in out.parent.iterdir()] == ["summary.json"]  # no temporary leftovers


def test_analyze_missing_folder(tmp_path):
    with pytest.raises(InputError, match="folder not found"):
        analyze_folder(tmp_path / "nope")


def test_analyze_skips_and_cleans_partial_files(data_root):
    """Issue 14 item 20: hidden ``.*.part*`` leftovers of a kill -9 are not inputs; stale ones are removed."""
    import os
    import time

    ramp = data_root / "nifti" / "ramp.nii.gz"
    fresh = data_root / "nifti" / ".ct.nii.gz.k2j4h1x_.part.nii.gz"
    stale = data_root / "nifti" / ".pa.nii.gz.abcd1234.part.nii.gz"
    for leftover in (fresh, stale):
        leftover.write_bytes(ramp.read_bytes()[:-20])  # half-written
    old = time.time() - 7200
    os.utime(stale, (old, old))
    summary = analyze_folder(data_root)
    assert all(".part" not in n["path"] for n in summary["nifti"]) and len(summary["nifti"]) == 3
    found = {Path(p["path"]).name: p["removed"] for p in summary["partial_files"]}
    assert found == {fresh.name: False, stale.name: True}
    assert fresh.exists() and not stale.exists()
    assert analyze_folder(data_root, clean_partial=False)["partial_files"] == [
        {"path": str(Path("nifti") / fresh.name), "removed": False}
    ]
