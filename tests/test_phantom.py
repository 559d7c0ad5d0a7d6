"""Synthetic thorax phantom: determinism, realistic HU, anatomy, emboli, breathing, dataset layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.errors import InputError
from common.io import load_volume
from data_prep.layout import assign_splits
from data_prep.phantom import breathing_amplitude, make_4dct, make_phantom

SHAPE = (48, 48, 48)
SPACING = 7.0


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, SPACING, seed=5, emboli=3)


def test_same_seed_identical_other_seed_differs():
    a, la = make_phantom(SHAPE, SPACING, seed=2, emboli=2)
    b, lb = make_phantom(SHAPE, SPACING, seed=2, emboli=2)
    c, _ = make_phantom(SHAPE, SPACING, seed=3, emboli=2)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.affine, b.affine)
    for key in ("lungs", "pulmonary_arteries", "emboli"):
        np.testing.assert_array_equal(la[key], lb[key])
    assert not np.array_equal(a.array, c.array)


def test_geometry_canonical_and_centred(phantom):
    vol, _ = phantom
    assert vol.shape == SHAPE
    assert vol.orientation == "RAS"
    np.testing.assert_allclose(vol.spacing, (SPACING,) * 3)
    centre = vol.affine @ np.array([(n - 1) / 2 for n in SHAPE] + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
    assert vol.array.dtype == np.float32


def test_default_spacing_spans_a_chest():
    vol, labels = make_phantom((32, 32, 32), seed=0)
    np.testing.assert_allclose(vol.spacing, (12.0, 12.0, 12.0))
    assert labels["lungs"].sum() > 0 and not labels["body"][0].any()  # air around the body


@pytest.mark.parametrize(
    "structure, lo, hi",
    [
        ("lungs", -880, -820),
        ("heart", 20, 60),
        ("pulmonary_arteries", 300, 400),
        ("ribs", 700, 1000),
        ("spine", 300, 1000),
        ("emboli", 20, 60),
    ],
)
def test_hu_per_structure(phantom, structure, lo, hi):
    vol, labels = phantom
    mask = labels[structure]
    assert mask.sum() > 0, structure
    assert lo <= float(vol.array[mask].mean()) <= hi


def test_air_fat_soft_tissue_and_cortical_bone(phantom):
    vol, labels = phantom
    hu = vol.array
    assert abs(float(hu[~labels["body"]].mean()) + 1000) < 5
    soft = labels["body"] & ~np.any(
        [labels[k] for k in ("lungs", "heart", "pulmonary_arteries", "spine", "ribs")], 0
    )
    values = hu[soft]
    assert np.mean(np.abs(values + 100) < 40) > 0.1  # subcutaneous fat
    assert np.mean(np.abs(values - 40) < 40) > 0.5  # muscle / mediastinum
    assert 700 <= float(np.percentile(hu[labels["spine"]], 90)) <= 1000  # cortical shell


def test_anatomy_sides(phantom):
    vol, labels = phantom

    def centroid(mask):
        idx = np.argwhere(mask).mean(0)
        return (vol.affine @ np.append(idx, 1.0))[:3]

    heart, spine = centroid(labels["heart"]), centroid(labels["spine"])
    assert heart[0] < -5  # patient's left (RAS x < 0)
    assert heart[1] > 10  # anterior
    assert spine[1] < -40  # posterior
    lungs = labels["lungs"]
    half = SHAPE[0] // 2
    assert lungs[half:].sum() > 0.5 * lungs[:half].sum() > 0  # both lungs, the right one not much smaller


def test_emboli_inside_arteries_and_labels(phantom):
    _, labels = phantom
    assert labels["pe"] == 1 and labels["n_emboli"] == 3
    assert labels["emboli"].any()
    assert not (labels["emboli"] & ~labels["pulmonary_arteries"]).any()
    _, clean = make_phantom(SHAPE, SPACING, seed=5, emboli=0)
    assert clean["pe"] == 0 and clean["n_emboli"] == 0 and not clean["emboli"].any()
    np.testing.assert_array_equal(clean["pulmonary_arteries"], labels["pulmonary_arteries"])


def test_emboli_lower_the_hu_only_inside_arteries():
    a, la = make_phantom(SHAPE, SPACING, seed=4, emboli=2, noise_hu=0)
    b, _ = make_phantom(SHAPE, SPACING, seed=4, emboli=0, noise_hu=0)
    changed = a.array != b.array
    np.testing.assert_array_equal(changed, la["emboli"])
    assert np.all(b.array[changed] - a.array[changed] == pytest.approx(310.0))


def test_breathing_moves_lungs_not_spine():
    n = 4
    inhale, li = make_phantom(SHAPE, SPACING, seed=1, phase=0, n_phases=n, noise_hu=0)
    exhale, le = make_phantom(SHAPE, SPACING, seed=1, phase=n // 2, n_phases=n, noise_hu=0)
    assert breathing_amplitude(0, n) == 0.0 and breathing_amplitude(n // 2, n) == 1.0
    np.testing.assert_array_equal(li["spine"], le["spine"])
    np.testing.assert_array_equal(inhale.array[li["spine"]], exhale.array[le["spine"]])
    assert le["lungs"].sum() < 0.95 * li["lungs"].sum()  # exhale: smaller lungs
    base_inhale = np.argwhere(li["lungs"])[:, 2].min()
    base_exhale = np.argwhere(le["lungs"])[:, 2].min()
    assert base_exhale > base_inhale  # the diaphragm rises
    same_phase, _ = make_phantom(SHAPE, SPACING, seed=1, phase=n, n_phases=n, noise_hu=0)
    np.testing.assert_array_equal(same_phase.array, inhale.array)  # the cycle is periodic


def test_make_4dct_average():
    phases, average = make_4dct((24, 24, 16), n_phases=4, seed=0, spacing=(14.0, 14.0, 18.0))
    assert len(phases) == 4 and average.shape == (24, 24, 16)
    np.testing.assert_allclose(average.array, np.mean([p.array for p in phases], 0), atol=1e-3)
    np.testing.assert_array_equal(average.affine, phases[0].affine)
    assert not np.array_equal(phases[0].array, phases[2].array)


@pytest.mark.parametrize(
    "kwargs",
    [dict(shape=(32, 32)), dict(spacing=(1.0, float("nan"), 1.0)), dict(spacing=-2.0), dict(n_phases=0)],
)
def test_bad_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        make_phantom(**{"shape": (16, 16, 16), **kwargs})


# ------------------------------------------------------------------------------------- dataset (fixtures)
def test_phantom_pairs_layout(phantom_pairs):
    root, datalist = phantom_pairs["root"], json.loads(phantom_pairs["datalist"].read_text())
    items = datalist["training"] + datalist["validation"] + datalist["test"]
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [4, 2, 2]
    assert sorted(e["label"] for e in items) == [0, 0, 0, 0, 1, 1, 1, 1]
    for split in ("training", "validation", "test"):
        assert {e["label"] for e in datalist[split]} == {0, 1}  # stratified
    assert datalist["spacing"] == [10.0, 10.0, 10.0] and datalist["size"] == [32, 32, 32]
    assert datalist["geometry"]["detector_pixels"] == [32, 32] and datalist["hu_window"]["name"] == "xray2ct"
    for e in items:
        assert set(e) == {"id", "ct", "pa", "lateral", "spacing", "label", "source"}
        assert e["source"] == e["id"]  # each phantom its own source: reports say cross-source
        ct = load_volume(root / e["ct"])
        assert ct.shape == (32, 32, 32) and ct.orientation == "RAS"
        np.testing.assert_allclose(ct.spacing, (10.0, 10.0, 10.0))
        for view in ("pa", "lateral"):
            drr = np.asarray(nib.load(root / e[view]).dataobj)
            assert drr.shape == (32, 32) and drr.dtype == np.float32
            assert 0.0 <= drr.min() and drr.max() < 1.0 and drr.std() > 0.01
        label = json.loads((root / e["id"] / "label.json").read_text())
        assert label["pe"] == e["label"] and (label["n_emboli"] > 0) == bool(e["label"])


def test_phantom_pairs_drrs_show_the_phantom(phantom_pairs):
    """The PA DRR is brighter over the spine (middle columns) than over the lungs."""
    root, datalist = phantom_pairs["root"], json.loads(phantom_pairs["datalist"].read_text())
    pa = np.asarray(nib.load(root / datalist["training"][0]["pa"]).dataobj)
    rows = slice(8, 16)  # upper chest: lungs on both sides of the mediastinum
    assert pa[rows, 15:17].mean() > pa[rows, 8:11].mean() + 0.05
    assert pa[rows, 15:17].mean() > pa[rows, 21:24].mean() + 0.05


def test_phantom_4dct_fixture(phantom_4dct):
    assert len(phantom_4dct["avg"]) == len(phantom_4dct["phase0"]) == 3
    datalist = json.loads(phantom_4dct["datalist"].read_text())
    assert len(datalist["training"]) == len(datalist["validation"]) == len(datalist["test"]) == 1
    for avg_path, phase0_path, case in zip(
        phantom_4dct["avg"], phantom_4dct["phase0"], phantom_4dct["cases"]
    ):
        avg, phase0 = load_volume(avg_path), load_volume(phase0_path)
        assert avg.shape == phase0.shape == (32, 32, 16)
        np.testing.assert_allclose(avg.spacing, (10.0, 10.0, 16.0))
        np.testing.assert_array_equal(load_volume(case["ct"]).array, phase0.array)
        assert np.abs(avg.array - phase0.array).max() > 100  # motion blur near the diaphragm
        assert case["phase"] == 0 and case["n_phases"] == 4


def test_split_is_deterministic_and_stratified():
    ids = [f"case_{i:02d}" for i in range(20)]
    strata = {c: i % 2 for i, c in enumerate(ids)}
    a = assign_splits(ids, 0.2, 0.1, seed=0, strata=strata)
    assert a == assign_splits(list(reversed(ids)), 0.2, 0.1, seed=0, strata=strata)
    assert a != assign_splits(ids, 0.2, 0.1, seed=1, strata=strata)
    counts = {s: sum(v == s for v in a.values()) for s in ("training", "validation", "test")}
    assert counts == {"training": 14, "validation": 4, "test": 2}
    for split in ("validation", "test"):
        assert {strata[c] for c, s in a.items() if s == split} == {0, 1}
    with pytest.raises(ValueError):
        assign_splits(ids, 0.6, 0.5)


def _mid_lung_size_mm(body: np.ndarray, lungs: np.ndarray, spacing) -> tuple[float, float]:
    """(width, depth) in mm of the body at the middle of the lungs' height."""
    zs = np.where(lungs.any((0, 1)))[0]
    k = (zs.min() + zs.max()) // 2
    xs, ys = np.where(body[:, :, k].any(1))[0], np.where(body[:, :, k].any(0))[0]
    return (xs.max() - xs.min() + 1) * spacing[0], (ys.max() - ys.min() + 1) * spacing[1]


