"""data_prep.cohort: generated patients stay inside the stated ranges, labels sit on the anatomy, runs are
deterministic and resumable, splits group by source, and a bundle trains from the datalist.

The fast tests use phantom chests (data_prep.phantom) written as "real" CTs with a TotalSegmentator-style
label map, so the full path (label map, contrast, fat, heart) runs in seconds; the slow ones use the real
example CT (LIDC-IDRI-0001 with its TotalSegmentator labels).
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from common.errors import InputError
from data_prep import cohort
from data_prep.cohort import LABEL_BODY, LABEL_BONE, LABEL_HEART, LABEL_LUNG, LABEL_OUTSIDE

SIZE, SPACING, DRR = 32, 10.0, 32
# phantom structure -> TotalSegmentator id (structures.csv below); arteries stand for an enhanced vessel
PHANTOM_IDS = {"lungs": 10, "heart": 51, "pulmonary_arteries": 52, "spine": 33, "ribs": 95}
STRUCTURES = "group,original_idx,structure,id\n" + "\n".join(
    f"x,{i},{name},{i}"
    for name, i in [
        ("lung_upper_lobe_left", 10),
        ("heart", 51),
        ("aorta", 52),
        ("vertebrae_T11", 33),
        ("rib_left_4", 95),
    ]
)


def _phantom_source(folder, seed: int, with_mask: bool = True) -> dict:
    """A phantom chest at 4 x 4 x 6 mm written as a CT NIfTI (+ label map and structures.csv)."""
    from data_prep.phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    vol, labels = make_phantom((96, 96, 64), spacing=(4.0, 4.0, 6.0), seed=seed)
    ct = folder / f"chest{seed}.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(vol.array).astype(np.int16), vol.affine), ct)
    out = {"ct": str(ct)}
    if with_mask:
        seg = np.zeros(vol.shape, np.uint8)
        for name, i in PHANTOM_IDS.items():
            seg[labels[name]] = i
        nib.save(nib.Nifti1Image(seg, vol.affine), folder / f"chest{seed}_seg.nii.gz")
        (folder / "structures.csv").write_text(STRUCTURES)
        out.update(mask=str(folder / f"chest{seed}_seg.nii.gz"), structures=str(folder / "structures.csv"))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cohort_sources")
    return {seed: _phantom_source(root, seed) for seed in (1, 2)}


def one_source_options(src: dict, n_cases: int, seed: int, previews: int) -> dict:
    """``make_cohort`` arguments: ``n_cases`` drawn from the phantom source ``src``, at the tests' size."""
    return dict(
        n_cases=n_cases, size=SIZE, spacing=SPACING, drr_pixels=DRR, sources=[src["ct"]], masks=[src["mask"]],
        structures=src["structures"], seed=seed, previews=previews,
    )  # fmt: skip


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory, sources) -> dict:
    """6 cases from one phantom source, 32^3 at 10 mm, 32^2 DRRs."""
    root = tmp_path_factory.mktemp("cohort") / "data"
    path = cohort.make_cohort(root, **one_source_options(sources[1], n_cases=6, seed=3, previews=2))
    return {"root": root, "datalist": json.loads(open(path).read()), "path": path}


def _cases(datalist: dict) -> list[dict]:
    return [e for split in ("training", "validation", "test") for e in datalist[split]]


def _load(root, rel) -> np.ndarray:
    return np.asarray(nib.load(os.path.join(root, rel)).dataobj)


def test_layout_and_datalist(small_cohort):
    d, root = small_cohort["datalist"], small_cohort["root"]
    cases = _cases(d)
    assert len(cases) == 6 and d["same_source"] is True and d["size"] == [SIZE] * 3
    assert d["labels"] == {"0": "outside", "1": "body", "2": "lung", "3": "heart", "4": "bone"}
    for e in cases:
        assert e["source"] == "chest1" and e["patient"] == e["id"]
        ct, label = nib.load(root / e["ct"]), nib.load(root / e["label"])
        assert ct.shape == label.shape == (SIZE,) * 3
        assert np.allclose(ct.affine, label.affine)  # aligned grids
        assert label.get_data_dtype() == np.uint8
        assert _load(root, e["pa"]).shape == _load(root, e["lateral"]).shape == (DRR, DRR)
    assert (root / "preview.png").is_file()


