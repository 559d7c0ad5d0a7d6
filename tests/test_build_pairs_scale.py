"""build_pairs at scale: workers, parts + merge, resume after a kill, settings mismatch, splits by patient,
the papers' split files, hidden leftovers, the plastimatch renderer. Tiny phantoms (a few seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from numerics import reorder_atol

from common.errors import InputError
from common.io import load_volume, save_volume
from data_prep import splits as split_lists
from data_prep.build_pairs import (
    CASE_META_FILE,
    assign_splits,
    build_pairs,
    find_inputs,
    merge_parts,
    plan_cases,
)
from data_prep.phantom import make_phantom

KW = dict(size=12, spacing=20.0, drr_pixels=12)  # 240 mm cube, 12x12 DRRs: ~0.1 s per case
REPO = Path(__file__).resolve().parents[1]


def _write_phantoms(folder: Path, names, shape=(20, 20, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        vol, _ = make_phantom(shape, spacing=(12.0, 12.0, 15.0), seed=i, noise_hu=0)
        save_volume(vol, folder / f"{name}.nii.gz")
    return folder


def _datalist(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _ids(datalist: dict) -> dict[str, list[str]]:
    return {s: sorted(e["id"] for e in datalist[s]) for s in ("training", "validation", "test")}


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> Path:
    return _write_phantoms(tmp_path_factory.mktemp("six"), [f"case{i}" for i in range(6)])


def test_workers_and_parts_build_the_same_dataset(six, tmp_path):
    """1 process, 2 processes and 3 parts (run one after the other; the last merges) give one dataset."""
    one = build_pairs(str(six), str(tmp_path / "one"), val_fraction=0.2, test_fraction=0.2, **KW)
    two = build_pairs(str(six), str(tmp_path / "two"), workers=2, val_fraction=0.2, test_fraction=0.2, **KW)
    assert sorted(one["written"]) == sorted(two["written"]) == [f"case{i}" for i in range(6)]
    parts = [
        build_pairs(
            str(six),
            str(tmp_path / "parts"),
            part_index=i,
            total_parts=3,
            val_fraction=0.2,
            test_fraction=0.2,
            **KW,
        )  # fmt: skip
        for i in range(3)
    ]
    assert parts[0]["datalist"] is None and parts[1]["datalist"] is None  # parts 2 (then 1, 2) missing
    assert parts[2]["datalist"] == str(tmp_path / "parts" / "dataset.json")
    reference = _ids(_datalist(tmp_path / "one"))
    assert sum(map(len, reference.values())) == 6
    for other in ("two", "parts"):
        assert _ids(_datalist(tmp_path / other)) == reference
        for case in reference["training"] + reference["test"]:
            planes = max(nib.load(tmp_path / "one" / case / "ct.nii.gz").shape)
            for name in ("ct", "pa", "lateral"):
                a = np.asarray(nib.load(tmp_path / "one" / case / f"{name}.nii.gz").dataobj)
                b = np.asarray(nib.load(tmp_path / other / case / f"{name}.nii.gz").dataobj)
                # same int16 CT, DRRs in [0, 1] possibly summed in another order (another process's threads):
                # float32 sums of 4 bilinear taps x the planes (tests/numerics.py)
                np.testing.assert_allclose(a, b, rtol=0, atol=reorder_atol(1.0, 4 * planes, 1, torch.float32))
    report = json.loads((tmp_path / "parts" / "build_report.json").read_text())
    assert report["total_parts"] == 3 and len(report["written"]) == 6
    assert set(report["seconds_per_case"]) >= {"load", "prepare", "drr", "write", "total"}


def test_merge_refuses_unfinished_or_stale_parts(six, tmp_path):
    out = tmp_path / "out"
    build_pairs(str(six), str(out), part_index=0, total_parts=2, **KW)
    with pytest.raises(InputError, match=r"parts \[1\] of 2 have not finished"):
        merge_parts(str(out))
    # part 1 run on other inputs: its plan differs from part 0's
    build_pairs(
        [str(six / "case0.nii.gz"), str(six / "case1.nii.gz")], str(out), part_index=1, total_parts=2, **KW
    )
    assert not (out / "dataset.json").exists()
    with pytest.raises(InputError, match="other inputs"):
        merge_parts(str(out))
    build_pairs(str(six), str(out), part_index=1, total_parts=2, **KW)  # rerun with the same inputs: merged
    assert sum(map(len, _ids(_datalist(out)).values())) == 6
    assert merge_parts(str(out), total_parts=2)["datalist"] == str(out / "dataset.json")
    with pytest.raises(ValueError):
        build_pairs(str(six), str(out), part_index=2, total_parts=2, **KW)


def test_resume_rebuilds_only_unfinished_cases_and_removes_leftovers(six, tmp_path):
    out = tmp_path / "out"
    build_pairs(str(six), str(out), **KW)
    stamp = os.stat(out / "case0" / "ct.nii.gz").st_mtime_ns
    # a case killed mid-write: files without case.json, and the hidden temporary of an atomic write
    (out / "case3" / CASE_META_FILE).unlink()
    leftover = out / "case3" / ".ct.nii.gz.x1y2z3w4.part.nii.gz"
    leftover.write_bytes(b"half a file")
    again = build_pairs(str(six), str(out), **KW)
    assert again["written"] == ["case3"] and len(again["skipped_existing"]) == 5
    assert not leftover.exists()
    assert os.stat(out / "case0" / "ct.nii.gz").st_mtime_ns == stamp


def test_hidden_leftovers_are_not_inputs(six, tmp_path):
    folder = _write_phantoms(tmp_path / "in", ["a"])
    (folder / ".a.nii.gz.k3j4m5n6.part.nii.gz").write_bytes((folder / "a.nii.gz").read_bytes()[:100])
    (folder / ".hidden.nii.gz").write_bytes(b"x")
    assert [c for c, _ in find_inputs(folder)] == ["a"]
    assert find_inputs([str(folder / ".a.nii.gz.k3j4m5n6.part.nii.gz"), str(folder / "a.nii.gz")]) == [
        ("a", str(folder / "a.nii.gz"))
    ]


def test_killed_run_resumes_to_a_complete_dataset(six, tmp_path):
    """kill -9 in the middle of a real run (each case slowed to 0.5 s), then the same command completes."""
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "import data_prep.build_pairs as bp\n"
        "import data_prep.layout as layout\n"
        "real = layout.save_volume\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.5)\n"
        "    return real(*a, **k)\n"
        "layout.save_volume = slow\n"
        f"bp.build_pairs({str(six)!r}, {str(out)!r}, size=12, spacing=20.0, drr_pixels=12)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob(f"*/{CASE_META_FILE}"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob(f"*/{CASE_META_FILE}")))
    assert 2 <= done < 6, done
    assert not (out / "dataset.json").exists()
    summary = build_pairs(str(six), str(out), **KW)
    assert len(summary["skipped_existing"]) == done and len(summary["written"]) == 6 - done
    assert sum(map(len, _ids(_datalist(out)).values())) == 6
    assert not [p for p in out.rglob(".*") if ".part" in p.name]
    for case in (f"case{i}" for i in range(6)):
        assert load_volume(out / case / "ct.nii.gz").shape == (12, 12, 12)


def test_other_size_is_refused_until_overwrite(six, tmp_path):
    out = tmp_path / "out"
    files = [str(six / "case0.nii.gz"), str(six / "case1.nii.gz")]
    build_pairs(files, str(out), **KW)
    with pytest.raises(InputError, match=r"size \[12, 12, 12\].*size \[16, 16, 16\].*--overwrite"):
        build_pairs(files, str(out), size=16, spacing=20.0, drr_pixels=12)
    with pytest.raises(InputError, match="renderer"):
        build_pairs(files, str(out), attenuation="plastimatch", **KW)
    summary = build_pairs(files, str(out), size=16, spacing=20.0, drr_pixels=12, overwrite=True)
    assert sorted(summary["written"]) == ["case0", "case1"]
    assert _datalist(out)["size"] == [16, 16, 16]
    assert load_volume(out / "case0" / "ct.nii.gz").shape == (16, 16, 16)
    # a dataset written before settings were recorded: its dataset.json is compared
    (out / "build_settings.json").unlink()
    with pytest.raises(InputError, match="was built with size"):
        build_pairs(files, str(out), **KW)


def test_assign_splits_keeps_each_patient_in_one_split():
    cases = [f"p{p:02d}_s{s}" for p in range(20) for s in range(3)]
    groups = {c: c.split("_")[0] for c in cases}
    a = assign_splits(cases, 0.2, 0.2, seed=0, groups=groups)
    assert a == assign_splits(list(reversed(cases)), 0.2, 0.2, seed=0, groups=groups)
    by_patient = {}
    for case, split in a.items():
        by_patient.setdefault(groups[case], set()).add(split)
    assert all(len(s) == 1 for s in by_patient.values())
    counts = {s: sum(v == {s} for v in by_patient.values()) for s in ("training", "validation", "test")}
    assert counts == {"training": 12, "validation": 4, "test": 4}
    # without groups every case is its own patient (the behaviour before grouping)
    assert assign_splits(cases, 0.2, 0.2, seed=0) == assign_splits(cases, 0.2, 0.2, seed=0, groups=None)


def test_group_by_regex_and_patient_csv(tmp_path):
    names = [f"LIDC-IDRI-{p:04d}_scan{s}" for p in range(4) for s in range(2)]
    folder = _write_phantoms(tmp_path / "in", names, shape=(10, 10, 8))
    out = tmp_path / "out"
    build_pairs(str(folder), str(out), group_by=r"^(LIDC-IDRI-\d{4})", val_fraction=0.25, test_fraction=0.25,
                **KW)  # fmt: skip
    datalist = _datalist(out)
    split_of = {}
    for split in ("training", "validation", "test"):
        for e in datalist[split]:
            assert e["patient"] == e["id"][:14]
            split_of.setdefault(e["patient"], set()).add(split)
    assert len(split_of) == 4 and all(len(s) == 1 for s in split_of.values())
    assert datalist["patients"] == 4
    with pytest.raises(InputError, match="no patient"):
        plan_cases(str(folder), group_by=r"^patient\d+")
    csv_path = tmp_path / "patients.csv"
    csv_path.write_text("case,patient\n" + "".join(f"{n},P{i % 3}\n" for i, n in enumerate(names)))
    plan = plan_cases(str(folder), patients=str(csv_path))
    assert {c["id"]: c["patient"] for c in plan["cases"]}[names[4]] == "P1"
    csv_path.write_text("case,patient\n" + f"{names[0]},P0\n")
    with pytest.raises(InputError, match="7 case"):
        plan_cases(str(folder), patients=str(csv_path))


def test_dicom_patient_id_groups_the_series(shared_data, chest_dicom_dir):
    dicom = shared_data / "dicom" / "abdomen_ct_20slices"
    plan = plan_cases([str(dicom), str(chest_dicom_dir)])
    by_id = {c["id"]: c for c in plan["cases"]}
    chest = by_id[Path(chest_dicom_dir).name]
    assert chest["patient"] == "LIDC-IDRI-0001" and chest["patient_source"] == "dicom"
    assert chest["dicom_key"] == "LIDC-IDRI-0001.20000101.3000566"
    assert by_id["abdomen_ct_20slices"]["patient_source"] in ("dicom", "case")
    # the raw LIDC-IDRI series is recognised in the papers' lists by its headers
    plan = plan_cases([str(chest_dicom_dir)], split_file="x2ctgan")
    assert plan["cases"][0]["listed_id"] == "LIDC-IDRI-0001.20000101.3000566.1"
    assert plan["cases"][0]["split"] == "training"


def test_shipped_split_files_have_the_papers_counts():
    assert {"perx2ct", "x2ctgan"} <= set(split_lists.shipped_names())
    counts = {}
    for name in ("perx2ct", "x2ctgan"):
        listed = split_lists.load_split_file(name)
        counts[name] = {s: sum(v == s for v in listed.values()) for s in ("training", "validation", "test")}
    assert counts["perx2ct"] == {"training": 855, "validation": 17, "test": 76}
    assert counts["x2ctgan"] == {"training": 916, "validation": 0, "test": 102}
    perx, x2ct = split_lists.load_split_file("perx2ct"), split_lists.load_split_file("x2ctgan")
    assert {c for c, s in perx.items() if s != "training"} <= {c for c, s in x2ct.items() if s == "test"}
    source = json.loads((split_lists.SHIPPED_DIR / "perx2ct.json").read_text())["source"]
    assert source["repository"] == "dek924/PerX2CT" and len(source["commit"]) == 40
    assert (split_lists.SHIPPED_DIR / "README.md").is_file()


def test_split_file_gives_exactly_its_splits(tmp_path):
    listed = {"training": ["LIDC-IDRI-0001.20000101.1.1", "LIDC-IDRI-0002.20000101.2.1",
                           "LIDC-IDRI-0007.20000101.7.1", "LIDC-IDRI-0008.20000101.8.1"],
              "validation": ["LIDC-IDRI-0003.20000101.3.1"],
              "test": ["LIDC-IDRI-0004.20000101.4.1", "LIDC-IDRI-0001.20000101.9.1", "LIDC-IDRI-0009.20000101.9.1"]}  # fmt: skip
    split_path = tmp_path / "my_split.json"
    split_path.write_text(json.dumps(listed))
    present = [*listed["training"][:3], *listed["validation"], *listed["test"][:2], "other_scan"]
    folder = _write_phantoms(tmp_path / "in", present, shape=(10, 10, 8))
    out = tmp_path / "out"
    summary = build_pairs(str(folder), str(out), split_file=str(split_path), group_by=r"^(LIDC-IDRI-\d{4}|other)",
                          **KW)  # fmt: skip
    ids = _ids(_datalist(out))
    assert ids == {"training": sorted(listed["training"][:3]), "validation": listed["validation"],
                   "test": sorted(listed["test"][:2])}  # fmt: skip
    assert summary["split_file"]["missing"] == {
        "training": ["LIDC-IDRI-0008.20000101.8.1"], "validation": [], "test": ["LIDC-IDRI-0009.20000101.9.1"]
    }  # fmt: skip
    assert [e["id"] for e in summary["excluded"]] == ["other_scan"] and not (out / "other_scan").exists()
    assert summary["patients_in_several_splits"] == ["LIDC-IDRI-0001"]  # as the file says; reported
    # unlisted inputs into a named split, never into validation/test
    out2 = tmp_path / "out2"
    build_pairs(str(folder), str(out2), split_file=str(split_path), unlisted_split="training", **KW)
    assert "other_scan" in _ids(_datalist(out2))["training"]
    with pytest.raises(ValueError, match="unlisted_split"):
        plan_cases(str(folder), split_file=str(split_path), unlisted_split="test")
    # a CSV split file works the same way
    csv_path = tmp_path / "split.csv"
    csv_path.write_text("id,split\n" + "".join(f"{c},{s}\n" for s, cs in listed.items() for c in cs))
    plan = plan_cases(str(folder), split_file=str(csv_path))
    assert {c["id"]: c["split"] for c in plan["cases"]} == {
        c: s for s, cs in listed.items() for c in cs if c in present
    }
    with pytest.raises(InputError, match="both"):
        split_path.write_text(json.dumps({"training": ["a"], "test": ["a"]}))
        split_lists.load_split_file(split_path)


def test_split_file_without_validation_carves_it_from_training(tmp_path):
    names = [f"c{i}" for i in range(10)]
    split_path = tmp_path / "s.json"
    split_path.write_text(json.dumps({"training": names[:8], "test": names[8:]}))
    folder = _write_phantoms(tmp_path / "in", names, shape=(10, 10, 8))
    summary = build_pairs(
        str(folder), str(tmp_path / "out"), split_file=str(split_path), val_fraction=0.25, **KW
    )
    ids = _ids(_datalist(tmp_path / "out"))
    assert ids["test"] == names[8:] and len(ids["validation"]) == 2 and len(ids["training"]) == 6
    assert summary["validation_carved_from_training"] == ids["validation"]
    build_pairs(str(folder), str(tmp_path / "keep"), split_file=str(split_path), val_fraction=0.0, **KW)
    assert _ids(_datalist(tmp_path / "keep"))["training"] == names[:8]


@pytest.mark.skipif(
    not __import__("common.drr_plastimatch", fromlist=["x"]).plastimatch_available(),
    reason="plastimatch not installed",
)
def test_plastimatch_renderer_writes_the_same_layout(six, tmp_path):
    files = [str(six / "case0.nii.gz")]
    pm = build_pairs(files, str(tmp_path / "pm"), renderer="plastimatch", **KW)
    ours = build_pairs(files, str(tmp_path / "ours"), attenuation="plastimatch", **KW)
    assert pm["settings"]["renderer"] == "plastimatch" and pm["settings"]["attenuation"] == "plastimatch"
    for view in ("pa", "lateral"):
        a = np.asarray(nib.load(tmp_path / "pm" / "case0" / f"{view}.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "ours" / "case0" / f"{view}.nii.gz").dataobj)
        assert a.shape == b.shape == (12, 12)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    assert ours["settings"]["renderer"] == "xray2ct"
