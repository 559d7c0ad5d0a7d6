"""Volume I/O round trips (geometry preserved exactly), atomic writes, and bad input naming the file."""

from __future__ import annotations

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
from helpers import traced

from common import io as vio
from common.errors import InputError
from common.io import load_volume, save_volume, sidecar_path
from common.volume import Volume

SUFFIXES = [".nii", ".nii.gz", ".h5", ".npy"]


def rotation_z(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def affine_from(direction: np.ndarray, spacing, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


AFFINES = {
    # anisotropic RAS with a non-zero origin
    "ras_anisotropic": affine_from(np.eye(3), (0.7, 1.3, 2.5), (-120.5, 33.0, 410.25)),
    # DICOM-like LPS axes (x and y flipped) as produced by common.dicom
    "lps": affine_from(np.diag([-1.0, -1.0, 1.0]), (0.703125, 0.703125, 2.5), (166.0, 171.7, -340.0)),
    # permuted axes (sagittal stack, LAS-like) and an oblique 30 degree rotation
    "permuted": affine_from(np.array([[0, 0, -1.0], [1.0, 0, 0], [0, 1.0, 0]]), (2.0, 0.5, 1.0), (5, 6, 7)),
    "oblique": affine_from(rotation_z(30.0), (0.8, 1.1, 3.0), (12.0, -40.0, 7.5)),
}


@pytest.fixture()
def array() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 500, size=(7, 5, 4)).astype(np.float32)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_round_trip_preserves_voxels_and_geometry(tmp_path, array, suffix, name):
    vol = Volume(array, AFFINES[name])
    path = save_volume(vol, tmp_path / f"vol{suffix}")
    back = load_volume(path)
    np.testing.assert_array_equal(back.array, array)
    # NIfTI stores the sform as float32: exact to ~1e-5 mm at these magnitudes
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    assert back.orientation == vol.orientation
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"vol{suffix}"] + (["vol.json"] if suffix == ".npy" else [])
    )  # no temporary leftovers


def test_expected_orientation_codes():
    assert Volume(np.zeros((2, 2, 2)), AFFINES["lps"]).orientation == "LPS"
    assert Volume(np.zeros((2, 2, 2)), AFFINES["permuted"]).orientation == "ASL"


def test_int16_kept_when_dtype_none_and_nifti_scaling_applied(tmp_path):
    hu = np.arange(-1024, 1024, 16, dtype=np.int16).reshape(4, 4, 8)
    path = save_volume(Volume.from_spacing(hu, (1, 1, 2)), tmp_path / "ct.nii.gz")
    back = load_volume(path, dtype=None)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, hu)
    img = nib.Nifti1Image(hu, np.eye(4))
    img.header.set_slope_inter(2.0, -10.0)
    nib.save(img, tmp_path / "scaled.nii")
    np.testing.assert_allclose(load_volume(tmp_path / "scaled.nii").array, hu.astype(np.float32) * 2 - 10)


def test_hdf5_layout_and_spacing_only_fallback(tmp_path, array):
    path = save_volume(Volume(array, AFFINES["ras_anisotropic"]), tmp_path / "ct.h5")
    with h5py.File(path, "r") as f:
        assert f["ct"].shape == (7, 5, 4)
        np.testing.assert_allclose(f["ct"].attrs["spacing"], (0.7, 1.3, 2.5))
    with h5py.File(tmp_path / "legacy.h5", "w") as f:  # X2CT-GAN style file: voxels + spacing only
        f.create_dataset("ct", data=array)
        f["ct"].attrs["spacing"] = [1.0, 2.0, 3.0]
    back = load_volume(tmp_path / "legacy.h5")
    assert back.spacing == (1.0, 2.0, 3.0)
    np.testing.assert_allclose(back.origin, [-3.0, -4.0, -4.5])  # centred on 0


