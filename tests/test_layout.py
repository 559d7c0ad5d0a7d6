"""data_prep.layout and the module boundaries of the split build_pairs: libraries import no CLI module, the
reader modules no circle (common.dicom never imports common.io), sharding and part files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from data_prep.layout import assign_splits, part_path, shard

REPO = Path(__file__).resolve().parents[1]


def _repo_imports(module: str) -> set[str]:
    """Every project module ``module`` imports, directly or through others, at the top or inside functions
    (static: read from the sources, so a hidden function-level import counts too)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = REPO / (name.replace(".", "/") + ".py")
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return seen - {module}


@pytest.mark.parametrize(
    "module, must_not_load",
    [
        ("data_prep.phantom", "data_prep.build_pairs"),  # the dataset layout is a library, not a CLI module
        ("data_prep.cohort", "data_prep.build_pairs"),
        ("data_prep.prepare_pairs", "data_prep.build_pairs"),
        ("data_prep.layout", "data_prep.build_pairs"),
        ("common.dicom", "common.io"),  # the circle is broken: dicom needs only common.limits
        ("common.json_values", "common.checkpoint"),
    ],
)
def test_module_does_not_import(module, must_not_load):
    assert must_not_load not in _repo_imports(module)


def test_the_import_walk_sees_function_level_imports():
    assert "common.dicom" in _repo_imports("common.io") and "common.limits" in _repo_imports("common.dicom")


@pytest.mark.parametrize("total", [1, 2, 3, 7])
def test_shards_cover_every_item_once(total):
    items = [f"case{i}" for i in (5, 1, 9, 3, 0, 2)]
    parts = [shard(items, i, total) for i in range(total)]
    assert sorted(x for p in parts for x in p) == sorted(items)
    assert parts[0][0] == "case0"  # every n-th of the sorted items, from the i-th


@pytest.mark.parametrize("index, total", [(-1, 2), (2, 2), (0, 0)])
def test_shard_refuses_bad_part_numbers(index, total):
    with pytest.raises(ValueError, match="part_index"):
        shard([], index, total)


def test_part_path():
    assert part_path("/d", 3, 12) == Path("/d/parts/part_0003_of_0012.json")


@pytest.mark.parametrize("split_hash", ["sha256", "md5"])
def test_both_hashes_keep_patients_together_and_strata_balanced(split_hash):
    cases = [f"p{p}_s{s}" for p in range(12) for s in range(2)]
    groups = {c: c.split("_")[0] for c in cases}
    strata = {c: int(c.split("_")[0][1:]) % 2 for c in cases}
    a = assign_splits(cases, 0.25, 0.25, seed=1, strata=strata, groups=groups, split_hash=split_hash)
    assert a == assign_splits(list(reversed(cases)), 0.25, 0.25, seed=1, strata=strata, groups=groups,
                              split_hash=split_hash)  # fmt: skip
    for p in range(12):
        assert a[f"p{p}_s0"] == a[f"p{p}_s1"]
    for stratum in (0, 1):  # 6 patients per stratum: round(1.5) of each
        got = [a[f"p{p}_s0"] for p in range(12) if p % 2 == stratum]
        n = {"sha256": 2, "md5": 2}[split_hash]  # half up -> 2; Python's round(1.5) -> 2 too
        assert got.count("test") == n and got.count("validation") == n
