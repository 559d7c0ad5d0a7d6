"""common.xray: loading real radiographs (PNG, JPEG, DICOM, NIfTI, arrays) and preprocessing them."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import traced, write_film
from PIL import Image

from common.errors import InputError
from common.xray import load_xray, match_histogram, percentile_normalise, preprocess_xray, square

DICOM_NAME = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


# ----------------------------------------------------------------------------------------------- real data
def test_frontal_png(shared_data):
    path = shared_data / "cxr" / "frontal" / "00000001_000.png"
    image, spacing = load_xray(path)
    assert image.shape == (512, 512) and image.dtype == np.float32 and spacing is None
    expected = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_real_dicom(shared_data):
    path = shared_data / "cxr" / "frontal" / DICOM_NAME
    image, spacing = load_xray(path)
    assert image.shape == (1024, 1024) and spacing == pytest.approx((0.168, 0.168))
    assert image.min() == 0.0 and image.max() == 1.0
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)  # MONOCHROME2, no rescale, no window
    np.testing.assert_allclose(image, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


@pytest.mark.parametrize("case", ["covid-19-pneumonia-7", "pneumocystis-pneumonia-2"])
def test_pa_lateral_pairs_colour_to_gray(shared_data, case):
    for view in ("PA", "L"):
        (path,) = (shared_data / "cxr" / "pairs").glob(f"{case}-{view}.*")
        image, spacing = load_xray(path)
        width, height = Image.open(path).size
        assert image.shape == (height, width) and spacing is None
        assert 0.0 <= image.min() < 0.1 and 0.8 < image.max() <= 1.0
        out = preprocess_xray(image, size=64)
        assert out.shape == (64, 64) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.1
        np.testing.assert_array_equal(out, preprocess_xray(path, size=64))  # deterministic, path or array


# ----------------------------------------------------------------------------------------------- synthetic files
def test_16bit_png_scaled_by_65535(tmp_path):
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    path = tmp_path / "x16.png"
    Image.fromarray(values).save(path)
    image, _ = load_xray(path)
    np.testing.assert_allclose(image, values / 65535.0, atol=1e-6)


def test_monochrome1_dicom_is_inverted_and_rescaled(tmp_path):
    pixels = np.zeros((8, 10), dtype=np.uint16)
    pixels[:4] = 4000  # top half bright in MONOCHROME1 = dark (air) on display
    path = tmp_path / "mono1.dcm"
    write_film(
        path, pixels, "MONOCHROME1", "CR", RescaleSlope=2, RescaleIntercept=-100, ImagerPixelSpacing=[0.2, 0.3]
    )
    image, spacing = load_xray(path)
    assert spacing == pytest.approx((0.2, 0.3))  # no PixelSpacing: the detector's spacing
    assert image[:4].max() == 0.0 and image[4:].min() == 1.0


def test_dicom_voi_window_applied(tmp_path):
    pixels = np.tile(np.arange(0, 4000, 400, dtype=np.uint16), (6, 1))  # columns 0, 400, ..., 3600
    path = tmp_path / "win.dcm"
    write_film(path, pixels, "MONOCHROME2", "CR", WindowCenter=1000, WindowWidth=800, PixelSpacing=[0.15, 0.15])
    image, spacing = load_xray(path)
    assert spacing == pytest.approx((0.15, 0.15))
    # window [600, 1400]: 0 and 400 black, 1600 and above white, 800 and 1200 at 1/4 and 3/4
    assert np.all(image[:, :2] == 0.0) and np.all(image[:, 4:] == 1.0)
    assert image[0, 2] == pytest.approx(0.25, abs=0.01) and image[0, 3] == pytest.approx(0.75, abs=0.01)


def test_nifti_drr_roundtrip(tmp_path):
    drr = np.random.default_rng(0).uniform(0, 1, (12, 16)).astype(np.float32)
    path = tmp_path / "pa.nii.gz"
    nib.save(nib.Nifti1Image(drr, np.diag([0.5, 0.7, 1.0, 1.0])), path)
    image, spacing = load_xray(path)
    np.testing.assert_array_equal(image, drr)  # [0, 1] DRRs are kept exactly
    assert spacing == pytest.approx((0.5, 0.7))


def test_arrays():
    u8 = np.array([[0, 51], [204, 255]], dtype=np.uint8)
    np.testing.assert_allclose(load_xray(u8)[0], u8 / 255.0)
    rgb = np.stack([u8.repeat(5, 0).repeat(5, 1)] * 3, axis=-1)
    np.testing.assert_allclose(load_xray(rgb)[0], u8.repeat(5, 0).repeat(5, 1) / 255.0, atol=1e-6)
    hu_like = np.array([[-1000.0, 0.0], [500.0, 1000.0]])
    np.testing.assert_allclose(load_xray(hu_like)[0], [[0, 0.5], [0.75, 1.0]])


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_xray(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputError, match="cannot read image"):
        load_xray(corrupt)
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"not a dicom file at all")
    with pytest.raises(InputError, match="cannot read DICOM"):
        load_xray(not_dicom)
    volume = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), dtype=np.float32), np.eye(4)), volume)
    with pytest.raises(InputError, match="2D"):
        load_xray(volume)
    with pytest.raises(InputError, match="NaN"):
        load_xray(np.full((4, 4), np.nan))
    with pytest.raises(InputError, match="empty"):
        load_xray(np.zeros((0, 5)))
    with pytest.raises(InputError, match="blank"):
        load_xray(np.full((4, 4), 7.0))
    with pytest.raises(InputError, match="contrast"):
        preprocess_xray(np.zeros((8, 8), dtype=np.float32))


# ----------------------------------------------------------------------------------------------- preprocessing
def test_square_crop_and_pad_are_centred():
    image = np.zeros((40, 80), dtype=np.float32)
    image[:, 40:] = 1.0
    cropped = square(image, "crop")
    assert cropped.shape == (40, 40) and cropped[:, :20].max() == 0 and cropped[:, 20:].min() == 1
    padded = square(image, "pad")
    assert padded.shape == (80, 80) and padded[:20].max() == 0 and padded[60:].max() == 0
    np.testing.assert_array_equal(padded[20:60], image)


def test_percentile_normalisation_saturates_the_tails():
    image = np.random.default_rng(1).normal(0.4, 0.1, (200, 200)).astype(np.float32)
    image[:5, :5] = 50.0  # a burnt-in marker must not set the white level
    out = percentile_normalise(image)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out == 1.0) == pytest.approx(0.005, abs=0.001)
    assert np.mean(out == 0.0) == pytest.approx(0.005, abs=0.001)
    assert 0.4 < np.median(out) < 0.6


def test_preprocess_keeps_orientation_and_size():
    image = np.zeros((90, 60), dtype=np.float32)
    image[:30, :30] = 1.0  # bright top-left corner
    image[30:, 30:] = 0.5
    out = preprocess_xray(image, size=32, square_mode="pad", percentiles=None)
    assert out.shape == (32, 32)
    assert out[:4, 6:9].mean() == pytest.approx(1.0, abs=0.05)  # padding is 5 px at 32 px, the corner is next
    assert out[:, :4].max() == 0.0  # zero padding on the left
    up = preprocess_xray(image[22:38, 22:38], size=32, percentiles=None)  # growing: bilinear
    assert up.shape == (32, 32) and up[0, 0] == pytest.approx(1.0) and up[-1, -1] == pytest.approx(0.5)


def test_histogram_matching_follows_the_reference():
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 1, (64, 64)).astype(np.float32)
    reference = rng.beta(2.0, 5.0, (50, 50))  # a darker, skewed DRR-like histogram
    out = preprocess_xray(image, size=64, percentiles=None, reference=reference)
    for q in (10, 50, 90):
        assert np.percentile(out, q) == pytest.approx(np.percentile(reference, q), abs=0.02)
    flat = np.argsort(image.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[flat]) >= 0)  # monotone: pixel order preserved
    np.testing.assert_array_equal(match_histogram(image, reference), match_histogram(image, reference))


# ----------------------------------------------------------------------------------------------- issue 14 item 15
def test_declared_sizes_refused_before_decoding(tmp_path, png_bomb):
    """An X-ray DICOM or PNG declaring 60000 x 60000 raised MemoryError / DecompressionBombError."""
    for compressed in (True, False):  # RLE: the decoder allocates the declared size first
        dicom = tmp_path / f"huge{compressed}.dcm"
        write_film(dicom, np.arange(80, dtype=np.uint16).reshape(8, 10), "MONOCHROME2", "CR")
        ds = pydicom.dcmread(dicom)
        if compressed:
            ds.compress(pydicom.uid.RLELossless)
        ds.Rows = ds.Columns = 60000
        ds.save_as(dicom)
        with pytest.raises(InputError, match="over the limit") as err:
            load_xray(dicom)
        assert err.value.path == str(dicom) and "60000 x 60000" in str(err.value)
    for width, height in ((60000, 60000), (9000, 9000)):  # Pillow's own guard, then ours
        png = tmp_path / f"bomb{width}.png"
        png.write_bytes(png_bomb(width, height))
        with pytest.raises(InputError, match="too large|over the limit") as err:
            load_xray(png)
        assert err.value.path == str(png)


def test_padding_to_a_square_checked_before_allocating():
    """A (2, 60000) image padded to a square would be 60000 x 60000 (13 GiB as float32)."""

    with traced() as memory, pytest.raises(InputError, match="60000 x 60000"):
        preprocess_xray(np.linspace(0, 1, 120000, dtype=np.float32).reshape(2, 60000), 32, square_mode="pad")
    peak = memory.peak
    assert peak < 64 * 2**20
