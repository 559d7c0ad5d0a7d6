"""pix2pix_phase pairing CLI: matching subfolders, geometry checks, reports, atomic copies, datalist."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from common.io import save_volume
from common.volume import Volume
from data_prep import prepare_pairs as pp

PHASE0 = "CT 1.2 Gated 0.0A.nii.gz"


def _vol(shape=(8, 8, 4), spacing=(2.0, 2.0, 3.0), value=0.0) -> Volume:
    return Volume.from_spacing(np.full(shape, value, np.float32), spacing)


@pytest.fixture()
def tree(tmp_path):
    """good_a, good_b: pairs; no_phase0: only phase 50; bad_shape: shapes differ; only_avg: no phases folder;
    two_avgs: ambiguous average; plus a stray file in each root."""
    avg, ph = tmp_path / "averages", tmp_path / "phases"
    for case in ("good_a", "good_b", "no_phase0", "bad_shape", "two_avgs"):
        save_volume(_vol(value=1.0), avg / case / "AVG.nii.gz")
        save_volume(_vol(value=2.0), ph / case / "CT 1.2 Gated 50.0A.nii.gz")
        if case != "no_phase0":
            save_volume(_vol((8, 8, 5)) if case == "bad_shape" else _vol(value=3.0), ph / case / PHASE0)
    save_volume(_vol(), avg / "two_avgs" / "AVG_copy.nii.gz")
    save_volume(_vol(), avg / "only_avg" / "AVG.nii.gz")
    (avg / "notes.txt").write_text("extra file")
    (ph / "Thumbs.db").write_text("extra file")
    return avg, ph, tmp_path / "out"


def test_pairs_missing_mismatched_and_extra(tree):
    avg, ph, out = tree
    report = pp.prepare_pairs(str(avg), str(ph), str(out))
    assert report["paired"] == 2
    assert report["cases"] == {"patient_1": "good_a", "patient_2": "good_b"}
    reasons = {u["case"]: u["reason"] for u in report["unpaired"]}
    assert set(reasons) == {"no_phase0", "bad_shape", "only_avg", "two_avgs"}
    assert "shape differs" in reasons["bad_shape"] and "[8, 8, 4]" in reasons["bad_shape"]
    assert "found 1 and 0" in reasons["no_phase0"]
    assert reasons["only_avg"] == "no phases subfolder"
    assert "found 2 and 1" in reasons["two_avgs"]
    assert sorted(os.path.basename(p) for p in report["ignored"]) == ["Thumbs.db", "notes.txt"]
    # matched names, the phase-0 file (value 3) not the 50 % phase (value 2), geometry kept
    for name in ("patient_1.nii.gz", "patient_2.nii.gz"):
        a, b = nib.load(out / "trainA" / name), nib.load(out / "trainB" / name)
        assert np.all(a.get_fdata() == 1.0) and np.all(b.get_fdata() == 3.0)
        np.testing.assert_allclose(a.affine, b.affine)
    assert sorted(os.listdir(out / "trainA")) == ["patient_1.nii.gz", "patient_2.nii.gz"]
    on_disk = json.loads((out / "pairing_report.json").read_text())
    assert on_disk["paired"] == 2 and len(on_disk["unpaired"]) == 4


def test_datalist_split_is_deterministic_and_loadable(tree):
    from monai.data import load_decathlon_datalist

    avg, ph, out = tree
    pp.prepare_pairs(str(avg), str(ph), str(out), mode="symlink")
    first = (out / "dataset.json").read_text()
    pp.prepare_pairs(str(avg), str(ph), str(out), mode="symlink")
    assert (out / "dataset.json").read_text() == first
    data = json.loads(first)
    assert len(data["training"]) == 2 and data["validation"] == data["test"] == []  # 2 x 0.2 rounds to 0
    assert data["split"] == {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0, "split_hash": "sha256"}
    pp.prepare_pairs(str(avg), str(ph), str(out), mode="symlink", split_hash="md5")  # the rule before 1.x
    data = json.loads((out / "dataset.json").read_text())
    assert len(data["training"]) == 1 and len(data["validation"]) == 1 and data["test"] == []
    items = load_decathlon_datalist(str(out / "dataset.json"), False, "training")
    assert os.path.isabs(items[0]["avg"]) and os.path.exists(items[0]["phase0"])
    assert os.path.islink(out / "trainA" / "patient_1.nii.gz")


def _md5_rule_before(case_ids, val_fraction, test_fraction):
    """prepare_pairs' split before it was shared with build_pairs (the reference ``split_hash="md5"`` must give)."""
    order = sorted(case_ids, key=lambda c: hashlib.md5(c.encode()).hexdigest())
    n = len(order)
    n_val = max(1, round(val_fraction * n)) if n >= 2 and val_fraction > 0 else 0
    wanted = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    n_test = min(wanted, max(0, n - n_val - 1))
    return {"validation": sorted(order[:n_val]), "test": sorted(order[n_val : n_val + n_test]),
            "training": sorted(order[n_val + n_test :])}  # fmt: skip


