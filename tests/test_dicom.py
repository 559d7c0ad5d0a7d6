"""DICOM series loading: geometry against ITK and the NIfTI of the same scan, and every defect caught."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from common.dicom import load_dicom_series, scan_dicom_folder
from common.errors import InputError
from common.io import load_volume


@pytest.fixture(scope="session")
def abdomen_dir(shared_data) -> Path:
    folder = shared_data / "dicom" / "abdomen_ct_20slices"
    if not folder.is_dir():
        pytest.skip(f"{folder} missing")
    return folder


@pytest.fixture(scope="session")
def chest_nifti() -> Path:
    example_ct = pytest.importorskip("data_prep.example_ct")
    try:
        return Path(example_ct.fetch_example_ct()["ct"])
    except Exception as e:
        pytest.skip(f"example CT unavailable: {e}")


def itk_ras_affine(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """ITK's ImageSeriesReader geometry (LPS) converted to a RAS affine, plus its voxels as (x, y, z)."""
    itk = pytest.importorskip("itk")
    names = itk.GDCMSeriesFileNames.New(Directory=str(folder))
    files = list(names.GetFileNames(names.GetSeriesUIDs()[0]))
    image = itk.imread(files, itk.F)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()) @ np.diag(np.asarray(image.GetSpacing()))
    lps[:3, 3] = np.asarray(image.GetOrigin())
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, itk.array_from_image(image).transpose(2, 1, 0)


def copy_slices(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.fixture()
def chest_five(chest_dicom_dir, tmp_path) -> Path:
    """Five consecutive chest slices (uncompressed, 2.5 mm apart) in a scratch folder."""
    names = sorted(p.name for p in chest_dicom_dir.glob("*.dcm"))[60:65]
    return copy_slices(chest_dicom_dir, tmp_path / "five", names)


def test_abdomen_series_matches_itk(abdomen_dir):
    vol = load_dicom_series(abdomen_dir)
    assert vol.shape == (512, 512, 20)
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.spacing, (0.9765625, 0.9765625, 2.0))
    assert vol.orientation == "LPS"  # DICOM's native axes, expressed in the RAS world
    # IPP of the most inferior slice (-804.5) is the origin; x and y flip sign LPS -> RAS.
    np.testing.assert_allclose(vol.origin, (249.51171875, 437.51171875, -804.5))
    assert vol.array.min() == -1024.0  # air outside the body after RescaleIntercept -1024
    itk_affine, itk_voxels = itk_ras_affine(abdomen_dir)
    np.testing.assert_allclose(vol.affine, itk_affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, itk_voxels)


def test_load_volume_dispatches_folders_to_dicom(abdomen_dir):
    assert load_volume(abdomen_dir).shape == (512, 512, 20)


def test_chest_series_matches_itk_and_nifti(chest_dicom_dir, chest_nifti):
    vol = load_dicom_series(chest_dicom_dir)
    assert vol.shape == (512, 512, 133)
    np.testing.assert_allclose(vol.spacing, (0.703125, 0.703125, 2.5))
    itk_affine, _ = itk_ras_affine(chest_dicom_dir)
    np.testing.assert_allclose(vol.affine, itk_affine, atol=1e-4)
    nifti = load_volume(chest_nifti)
    assert nifti.shape == (512, 512, 133)
    np.testing.assert_allclose(nifti.spacing, vol.spacing, atol=1e-5)
    a, b = vol.to_canonical(), nifti.to_canonical()
    assert a.orientation == b.orientation == "RAS"
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    np.testing.assert_array_equal(a.array, b.array)


def test_slices_sorted_by_position_not_file_name(chest_five, tmp_path):
    reference = load_dicom_series(chest_five)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, f in enumerate(sorted(chest_five.iterdir())):  # reverse the name order
        shutil.copy(f, renamed / f"{9 - i:02d}.dcm")
    vol = load_dicom_series(renamed)
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_allclose(vol.affine, reference.affine)
    z = [
        float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        for f in chest_five.iterdir()
    ]
    assert vol.origin[2] == pytest.approx(min(z))  # slice 0 is the lowest position along the normal