def test_npy_sidecar_contents(tmp_path, array):
    path = save_volume(Volume(array, AFFINES["oblique"]), tmp_path / "ct.npy")
    meta = json.loads(open(sidecar_path(path)).read())
    assert meta["shape"] == [7, 5, 4] and meta["space"] == "RAS"
    np.testing.assert_allclose(meta["spacing"], (0.8, 1.1, 3.0))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failed_write_leaves_no_file_and_keeps_old_one(tmp_path, array, monkeypatch, suffix):
    target = tmp_path / f"ct{suffix}"
    save_volume(Volume.from_spacing(array), target)
    before = target.read_bytes()

    def half_write_then_fail(*args, **kwargs):
        dest = args[1] if suffix.startswith(".nii") else args[0]
        if isinstance(dest, str | os.PathLike):
            with open(dest, "wb") as fh:
                fh.write(b"partial")
        else:
            dest.write(b"partial")
        raise OSError("disk full")

    if suffix.startswith(".nii"):
        monkeypatch.setattr(vio.nib, "save", half_write_then_fail)
    elif suffix == ".h5":
        monkeypatch.setattr(vio.h5py, "File", half_write_then_fail)
    else:
        monkeypatch.setattr(vio.np, "save", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_volume(Volume.from_spacing(array * 2), target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([target.name] + (["ct.json"] if suffix == ".npy" else []))
    target.unlink()
    with pytest.raises(OSError, match="disk full"):
        save_volume(Volume.from_spacing(array), tmp_path / f"new{suffix}")
    assert not any(n.startswith(("new", ".new")) for n in os.listdir(tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found") as err:
        load_volume(tmp_path / "absent.nii.gz")
    assert err.value.path.endswith("absent.nii.gz")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_nan_rejected_on_load_unless_allowed(tmp_path, array, suffix):
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    path = save_volume(Volume.from_spacing(array), tmp_path / f"nan{suffix}")
    with pytest.raises(InputError, match="2 NaN/infinite voxels") as err:
        load_volume(path)
    assert err.value.path == path
    assert np.isnan(load_volume(path, allow_nan=True).array[1, 2, 3])


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 5)])
def test_non_3d_rejected(tmp_path, shape):
    with pytest.raises(InputError, match="expected a 3D volume") as err:
        save_volume(Volume(np.zeros(shape, np.float32), np.eye(4)), tmp_path / "bad.nii.gz")
    assert err.value.path.endswith("bad.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), tmp_path / "written.nii.gz")
    with pytest.raises(InputError, match="3D volume") as err:
        load_volume(tmp_path / "written.nii.gz")
    assert err.value.path.endswith("written.nii.gz")
    np.save(tmp_path / "flat.npy", np.zeros(shape, np.float32))
    (tmp_path / "flat.json").write_text(json.dumps({"affine": np.eye(4).tolist()}))
    with pytest.raises(InputError, match="3D volume"):
        load_volume(tmp_path / "flat.npy")


def test_trailing_singleton_nifti_is_3d(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5, 1), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    assert load_volume(tmp_path / "t.nii.gz").shape == (3, 4, 5)


def test_zero_spacing_rejected(tmp_path, array):
    with pytest.raises(InputError, match="spacing must be positive"):
        save_volume(Volume(array, np.diag([1.0, 0.0, 2.0, 1.0])), tmp_path / "z.nii.gz")
    np.save(tmp_path / "z.npy", array)
    (tmp_path / "z.json").write_text(json.dumps({"spacing": [1.0, 0.0, 2.0]}))
    with pytest.raises(InputError, match="spacing must be positive") as err:
        load_volume(tmp_path / "z.npy")
    assert err.value.path.endswith("z.npy")
    with h5py.File(tmp_path / "z.h5", "w") as f:
        f.create_dataset("ct", data=array)
        f["ct"].attrs["affine"] = np.diag([0.0, 1.0, 1.0, 1.0])
    with pytest.raises(InputError, match="spacing must be positive"):
        load_volume(tmp_path / "z.h5")


def test_negative_sidecar_spacing_rejected(tmp_path, array):
    np.save(tmp_path / "neg.npy", array)
    (tmp_path / "neg.json").write_text(json.dumps({"spacing": [1.0, -1.0, 2.0]}))
    with pytest.raises(InputError, match="spacing"):
        load_volume(tmp_path / "neg.npy")


def test_zero_pixdim_nifti_rejected(tmp_path, array):
    """A header with a zero voxel size (and no s/qform) is refused, not read as 1 mm."""
    path = tmp_path / "zero.nii"
    nib.save(nib.Nifti1Image(array, None), path)
    raw = bytearray(path.read_bytes())
    raw[80:84] = np.float32(0.0).tobytes()  # pixdim[1] of the NIfTI-1 header (nibabel refuses to write it)
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="spacing"):
        load_volume(path)


def test_npy_without_sidecar(tmp_path, array):
    np.save(tmp_path / "ct.npy", array)
    with pytest.raises(InputError, match="no geometry sidecar ct.json") as err:
        load_volume(tmp_path / "ct.npy")
    assert err.value.path.endswith("ct.npy")


def test_h5_without_key_or_geometry(tmp_path, array):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("image", data=array)
    with pytest.raises(InputError, match=r"no 'ct' dataset \(found: \['image'\]\)") as err:
        load_volume(tmp_path / "other.h5")
    assert err.value.path.endswith("other.h5")
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f.create_dataset("ct", data=array)
    with pytest.raises(InputError, match="spacing unknown"):
        load_volume(tmp_path / "bare.h5")


def test_unknown_suffix(tmp_path, array):
    (tmp_path / "ct.mha").write_bytes(b"xx")
    with pytest.raises(InputError, match="unknown volume format") as err:
        load_volume(tmp_path / "ct.mha")
    assert err.value.path.endswith("ct.mha")
    with pytest.raises(InputError, match="unknown volume format"):
        save_volume(Volume.from_spacing(array), tmp_path / "out.mha")
    assert not (tmp_path / "out.mha").exists()


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_nifti_gz(tmp_path, fraction):
    array = np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32)
    path = save_volume(Volume.from_spacing(array), tmp_path / "ct.nii.gz")
    data = open(path, "rb").read()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputError, match="cannot read nifti file") as err:
        load_volume(broken)
    assert err.value.path == str(broken)