@pytest.mark.parametrize(
    "key, bounds",
    [
        ("body_width_mm", cohort.BODY_WIDTH_MM),
        ("body_depth_mm", cohort.BODY_DEPTH_MM),
        ("lung_volume_l", cohort.LUNG_VOLUME_L),
        ("heart_left_mm", cohort.HEART_LEFT_MM),
    ],
)
def test_generated_anatomy_inside_the_stated_ranges(small_cohort, key, bounds):
    """Measured on the generated label maps; a measured extent is quantised to whole voxels (+-1 voxel) and
    the boundary voxel is decided by interpolation (+-0.5 voxel) on each side."""
    root = small_cohort["root"]
    slack = {"lung_volume_l": 0.0}.get(key, 1.5 * SPACING)
    for e in _cases(small_cohort["datalist"]):
        m = cohort.measure_anatomy(_load(root, e["label"]), (SPACING,) * 3)
        assert bounds[0] - slack <= m[key] <= bounds[1] + slack, (e["id"], key, m[key])


def test_measured_habitus_follows_the_drawn_parameters(small_cohort):
    """Width and depth drawn per case are what the label map shows, to the +-1.5 voxel of the measurement and
    2 % for the rotation on the table and the slice the measure picks; a body wider than the field of view
    (320 mm here, as at 64^3 x 5 mm) is cut at its edge."""
    root, fov = small_cohort["root"], SIZE * SPACING
    compared = 0
    for e in _cases(small_cohort["datalist"]):
        meta = json.loads((root / e["id"] / cohort.CASE_FILE).read_text())
        m = cohort.measure_anatomy(_load(root, e["label"]), (SPACING,) * 3)
        for key in ("body_width_mm", "body_depth_mm"):
            if m[key] >= fov - 2 * SPACING:
                assert meta["parameters"][key] >= m[key] - 1.5 * SPACING  # cut by the field of view
                continue
            compared += 1
            assert abs(m[key] - meta["parameters"][key]) <= 1.5 * SPACING + 0.02 * m[key], (e["id"], key)
    assert compared >= 6


def test_labels_sit_on_the_anatomy(small_cohort):
    """An outside voxel is at most half tissue: HU <= (-1000 + 40) / 2 = -480 for soft tissue,
    (-1000 + 800) / 2 = -100 where a rib touches the skin, before noise (phantom 10 HU plus at most 10 HU
    added: 4 sigma = 57 HU).
    Lung voxels at the 10 mm border mix with the chest wall, hence "mostly"."""
    root = small_cohort["root"]
    for e in _cases(small_cohort["datalist"]):
        hu, label = _load(root, e["ct"]).astype(np.float32), _load(root, e["label"])
        assert np.mean(hu[label == LABEL_LUNG] < -400) > 0.85 and np.median(hu[label == LABEL_LUNG]) < -700
        outside = hu[label == LABEL_OUTSIDE]
        assert np.all(outside < -100 + 57) and np.mean(outside < -400) > 0.97 and np.median(outside) < -900
        assert np.median(hu[label == LABEL_BONE]) > 150
        assert -150 < np.median(hu[label == LABEL_HEART]) < 150  # blood 40 HU (phantom hearts are unenhanced)
        assert -200 < np.median(hu[label == LABEL_BODY]) < 150  # fat and muscle
        assert all((label == v).any() for v in (LABEL_BODY, LABEL_LUNG, LABEL_HEART, LABEL_BONE))


