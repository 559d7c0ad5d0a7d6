"""benchmarks/refactor_equivalence.py's report comparison (the runs themselves are the benchmark, not a test)."""

from __future__ import annotations

import math

import pytest

from benchmarks.refactor_equivalence import RTOL, compare, compare_outputs, flatten


def test_flatten_joins_keys_and_indices():
    assert flatten({"a": {"b": [1, {"c": 2}]}, "d": []}) == {"a/b/0": 1, "a/b/1/c": 2, "d": []}


@pytest.mark.parametrize(
    "old, new, ok",
    [
        (15.179289817810059, 15.179289817810059, True),  # bit-identical
        (15.0, 15.0 + 0.5 * RTOL * 15.0, True),  # float32 order: within the relative bound
        (15.0, 15.0 + 2.0 * RTOL * 15.0, False),  # beyond it
        (0.0, 0.5 * RTOL, True),  # near zero the bound is absolute (max(1, |x|))
        (0.0, 2.0 * RTOL, False),
        (math.nan, math.nan, True),  # undefined in both
        (1.0, math.nan, False),
        (3, 3.0, True),  # an int written as a float
    ],
)
def test_numbers_within_the_bound(old, new, ok):
    result = compare({"metrics": {"m": old}}, {"metrics": {"m": new}})
    assert result["numbers"][0]["ok"] is ok and (result["failures"] == []) is ok


def test_keys_and_strings():
    old = {"m": 1.0, "gone": 2.0, "path": "/w/eval_old/p.png", "kind": "a", "n": 1}
    new = {"m": 1.0, "added": 3.0, "path": "/w/eval_new/p.png", "kind": "b", "n": "1"}
    r = compare(old, new, places={"/w/eval_old": "<out>", "/w/eval_new": "<out>"})
    assert r["only_new"] == ["added"] and r["only_old"] == ["gone"]
    assert [d["key"] for d in r["differing_values"]] == ["kind", "n"]  # the output folders are not a difference
    assert set(r["failures"]) == {"n", "missing in new: gone"}  # a number that became a string fails; "kind" is listed
    assert r["n_numbers"] == 1 and r["n_exactly_equal"] == 1 and r["max_abs_diff"] == 0.0


def test_output_files_same_name_renamed_and_different(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for root, files in ((old, {"a.png": b"A", "p/c.png": b"C", "d.csv": b"1", "gone.png": b"G"}),
                        (new, {"a.png": b"A", "p/c_preview.png": b"C", "d.csv": b"2", "extra.png": b"X"})):  # fmt: skip
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    r = compare_outputs(old, new)
    assert r["identical"] == ["a.png"] and r["different"] == ["d.csv"]
    assert r["renamed"] == {"p/c.png": "p/c_preview.png"}  # the same bytes under the new naming scheme
    assert r["only_old"] == ["gone.png"] and r["only_new"] == ["extra.png"]


def test_a_montage_with_its_rows_moved_is_reordered_not_different(tmp_path):
    import numpy as np
    from PIL import Image

    rows = np.arange(4 * 3, dtype=np.uint8).reshape(4, 3) * 20
    for root, image in ((tmp_path / "old", rows), (tmp_path / "new", rows[[3, 0, 1, 2]])):
        root.mkdir()
        Image.fromarray(image).save(root / "m.png")
        Image.fromarray(image).save(root / f"{root.name}_named.png")
    Image.fromarray(rows[::-1].T.copy()).save(tmp_path / "new" / "other.png")  # not a row permutation
    Image.fromarray(rows).save(tmp_path / "old" / "other.png")
    r = compare_outputs(tmp_path / "old", tmp_path / "new")
    assert r["rows_reordered"] == {"m.png": "m.png", "old_named.png": "new_named.png"}
    assert r["different"] == ["other.png"] and r["identical"] == [] and r["renamed"] == {}