ID_SETS = [[f"c{i}" for i in range(10)], ["only"], ["a", "b"], ["a", "b", "c"], [f"patient_{i}" for i in range(1, 26)]]
FRACTIONS = [(0.2, 0.1), (0.2, 0.0), (0.2, 0.2), (0.1, 0.1), (0.0, 0.3)]


@pytest.mark.parametrize("ids", ID_SETS)
@pytest.mark.parametrize("val,test", FRACTIONS)
def test_build_pairs_and_prepare_pairs_agree_on_the_same_ids(ids, val, test):
    """One split rule: prepare_pairs' split of a list of ids is build_pairs' (data_prep.layout.assign_splits),
    whatever the listing order; ``split_hash="md5"`` is exactly the rule prepare_pairs had before."""
    from data_prep.build_pairs import assign_splits

    for seed in (0, 3):
        by_build_pairs = assign_splits(ids, val, test, seed=seed)
        split = pp.split_cases(list(reversed(ids)), val, test, seed=seed)
        assert split == {s: sorted(c for c in ids if by_build_pairs[c] == s) for s in ("validation", "test", "training")}
    assert pp.split_cases(ids, val, test, split_hash="md5") == _md5_rule_before(ids, val, test)


def test_split_cases_rules():
    ids = [f"c{i}" for i in range(10)]
    split = pp.split_cases(ids, 0.2, 0.1)
    assert [len(split[k]) for k in ("training", "validation", "test")] == [7, 2, 1]
    assert pp.split_cases(["only"], 0.2, 0.0) == {"validation": [], "test": [], "training": ["only"]}
    three = pp.split_cases(["a", "b", "c"], 0.2, 0.2)  # 3 x 0.2 = 0.6 rounds to one each
    assert [len(three[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    with pytest.raises(ValueError, match="split_hash"):
        pp.split_cases(ids, 0.2, 0.1, split_hash="crc32")


def test_permission_error_is_reported_and_leaves_no_partial_file(tree, monkeypatch):
    avg, ph, out = tree
    real_copy = shutil.copyfile

    def flaky_copy(src, dst, *args, **kwargs):
        if "good_b" in str(src) and "Gated" in str(src):
            with open(dst, "wb") as f:
                f.write(b"half a volume")
            raise PermissionError(13, "Permission denied", str(src))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(pp.shutil, "copyfile", flaky_copy)
    report = pp.prepare_pairs(str(avg), str(ph), str(out))
    assert report["paired"] == 1
    assert len(report["errors"]) == 1 and "PermissionError" in report["errors"][0]["error"]
    assert "good_b" in report["errors"][0]["file"]
    assert sorted(os.listdir(out / "trainA")) == ["patient_1.nii.gz"]  # its average was removed too
    assert sorted(os.listdir(out / "trainB")) == ["patient_1.nii.gz"]  # no temporary left behind


def test_missing_folder_raises_input_error(tmp_path):
    from common.errors import InputError

    with pytest.raises(InputError, match="folder not found"):
        pp.prepare_pairs(str(tmp_path / "nope"), str(tmp_path), str(tmp_path / "out"))


def test_orientation_and_spacing_mismatch():
    a = {"shape": [4, 4, 4], "spacing": [1.0, 1.0, 2.0], "orientation": "RAS"}
    assert pp.geometry_mismatch(a, dict(a)) is None
    assert "spacing differs" in pp.geometry_mismatch(a, {**a, "spacing": [1.0, 1.0, 2.5]})
    assert "orientation differs" in pp.geometry_mismatch(a, {**a, "orientation": "LPS"})


def test_cli_entry_point(tree):
    import subprocess
    import sys

    avg, ph, out = tree
    cmd = [sys.executable, "-m", "data_prep.prepare_pairs", str(avg), str(ph), str(out)]
    done = subprocess.run(
        cmd + ["--phase_glob", "*Gated 50.0A*", "--val_fraction", "0", "--test_fraction", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "paired 4" in done.stdout  # every case with one average has a 50 % phase of its shape
    assert len(json.loads((out / "dataset.json").read_text())["training"]) == 4