def test_deterministic_by_seed(sources, tmp_path):
    src = sources[1]
    source = cohort.load_source(src["ct"], SPACING, src["mask"], cohort.read_structures(src["structures"]))
    cohort._source_geometry(source)
    draws = [cohort.draw_parameters(source.stats, np.random.default_rng([3, 0, i]), True) for i in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    a = cohort.generate_case(source, draws[0], (SIZE,) * 3, SPACING, (3, 0, 0, 1))
    b = cohort.generate_case(source, draws[1], (SIZE,) * 3, SPACING, (3, 0, 0, 1))
    assert np.array_equal(a[0].array, b[0].array) and np.array_equal(a[1].array, b[1].array)


def test_same_seed_same_files_and_resume(sources, tmp_path, monkeypatch):
    kw = one_source_options(sources[1], n_cases=3, seed=5, previews=0)
    cohort.make_cohort(tmp_path / "a", **kw)

    calls = {"n": 0}
    real = cohort.generate_case

    def dies_on_second(*args, **kwargs):  # a run killed while generating its second case
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cohort, "generate_case", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        cohort.make_cohort(tmp_path / "b", **kw)
    assert not (tmp_path / "b" / "dataset.json").exists()
    first = tmp_path / "b" / "chest1_0000" / "ct.nii.gz"
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(cohort, "generate_case", real)
    cohort.make_cohort(tmp_path / "b", **kw)  # continues: case 0 kept, cases 1-2 written
    assert first.stat().st_mtime_ns == stamp
    for case in ("chest1_0000", "chest1_0001", "chest1_0002"):
        for name in ("ct.nii.gz", "label.nii.gz", "pa.nii.gz", "lateral.nii.gz"):
            assert np.array_equal(
                _load(tmp_path / "a", f"{case}/{name}"), _load(tmp_path / "b", f"{case}/{name}")
            )
    with pytest.raises(InputError, match=cohort.SETTINGS_FILE):  # same folder, other settings: refused
        cohort.make_cohort(tmp_path / "b", **{**kw, "seed": 6})


def test_several_sources_split_by_source(sources, tmp_path):
    s1, s2 = sources[1], sources[2]
    path = cohort.make_cohort(
        tmp_path,
        n_cases=8,
        size=SIZE,
        spacing=SPACING,
        drr_pixels=DRR,
        sources=[s1["ct"], s2["ct"]],
        masks=[s1["mask"], ""],
        structures=s1["structures"],
        val_fraction=0.0,
        test_fraction=0.5,
        seed=0,
        previews=0,
    )
    d = json.loads(open(path).read())
    assert d["same_source"] is False and d["sources"] == ["chest1", "chest2"]
    split_of: dict[str, set] = {}
    for split in ("training", "validation", "test"):
        for e in d[split]:
            split_of.setdefault(e["source"], set()).add(split)
    assert all(len(s) == 1 for s in split_of.values()) and len(split_of) == 2
    # the source without a label map: lungs and bone by HU, no heart label
    label = _load(tmp_path, next(e for e in _cases(d) if e["source"] == "chest2")["label"])
    assert (label == LABEL_LUNG).any() and (label == LABEL_BONE).any() and not (label == LABEL_HEART).any()


def test_errors_name_the_file(sources, tmp_path):
    src = sources[1]
    with pytest.raises(InputError, match="missing.nii.gz"):
        cohort.make_cohort(tmp_path / "x", n_cases=1, sources=[str(tmp_path / "missing.nii.gz")])
    other = tmp_path / "other_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), other)
    with pytest.raises(InputError, match="other_grid.nii.gz"):
        cohort.load_source(src["ct"], SPACING, other, cohort.read_structures(src["structures"]))
    air = tmp_path / "air.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), -1000, np.int16), np.eye(4)), air)
    with pytest.raises(InputError, match="air.nii.gz"):
        cohort.load_source(air, SPACING)
    bad_csv = tmp_path / "structures.csv"
    bad_csv.write_text("name,value\nlung,1\n")
    with pytest.raises(InputError, match="structures.csv"):
        cohort.read_structures(bad_csv)


def test_within_stays_inside_the_bounds():
    rng = np.random.default_rng(0)
    for src, warp, bounds in [
        (300.0, 30.0, (278.0, 354.0)),
        (250.0, 25.0, (197.0, 251.0)),
        (20.0, 8.0, (7.0, 21.0)),
    ]:
        v = [cohort._within(rng, src, warp, bounds) for _ in range(200)]
        assert min(v) >= max(bounds[0], src - warp) and max(v) <= min(bounds[1], src + warp)
    assert cohort._within(rng, 400.0, 30.0, (278.0, 354.0)) == 370.0  # outside: moves towards the range


@pytest.mark.slow
def test_cli(sources, tmp_path):
    """``python -m data_prep.cohort`` with two sources, one without a label map (fire list syntax)."""
    import subprocess
    import sys

    s1, s2 = sources[1], sources[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "OMP_NUM_THREADS": "1",
    }
    args = [
        sys.executable,
        "-m",
        "data_prep.cohort",
        str(tmp_path),
        "--n_cases",
        "2",
        "--size",
        "16",
        "--spacing",
        "20",
        "--drr_pixels",
        "16",
        "--sources",
        f"[{s1['ct']},{s2['ct']}]",
        "--masks",
        f"[{s1['mask']},'']",
        "--structures",
        s1["structures"],
        "--previews",
        "0",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    d = json.loads((tmp_path / "dataset.json").read_text())
    assert sorted(e["source"] for e in _cases(d)) == ["chest1", "chest2"] and d["same_source"] is False
    bad = subprocess.run(
        args[:4] + ["--sources", str(tmp_path / "nope.nii.gz")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode != 0 and "nope.nii.gz" in bad.stderr


@pytest.mark.slow
def test_a_bundle_trains_from_the_cohort(small_cohort, tmp_path):
    """perx2ct's cpu_tiny training runs one epoch on the cohort datalist, unchanged."""
    from monai.bundle import run

    configs = os.path.join(os.path.dirname(__file__), "..", "bundles", "perx2ct", "configs")
    run(
        "training",
        config_file=[os.path.join(configs, "train.json"), os.path.join(configs, "cpu_tiny.json")],
        meta_file=os.path.join(configs, "metadata.json"),
        logging_file=os.path.join(configs, "logging.conf"),
        max_epochs=1,
        dataset_dir=str(small_cohort["root"]),
        bundle_root=str(tmp_path / "b"),
        output_dir=str(tmp_path / "out"),
    )
    assert (tmp_path / "b" / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_real_ct_cohort(example_ct, tmp_path):
    """The example CT (LIDC-IDRI-0001, TotalSegmentator labels): ranges and labels on real anatomy."""
    path = cohort.make_cohort(tmp_path, n_cases=4, size=SIZE, spacing=SPACING, drr_pixels=DRR, seed=0)
    d = json.loads(open(path).read())
    assert d["same_source"] is True
    stats = d["source_stats"]["example"]
    assert 3.0 < stats["lung_volume_l"] < 4.5  # LIDC-IDRI-0001: 3.7 L
    for e in _cases(d):
        hu, label = _load(tmp_path, e["ct"]).astype(np.float32), _load(tmp_path, e["label"])
        m = cohort.measure_anatomy(label, (SPACING,) * 3)
        assert cohort.BODY_WIDTH_MM[0] - 15 <= m["body_width_mm"] <= cohort.BODY_WIDTH_MM[1] + 15
        assert cohort.BODY_DEPTH_MM[0] - 15 <= m["body_depth_mm"] <= cohort.BODY_DEPTH_MM[1] + 15
        assert cohort.LUNG_VOLUME_L[0] <= m["lung_volume_l"] <= cohort.LUNG_VOLUME_L[1]
        assert cohort.HEART_LEFT_MM[0] - 15 <= m["heart_left_mm"] <= cohort.HEART_LEFT_MM[1] + 15
        assert np.mean(hu[label == LABEL_LUNG] < -400) > 0.8
        assert np.median(hu[label == LABEL_BONE]) > 150
        outside = hu[label == LABEL_OUTSIDE]  # the table is removed (remove_outside)
        assert np.mean(outside < -400) > 0.97 and np.median(outside) < -900


def test_contrast_and_inflation_change_what_they_say(sources):
    """Unenhanced: the blood pool goes to 40 HU (phantom arteries 350 HU, no noise added here); a deeper
    breath (diaphragm lower) makes the lungs taller by the drawn amount, to +-1 voxel at each end, and their
    density lower by mass conservation."""
    src = sources[1]
    source = cohort.load_source(src["ct"], SPACING, src["mask"], cohort.read_structures(src["structures"]))
    cohort._source_geometry(source)
    base = {**cohort.IDENTITY, "contrast": 1.0}
    same = cohort.generate_case(source, base, (SIZE,) * 3, SPACING, (0,))[0].array
    plain = cohort.generate_case(source, {**base, "contrast": 0.0}, (SIZE,) * 3, SPACING, (0,))[0].array
    again = cohort.generate_case(source, base, (SIZE,) * 3, SPACING, (0,))
    assert source.blood is not None and source.blood.max() > 0.5
    # where the enhanced case shows contrast and the unenhanced one does not, the latter is near 40 HU
    vessel = (same > 200) & (plain < same - 100)
    assert vessel.any() and abs(float(np.median(plain[vessel])) - cohort.HU_BLOOD) < 60
    assert np.array_equal(same, again[0].array)  # contrast 1.0 and no noise: the source as it is

    deep = {**base, "diaphragm_mm": 15.0}
    ct_deep, lab_deep = cohort.generate_case(source, deep, (SIZE,) * 3, SPACING, (0,))
    lab_same = cohort.generate_case(source, base, (SIZE,) * 3, SPACING, (0,))[1].array
    h0 = cohort.measure_anatomy(lab_same, (SPACING,) * 3)["lung_height_mm"]
    h1 = cohort.measure_anatomy(lab_deep.array, (SPACING,) * 3)["lung_height_mm"]
    assert abs((h1 - h0) - 15.0) <= 2 * SPACING
    lung = (lab_same == LABEL_LUNG) & (lab_deep.array == LABEL_LUNG)
    assert np.median(ct_deep.array[lung]) < np.median(same[lung])
