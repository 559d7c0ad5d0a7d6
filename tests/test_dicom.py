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
        [f"LIDC-IDRI-0001_3000566_{uid}.nii.gz", "unknown_na_no-uid-CT-Body-3.0-CT-ebbcfeba.nii.gz"]
    )
    chest = load_volume(out / f"LIDC-IDRI-0001_3000566_{uid}.nii.gz")
    reference = load_dicom_series(mixed_archive / "chest")
    np.testing.assert_array_equal(chest.array, reference.array)
    np.testing.assert_allclose(chest.affine, reference.affine, atol=1e-4)
    abdomen = load_volume(out / "unknown_na_no-uid-CT-Body-3.0-CT-ebbcfeba.nii.gz")
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


# ----------------------------------------------------------------------------------------------- issue 14: hostile series
def test_blank_uid_series_never_overwrite_each_other(chest_five, tmp_path):
    """Item 7: blank SeriesInstanceUID + descriptions that sanitise alike give two files; reruns keep them."""
    from data_prep.dicom_to_nifti import convert_folder

    root = tmp_path / "archive"
    for folder, description, intercept in (("a", "Lung (soft)", -1024), ("b", "Lung [soft]", -924)):
        copy = shutil.copytree(chest_five, root / folder)
        for f in copy.iterdir():
            edit(f, SeriesInstanceUID="", SeriesDescription=description, RescaleIntercept=intercept)
    out = tmp_path / "nifti"
    results, _ = convert_folder(root, out)
    assert [r.ok for r in results] == [True, True]
    outputs = sorted(p.name for p in out.iterdir())
    assert len(outputs) == 2 and len({r.output for r in results}) == 2
    volumes = [load_volume(r.output) for r in results]
    assert abs(float(volumes[0].array.mean() - volumes[1].array.mean())) == pytest.approx(100.0)
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again, _ = convert_folder(root, out)  # never overwritten silently: kept and reported
    assert [r.status for r in again] == ["exists", "exists"]
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    replaced, _ = convert_folder(root, out, overwrite=True)
    assert [r.status for r in replaced] == ["ok", "ok"] and sorted(p.name for p in out.iterdir()) == outputs


def test_negative_pixel_spacing_rejected(chest_five):
    """Item 8: a negative PixelSpacing would mirror the volume left-right and front-back."""
    for f in chest_five.iterdir():
        edit(f, PixelSpacing=[-0.703125, -0.703125])
    with pytest.raises(InputError, match=r"PixelSpacing must be 2 positive numbers") as err:
        load_dicom_series(chest_five)
    assert err.value.path.endswith(".dcm")


@pytest.mark.parametrize("tag,value", [("RescaleSlope", "NaN"), ("RescaleIntercept", "Infinity")])
def test_non_finite_rescale_rejected_and_never_saved(chest_five, tmp_path, tag, value):
    """Item 9: RescaleSlope NaN made an all-NaN volume that was written as "ok"."""
    from data_prep.dicom_to_nifti import convert_folder

    victim = sorted(chest_five.iterdir())[3]
    ds = pydicom.dcmread(victim)
    ds[tag].value = value
    ds.save_as(victim)
    with pytest.raises(InputError, match=tag) as err:
        load_dicom_series(chest_five)
    assert err.value.path == str(victim)
    results, _ = convert_folder(chest_five, tmp_path / "out")
    assert not results[0].ok and victim.name in results[0].error
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_zero_pixel_spacing_error_names_the_dicom(chest_five, tmp_path):
    """Item 10: PixelSpacing 0 is reported against the DICOM file (not the output) and by analyze."""
    from data_prep.analyze import analyze_folder
    from data_prep.dicom_to_nifti import convert_folder

    for f in chest_five.iterdir():
        edit(f, PixelSpacing=[0, 0])
    results, _ = convert_folder(chest_five, tmp_path / "out")
    assert not results[0].ok and ".dcm" in results[0].error and ".nii.gz" not in results[0].error
    assert "PixelSpacing" in results[0].error
    series = analyze_folder(chest_five)["dicom_series"]
    assert "PixelSpacing" in series[0]["problem"] and series[0]["spacing"] is None


def test_single_stray_slice_is_converted_with_a_warning(chest_five, tmp_path, capsys):
    """Item 10: one slice of another series in the folder would silently become a 512x512x1 volume."""
    from data_prep.analyze import analyze_folder
    from data_prep.dicom_to_nifti import convert_folder, main

    stray = chest_five / "stray.dcm"
    shutil.copy(sorted(chest_five.iterdir())[0], stray)
    edit(stray, SeriesInstanceUID="1.2.3.999", SeriesNumber=99)
    results, _ = convert_folder(chest_five, tmp_path / "out")
    single = next(r for r in results if r.n_files == 1)
    assert single.ok and single.status == "WARNING" and "512x512x1" in single.warnings[0]
    assert "stray.dcm" in single.warnings[0]
    assert all(not r.warnings for r in results if r.n_files == 5)
    main(str(chest_five), str(tmp_path / "cli"))  # warnings alone do not fail the run
    printed = capsys.readouterr().out
    assert "WARNING" in printed and "1 with warnings" in printed
    rows = {s["n_files"]: s for s in analyze_folder(chest_five)["dicom_series"]}
    assert rows[1]["warnings"] and not rows[5]["warnings"]