def test_rescale_slope_and_intercept_applied(chest_five):
    first = sorted(chest_five.iterdir())[0]
    edit(first, RescaleSlope=2, RescaleIntercept=-1000)
    raw = pydicom.dcmread(first).pixel_array.astype(np.float32)
    z = float(pydicom.dcmread(first).ImagePositionPatient[2])
    vol = load_dicom_series(chest_five)
    k = int(round((z - vol.origin[2]) / vol.spacing[2]))
    np.testing.assert_array_equal(vol.array[:, :, k], (raw * 2 - 1000).T)


def test_scan_ignores_non_dicom_and_reports_corrupt(chest_five):
    (chest_five / "notes.txt").write_text("not a DICOM file")
    (chest_five / "sub").mkdir()
    first = sorted(chest_five.glob("*.dcm"))[0]
    data = first.read_bytes()
    (chest_five / "sub" / "broken.dcm").write_bytes(data[:2000])
    scan = scan_dicom_folder(chest_five)
    assert len(scan) == 1 and scan[0].n_files == 5
    assert [Path(p.path).name for p in scan.problems] == ["broken.dcm"]
    assert "truncated" in scan.problems[0].problem
    assert scan_dicom_folder(chest_five, recursive=False).problems == []
    with pytest.raises(InputError, match="broken.dcm"):
        load_dicom_series(chest_five)


