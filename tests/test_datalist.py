"""common.datalist: lazy splits, the one case-id helper, the check before training (one message per problem)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.datalist import (
    batch_case_ids,
    case_id,
    case_id_of_path,
    datalist_field,
    load_split,
    require_cases,
    split_case_ids,
    validate_datalist,
    with_keys,
)
from common.errors import InputError
from common.io import save_volume
from common.volume import Volume


def _dataset(root, n=3, shape=(4, 4, 4)) -> str:
    items = []
    for i in range(n):
        case = root / f"case_{i}"
        save_volume(Volume.from_spacing(np.zeros(shape, np.float32), (2.0, 2.0, 2.0)), case / "ct.nii.gz")
        items.append({"id": f"case_{i}", "ct": f"case_{i}/ct.nii.gz"})
    path = root / "dataset.json"
    path.write_text(json.dumps({"training": items[:2], "validation": items[2:], "test": [], "spacing": [2.0] * 3}))
    return str(path)


def test_load_split_is_lazy_and_resolves_paths(tmp_path):
    assert load_split(tmp_path / "missing.json", "training") == []  # configs parse without data
    path = _dataset(tmp_path)
    items = load_split(path, "training")
    assert len(items) == 2 and items[0]["ct"] == str(tmp_path / "case_0" / "ct.nii.gz")
    assert load_split(path, "test") == [] and load_split(path, "nope") == []
    assert split_case_ids(path, "training") == ["case_0", "case_1"]  # MONAI made the ids absolute paths
    assert datalist_field(path, "spacing") == [2.0] * 3 and datalist_field(tmp_path / "x.json", "spacing", 1) == 1


def test_require_cases_says_which_file_and_split(tmp_path):
    path = _dataset(tmp_path)
    with pytest.raises(InputError, match="split 'test' has no cases.*never saw"):
        require_cases(load_split(path, "test"), path, "test")
    with pytest.raises(InputError, match="datalist not found"):
        require_cases([], tmp_path / "none.json", "test")
    assert require_cases([{"id": 1}], path, "test") == [{"id": 1}]


def test_case_id_from_ids_files_and_batches():
    assert case_id({"id": "/data/set/phantom_003"}) == "phantom_003"
    assert case_id({"case": "p7", "slice": 3}) == "p7"
    assert case_id({"ct": "/x/phantom_001/ct.nii.gz"}) == "phantom_001"  # generic file name: its folder
    assert case_id({"avg": "/x/ras_case.nii.gz"}, key="avg") == "ras_case"
    image = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": "/d/p9/pa.nii.gz"})
    assert case_id({"image": image}) == "p9"
    assert case_id({}, 5) == "case_0005"
    batch = {"id": ["/r/a", "/r/b"], "ct": torch.zeros(2, 1, 2, 2, 2)}
    assert batch_case_ids(batch) == ["a", "b"]
    assert batch_case_ids([{"id": "c"}, {"id": "d"}]) == ["c", "d"]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/x/LIDC-IDRI-0001.nii.gz", "LIDC-IDRI-0001"),  # suffix off (the longest: .nii.gz, not .nii)
        ("/x/case7/ct.nii.gz", "case7"),  # generic names: the folder is the case
        ("/x/case7/CT.nii.gz", "case7"),  # compared without case
        ("/x/case7/image.h5", "case7"),
        ("/x/case7/volume.npy", "case7"),
        ("/x/case7/scan.hdf5", "case7"),
        ("/x/p9/pa.png", "p9"),
        ("/x/ct_1.nii", "ct_1"),  # not generic
        ("ct.nii.gz", "ct"),  # no folder to name it
        ("/x/series_12", "series_12"),  # a DICOM folder
    ],
)
def test_case_id_of_path_is_the_one_rule(path, expected):
    """Build inputs (data_prep.inputs), datalist items and reports name a case from a path the same way."""
    from data_prep.inputs import input_case_id

    assert case_id_of_path(path) == expected
    assert case_id({"ct": path}) == expected
    assert input_case_id(path) == expected


@pytest.mark.parametrize(
    "path, expected",
    [("/x/p1-PA.png", "p1"), ("/x/p1_lateral.dcm", "p1"), ("/x/case7/pa.png", "case7"), ("/x/case7/L.dcm", "case7"),
     ("/x/case7/frontal.jpg", "case7"), ("/x/case7/image.png", "case7"), ("/x/chest.tif", "chest")],
)  # fmt: skip
def test_pipeline_case_names_follow_the_one_rule(path, expected):
    """X-ray inputs: the view tag comes off, then the case is named as everywhere (common.datalist.case_id_of_path)."""
    from xray2ct.pipeline import case_name

    assert case_name(path) == expected


def test_build_input_ids_are_safe_folder_names():
    from data_prep.inputs import input_case_id

    assert input_case_id("/x/patient 1 (copy).nii.gz") == "patient_1_copy_"
    assert input_case_id("/x/ä.nii.gz") == "_"


def test_validate_datalist_names_the_case_and_the_problem(tmp_path):
    path = _dataset(tmp_path)
    items = load_split(path, "training")
    assert validate_datalist(items, ["ct"], path, shapes={"ct": [4, 4, -1]}, progress=False) == items
    with pytest.raises(InputError, match=r"case 'case_0' \(training split of .*\): no 'pa' entry"):
        validate_datalist(items, ["ct", "pa"], path, progress=False)
    with pytest.raises(InputError, match=r"case 'case_0'.*ct has shape \(4, 4, 4\), the config expects \(8, 8, 8\)"):
        validate_datalist(items, ["ct"], path, shapes={"ct": [8, 8, 8]}, progress=False)
    missing = [*items, {"id": "gone", "ct": str(tmp_path / "gone" / "ct.nii.gz")}]
    with pytest.raises(InputError, match="case 'gone'.*ct file not found") as info:
        validate_datalist(missing, ["ct"], path, progress=False)
    assert info.value.path.endswith("gone/ct.nii.gz")
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "case_0" / "ct.nii.gz"))
    with pytest.raises(InputError, match="case 'case_0'.*1 NaN or infinite value"):
        validate_datalist(items, ["ct"], path, progress=False)
    validate_datalist(items, ["ct"], path, check_values=False, progress=False)  # headers only
    (tmp_path / "case_1" / "ct.nii.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(InputError, match="case 'case_1'.*ct unreadable"):
        validate_datalist(items, ["ct"], path, check_values=False, progress=False)
    with pytest.raises(InputError, match="split 'validation' has no cases"):
        validate_datalist([], ["ct"], path, split="validation")


def test_validate_datalist_same_shape_groups(tmp_path):
    save_volume(Volume.from_spacing(np.zeros((4, 4, 3), np.float32)), tmp_path / "a.nii.gz")
    save_volume(Volume.from_spacing(np.zeros((4, 4, 2), np.float32)), tmp_path / "b.nii.gz")
    item = {"id": "pair", "avg": str(tmp_path / "a.nii.gz"), "phase0": str(tmp_path / "b.nii.gz")}
    with pytest.raises(InputError, match="case 'pair'.*shapes differ"):
        validate_datalist([item], ["avg", "phase0"], same_shape=[["avg", "phase0"]], progress=False)


def test_with_keys_copies_monai_label_keys_where_the_datalist_key_is_absent():
    monai_label = [{"image": "a.nii.gz", "label": "b.nii.gz"}]
    ours = [{"id": "p0", "avg": "x.nii.gz", "phase0": "y.nii.gz"}]
    aliases = {"image": "avg", "label": "phase0"}
    assert with_keys(monai_label, aliases) == [{"image": "a.nii.gz", "label": "b.nii.gz", "avg": "a.nii.gz", "phase0": "b.nii.gz"}]
    assert with_keys(ours, aliases) == ours  # nothing to copy: our datalists are unchanged
    assert with_keys([{"image": "a", "ct": "c"}], {"image": "ct"}) == [{"image": "a", "ct": "c"}]  # never overwrites
    assert monai_label == [{"image": "a.nii.gz", "label": "b.nii.gz"}]  # inputs are not modified