def test_analyze_decode_finds_truncated_pixels_headers_miss(abdomen_dir, tmp_path):
    """Item 10: a truncated compressed slice passes the header survey; --decode finds it, and the report says so."""
    from data_prep.analyze import analyze_folder

    names = sorted(p.name for p in abdomen_dir.iterdir())[:4]
    folder = copy_slices(abdomen_dir, tmp_path / "abd", names)
    victim = folder / names[2]
    victim.write_bytes(victim.read_bytes()[:60000])
    quick = analyze_folder(folder)
    assert quick["dicom_series"][0]["problem"] is None and not quick["dicom_series"][0]["pixels_decoded"]
    assert any("--decode" in item for item in quick["checks"]["not_checked"])
    full = analyze_folder(folder, decode=True)
    row = full["dicom_series"][0]
    assert names[2] in row["problem"] and "decode" in row["problem"]
    assert full["checks"]["not_checked"] == []
    good = analyze_folder(copy_slices(abdomen_dir, tmp_path / "good", names), decode=True)["dicom_series"][0]
    assert good["pixels_decoded"] and good["hu_min"] == -1024.0 and good["hu_max"] > 0


def test_scan_ignores_partial_files_of_interrupted_writes(chest_five):
    """Item 20: a hidden ``.x.dcm.<random>.part.dcm`` left by kill -9 is not a slice of the series."""
    first = sorted(chest_five.iterdir())[0]
    shutil.copy(first, chest_five / f".{first.name}.k2j4h1x_.part.dcm")
    scan = scan_dicom_folder(chest_five)
    assert len(scan) == 1 and scan[0].n_files == 5
    assert load_dicom_series(chest_five).shape == (512, 512, 5)


# -- PerX2CT's conventions (issue 24 item 3) ----------------------------------------------------------------
def test_z_spacing_slice_thickness_stretches_overlapping_slices(chest_five, tmp_path):
    """Five slices 2.5 mm apart declared 5 mm thick (overlapping): PerX2CT's conversion (0_dicom2mhd.py l. 45)
    spaces them by SliceThickness, ours by position; only the z column of the affine changes."""
    for f in chest_five.iterdir():
        edit(f, SliceThickness="5.0")
    ours = load_dicom_series(chest_five)
    theirs = load_dicom_series(chest_five, z_spacing="slice_thickness")
    assert ours.spacing[2] == pytest.approx(2.5, abs=1e-6) and theirs.spacing[2] == pytest.approx(5.0, abs=1e-6)
    np.testing.assert_array_equal(theirs.array, ours.array)
    np.testing.assert_array_equal(theirs.affine[:, [0, 1, 3]], ours.affine[:, [0, 1, 3]])
    np.testing.assert_allclose(theirs.affine[:3, 2], 2.0 * ours.affine[:3, 2], rtol=1e-12)
    with pytest.raises(ValueError, match="z_spacing"):
        load_dicom_series(chest_five, z_spacing="thickness")
    from data_prep.dicom_to_nifti import convert_folder

    results, _ = convert_folder(chest_five, tmp_path / "out", z_spacing="slice_thickness")
    assert results[0].ok and results[0].spacing[2] == pytest.approx(5.0)
    assert any("stretched x2 along z, as in PerX2CT" in w for w in results[0].warnings), results[0].warnings
    results, _ = convert_folder(chest_five, tmp_path / "out2")
    assert results[0].spacing[2] == pytest.approx(2.5) and not results[0].warnings


def test_z_spacing_slice_thickness_needs_the_tag(chest_five):
    for f in chest_five.iterdir():
        edit(f, SliceThickness="0")
    with pytest.raises(InputError, match="positive SliceThickness"):
        load_dicom_series(chest_five, z_spacing="slice_thickness")


def test_instance_number_direction(chest_five):
    """LIDC-IDRI-0001 numbers its instances superior -> inferior, as PerX2CT's D0 assumes; renumbered the
    other way, the original's InstanceNumber stacking would flip it, our position sort would not."""
    from common.dicom import instance_number_direction

    (info,) = list(scan_dicom_folder(chest_five))
    assert instance_number_direction(info) == "superior_to_inferior"
    before = load_dicom_series(chest_five)
    files = sorted(chest_five.iterdir(), key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
    for i, f in enumerate(reversed(files)):
        edit(f, InstanceNumber=i + 1)
    (info,) = list(scan_dicom_folder(chest_five))
    assert instance_number_direction(info) == "inferior_to_superior"
    after = load_dicom_series(chest_five)
    np.testing.assert_array_equal(after.array, before.array)
    np.testing.assert_array_equal(after.affine, before.affine)


def test_real_siemens_series_with_overlapping_slices(abdomen_dir):
    """The real abdomen series: 3 mm slices every 2 mm; PerX2CT's convention stretches it 1.5x in z."""
    from common.dicom import instance_number_direction

    ours = load_dicom_series(abdomen_dir)
    theirs = load_dicom_series(abdomen_dir, z_spacing="slice_thickness")
    assert ours.spacing[2] == pytest.approx(2.0, abs=1e-3) and theirs.spacing[2] == pytest.approx(3.0, abs=1e-3)
    (info,) = list(scan_dicom_folder(abdomen_dir))
    assert instance_number_direction(info) == "superior_to_inferior"