def test_truncated_pixel_data_raises(chest_five):
    victim = sorted(chest_five.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(InputError, match=victim.name):
        load_dicom_series(chest_five)


def test_truncated_compressed_slice_raises(abdomen_dir, tmp_path):
    names = sorted(p.name for p in abdomen_dir.iterdir())[:4]
    folder = copy_slices(abdomen_dir, tmp_path / "abd", names)
    victim = folder / names[1]
    victim.write_bytes(victim.read_bytes()[:60000])
    with pytest.raises(InputError, match=r"cannot decode pixel data") as err:
        load_dicom_series(folder)
    assert victim.name in str(err.value)


def test_missing_middle_slice(chest_five):
    sorted(chest_five.iterdir())[2].unlink()
    with pytest.raises(InputError, match=r"1 missing slice"):
        load_dicom_series(chest_five)


def test_irregular_spacing(chest_five):
    f = sorted(chest_five.iterdir())[1]
    x, y, z = (float(v) for v in pydicom.dcmread(f).ImagePositionPatient)
    edit(f, ImagePositionPatient=[x, y, z + 0.7])
    with pytest.raises(InputError, match=r"irregular slice spacing"):
        load_dicom_series(chest_five)


def test_duplicate_position(chest_five):
    files = sorted(chest_five.iterdir())
    edit(files[3], ImagePositionPatient=list(pydicom.dcmread(files[1]).ImagePositionPatient))
    with pytest.raises(InputError, match=r"duplicate slice position"):
        load_dicom_series(chest_five)


def test_gantry_tilt(chest_five):
    angle = np.radians(5.0)  # columns tilted in the y-z plane, positions still stacked along z
    iop = [1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(np.sin(angle))]
    for f in chest_five.iterdir():
        edit(f, ImageOrientationPatient=iop)
    with pytest.raises(InputError, match=r"gantry tilt") as err:
        load_dicom_series(chest_five)
    assert "5.00 deg" in str(err.value)


@pytest.mark.parametrize(
    ("tag", "value", "message"),
    [
        ("PixelSpacing", [0.8, 0.8], "PixelSpacing"),
        ("ImageOrientationPatient", [0.0, 1.0, 0.0, 1.0, 0.0, 0.0], "ImageOrientationPatient"),
    ],
)
def test_mismatched_slice_geometry(chest_five, tag, value, message):
    victim = sorted(chest_five.iterdir())[3]
    edit(victim, **{tag: value})
    with pytest.raises(InputError, match=message) as err:
        load_dicom_series(chest_five)
    assert victim.name in str(err.value)


def test_mismatched_rows(chest_five):
    victim = sorted(chest_five.iterdir())[3]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.pixel_array[:256].tobytes()
    ds.Rows = 256
    ds.save_as(victim)
    with pytest.raises(InputError, match=r"Rows 256 differs"):
        load_dicom_series(chest_five)


def test_two_series_need_a_uid(chest_five, abdomen_dir):
    for f in sorted(abdomen_dir.iterdir())[:3]:
        shutil.copy(f, chest_five / f.name)
    scan = scan_dicom_folder(chest_five)
    assert sorted(s.n_files for s in scan) == [3, 5]
    with pytest.raises(InputError, match=r"2 series found") as err:
        load_dicom_series(chest_five)
    for s in scan:
        assert s.uid in str(err.value)
    chest = next(s for s in scan if s.n_files == 5)
    assert load_dicom_series(chest_five, series_uid=chest.uid).shape == (512, 512, 5)
    with pytest.raises(InputError, match="not found"):
        load_dicom_series(chest_five, series_uid="1.2.3")


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM files"):
        load_dicom_series(tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_dicom_series(tmp_path / "nope")


@pytest.fixture()
def mixed_archive(chest_five, abdomen_dir, tmp_path) -> Path:
    """Three series: abdomen (4 slices, no UID), chest (5), and a chest copy with a new UID and a gap."""
    root = tmp_path / "archive"
    copy_slices(abdomen_dir, root / "abdomen", sorted(p.name for p in abdomen_dir.iterdir())[:4])
    shutil.copytree(chest_five, root / "chest")
    gappy = shutil.copytree(chest_five, root / "study2" / "gappy")
    for f in gappy.iterdir():
        edit(f, SeriesInstanceUID="1.2.3.4.5", SeriesNumber=7)
    sorted(gappy.iterdir())[2].unlink()
    (root / "README.txt").write_text("not DICOM")
    return root


def test_dicom_to_nifti_converts_good_series_and_reports_bad(mixed_archive, tmp_path, capsys):
    from data_prep.dicom_to_nifti import main

    out = tmp_path / "nifti"
    with pytest.raises(SystemExit) as exit_info:
        main(str(mixed_archive), str(out))
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "2 of 3 series converted" in printed
    assert "FAILED" in printed and "1 missing slice" in printed and "gappy" in printed
    names = sorted(p.name for p in out.iterdir())
    uid = pydicom.dcmread(next((mixed_archive / "chest").iterdir())).SeriesInstanceUID
    assert names == sorted(
        [f"LIDC-IDRI-0001_3000566_{uid}.nii.gz", "unknown_na_no-uid-CT-Body-3.0-CT.nii.gz"]
    )
    chest = load_volume(out / f"LIDC-IDRI-0001_3000566_{uid}.nii.gz")
    reference = load_dicom_series(mixed_archive / "chest")
    np.testing.assert_array_equal(chest.array, reference.array)
    np.testing.assert_allclose(chest.affine, reference.affine, atol=1e-4)
    abdomen = load_volume(out / "unknown_na_no-uid-CT-Body-3.0-CT.nii.gz")
    assert abdomen.shape == (512, 512, 4)
    np.testing.assert_allclose(abdomen.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-5)


def test_dicom_to_nifti_cli_single_series_exit_code(mixed_archive, tmp_path, repo_root):
    import subprocess
    import sys

    uid = pydicom.dcmread(next((mixed_archive / "chest").iterdir())).SeriesInstanceUID
    cmd = [
        sys.executable,
        "-m",
        "data_prep.dicom_to_nifti",
        str(mixed_archive),
        str(tmp_path / "o"),
        "--series_uid",
    ]
    ok = subprocess.run([*cmd, uid], capture_output=True, text=True, cwd=repo_root)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 of 1 series converted" in ok.stdout
    assert [p.name for p in (tmp_path / "o").iterdir()] == [f"LIDC-IDRI-0001_3000566_{uid}.nii.gz"]
    bad = subprocess.run([*cmd, "1.2.3.4.5"], capture_output=True, text=True, cwd=repo_root)
    assert bad.returncode == 1 and "missing slice" in bad.stdout