def test_patients_spread_like_adult_chests_and_cover_the_real_ct(example_ct):
    """40 phantoms span the documented body sizes; the real example CT lies inside that spread."""
    sizes = []
    for seed in range(40):
        _, labels = make_phantom((64, 64, 64), 6.0, seed=seed, noise_hu=0)
        sizes.append(_mid_lung_size_mm(labels["body"], labels["lungs"], (6.0, 6.0, 6.0)))
    width, depth = np.array(sizes).T
    assert 270 <= width.min() < 300 and 335 < width.max() <= 360  # documented 278-354 mm
    assert 190 <= depth.min() < 210 and 235 < depth.max() <= 260  # documented 197-251 mm
    assert np.corrcoef(width, depth)[0, 1] < 0.5  # drawn independently: the depth/width ratio varies
    from scipy import ndimage

    real = load_volume(example_ct["ct"]).to_canonical()
    hu = real.array
    components, _ = ndimage.label(hu > -500)
    body = components == np.argmax(np.bincount(components.ravel())[1:]) + 1  # the patient, not the table
    inside = np.stack([ndimage.binary_fill_holes(body[:, :, k]) for k in range(hu.shape[2])], axis=-1)
    lung_area = (inside & (hu < -400)).sum((0, 1)) * real.spacing[0] * real.spacing[1]
    lungs = inside & (lung_area > 2000.0)  # slices with > 20 cm^2 of lung (not the trachea alone)
    w, d = _mid_lung_size_mm(body, lungs, real.spacing)
    assert width.min() < w < width.max() and depth.min() < d < depth.max(), (w, d)