def test_truncated_h5_and_npy(tmp_path, array):
    for name in ("ct.h5", "ct.npy"):
        path = save_volume(Volume.from_spacing(array), tmp_path / name)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        with pytest.raises(InputError, match=name):
            load_volume(path)


# ----------------------------------------------------------------------------------------------- issue 14 item 15
def forged_nifti(path, shape=(600, 600, 600), dtype=np.float32) -> None:
    """A NIfTI header declaring ``shape`` and no voxel data at all (76 bytes once gzipped)."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms((1.0,) * len(shape))
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)


def traced_peak(fn) -> tuple[int, InputError]:
    """(peak traced bytes, the InputError) of ``fn()``, which must refuse its input."""
    with traced() as memory, pytest.raises(InputError) as err:
        fn()
    return memory.peak, err.value


def test_forged_nifti_header_refused_before_allocating(tmp_path):
    """A 76-byte .nii.gz declaring 600^3 float32 allocated 864 MB before failing."""
    path = tmp_path / "forged.nii.gz"
    forged_nifti(path)
    assert path.stat().st_size < 100
    peak, err = traced_peak(lambda: load_volume(path))
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB allocated"
    assert "forged" in str(err) and str(path) in str(err)
    raw = tmp_path / "forged.nii"
    forged_nifti(raw)
    peak, err = traced_peak(lambda: load_volume(raw))
    assert peak < 32 * 2**20 and "truncated" in str(err)


def test_chunked_h5_without_data_refused(tmp_path):
    """A chunked .h5 with no chunk written read as an all-zero volume (864 MB at 600^3)."""
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "ct", shape=(256, 256, 256), dtype=np.float32, chunks=(64, 64, 64), compression="gzip"
        )
        ds.attrs["affine"] = np.eye(4)
    peak, err = traced_peak(lambda: load_volume(path))
    assert peak < 32 * 2**20 and "0 of its 64 chunks" in str(err)
    with h5py.File(path, "a") as f:
        f["ct"][:64, :64, :64] = 1.0  # one chunk of 64: still mostly fill values
    with pytest.raises(InputError, match="1 of its 64 chunks"):
        load_volume(path)
    contiguous = tmp_path / "contiguous.h5"
    with h5py.File(contiguous, "w") as f:
        f.create_dataset("ct", shape=(64, 64, 64), dtype=np.float32).attrs["affine"] = np.eye(4)
    with pytest.raises(InputError, match="never written"):
        load_volume(contiguous)


def test_truncated_npy_and_voxel_limit(tmp_path, array):
    big = tmp_path / "big.npy"
    with open(big, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (600, 600, 600)}
        )
    (tmp_path / "big.json").write_text(json.dumps({"spacing": [1, 1, 1]}))
    peak, err = traced_peak(lambda: load_volume(big))
    assert peak < 32 * 2**20 and "truncated" in str(err)
    path = save_volume(Volume.from_spacing(array, (1, 1, 1)), tmp_path / "ok.nii.gz")
    assert load_volume(path, max_voxels=array.size).shape == array.shape
    with pytest.raises(InputError, match="over the limit"):
        load_volume(path, max_voxels=array.size - 1)


def test_partial_files_are_not_volumes(tmp_path, array):
    """Issue 14 item 20: the hidden temporary file of a killed atomic write is refused by name."""
    path = save_volume(Volume.from_spacing(array, (1, 1, 1)), tmp_path / "ct.nii.gz")
    leftover = tmp_path / ".ct.nii.gz.k2j4h1x_.part.nii.gz"
    os.link(path, leftover)
    with pytest.raises(InputError, match="interrupted write"):
        load_volume(leftover)


def test_atomic_writes_respect_the_umask(tmp_path, array):
    """Issue 14 item 20: files were 0600 whatever the umask (mkstemp's mode)."""
    import stat

    from common.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        for mask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
            os.umask(mask)
            text = tmp_path / f"t{mask:o}.json"
            atomic_write_text(text, "{}")
            assert stat.S_IMODE(os.stat(text).st_mode) == mode, (oct(mask), text)
            for suffix in (".nii.gz", ".h5", ".npy"):
                out = save_volume(Volume.from_spacing(array, (1, 1, 1)), tmp_path / f"v{mask:o}{suffix}")
                assert stat.S_IMODE(os.stat(out).st_mode) == mode, (oct(mask), out)
    finally:
        os.umask(old)
