"""common.preview: montage/GIF/X-ray files, sizes from spacing and anatomical orientation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.errors import InputError
from common.preview import (
    GAP,
    LABEL_HEIGHT,
    oriented_slice,
    render_montage,
    save_montage_png,
    save_slice_gif,
    save_xray_png,
)
from common.volume import Volume

AIR, BLOB = -1000.0, 1000.0


def _blob_volume(shape=(20, 20, 20)) -> np.ndarray:
    """Air with a bright block in the patient's right-anterior-superior octant (high X, Y, Z in RAS)."""
    vol = np.full(shape, AIR, dtype=np.float32)
    vol[shape[0] // 2 :, shape[1] // 2 :, shape[2] // 2 :] = BLOB
    return vol


def _bright_quadrant(panel: np.ndarray) -> tuple[str, str]:
    """("top"|"bottom", "left"|"right") of the brightest image quadrant."""
    h, w = panel.shape
    top = panel[: h // 2].mean() > panel[h // 2 :].mean()
    left = panel[:, : w // 2].mean() > panel[:, w // 2 :].mean()
    return ("top" if top else "bottom", "left" if left else "right")


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_right_anterior_superior_blob_is_top_left_in_every_view(view):
    # axial: anterior up, patient right on the left; coronal: superior up, right on the left;
    # sagittal: superior up, anterior on the left.
    assert _bright_quadrant(oriented_slice(_blob_volume(), view)) == ("top", "left")


def test_montage_orientation_and_layout(tmp_path):
    vol = _blob_volume()
    path = save_montage_png(tmp_path / "montage.png", {"prediction": vol, "ground truth": vol}, window="lung")
    image = np.asarray(Image.open(path))
    panel = 256  # 20 mm at 1 mm spacing drawn 256 px wide
    assert image.shape == (2 * (panel + LABEL_HEIGHT) + 3 * GAP, 3 * panel + 4 * GAP)
    for col in range(3):  # the first row's three panels, label band excluded
        x0, y0 = GAP + col * (panel + GAP), GAP + LABEL_HEIGHT
        assert _bright_quadrant(image[y0 : y0 + panel, x0 : x0 + panel].astype(float)) == ("top", "left")
    label_band = image[GAP : GAP + LABEL_HEIGHT, GAP : GAP + panel]
    assert label_band.max() > 0  # the row/view label is drawn


def test_anisotropic_spacing_is_resampled_for_display():
    vol = np.random.default_rng(0).uniform(-1000, 500, (40, 30, 10)).astype(np.float32)
    volume = Volume.from_spacing(vol, spacing=(0.5, 1.0, 4.0))  # 20 x 30 x 40 mm
    image = render_montage({"ct": volume}, panel_size=120)  # 40 mm -> 120 px: 1/3 mm per pixel
    # axial 30 (A) x 20 (R) mm -> 90 x 60 px; coronal 40 (S) x 20 (R) -> 120 x 60; sagittal 40 x 30 -> 120 x 90
    assert image.size == (60 + 60 + 90 + 4 * GAP, 120 + LABEL_HEIGHT + 2 * GAP)


def test_montage_sizes_follow_each_axis_mm():
    vol = np.zeros((10, 20, 40), dtype=np.float32)
    image = render_montage({"ct": vol}, spacing=(2.0, 1.0, 0.5), panel_size=40)  # 20 mm cube
    assert image.size == (3 * 40 + 4 * GAP, 40 + LABEL_HEIGHT + 2 * GAP)


def test_montage_with_xrays(tmp_path):
    xray = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
    path = save_montage_png(tmp_path / "m.png", {"ct": _blob_volume()}, xrays={"PA": xray, "lateral": xray})
    image = np.asarray(Image.open(path))
    assert image.shape[0] == 2 * LABEL_HEIGHT + 256 + 256 + 3 * GAP  # volume row + X-ray row (256 tall)
    y0 = 2 * GAP + LABEL_HEIGHT + 256 + LABEL_HEIGHT
    x_row = image[y0 : y0 + 256, GAP : GAP + 128]
    assert x_row[0].mean() < x_row[-1].mean()  # the X-ray's dark top / bright bottom is kept


def test_gif_frames_differ_and_are_capped(tmp_path):
    vol = np.zeros((16, 16, 30), dtype=np.float32)
    vol += np.arange(30, dtype=np.float32)[None, None, :] * 40.0 - 1000.0  # brighter towards superior
    path = save_slice_gif(
        tmp_path / "ax.gif", vol, axis="axial", window="lung", compare=vol[::-1], max_frames=10
    )
    gif = Image.open(path)
    assert gif.n_frames == 10
    side = round(16 * 256 / 30)  # 16 mm of a 30 mm field drawn on 256 px
    assert gif.size == (2 * side + 3 * GAP, side + 2 * GAP)  # side by side with the comparison
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("L"), dtype=float))
    assert frames[-1].mean() > frames[0].mean()  # first frame inferior, last superior
    assert not np.array_equal(frames[0], frames[1])


def test_xray_png_roundtrip(tmp_path):
    image = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    png8 = np.asarray(Image.open(save_xray_png(tmp_path / "x8.png", image)))
    assert png8.shape == (20, 30) and png8.dtype == np.uint8 and png8[0, 0] == 0 and png8[-1, -1] == 255
    png16 = np.asarray(Image.open(save_xray_png(tmp_path / "x16.png", image, bits=16)))
    assert int(png16.max()) == 65535


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="3D"):
        save_montage_png(tmp_path / "a.png", {"ct": np.zeros((4, 4))})
    with pytest.raises(InputError, match="NaN"):
        save_slice_gif(tmp_path / "a.gif", np.full((4, 4, 4), np.nan))
    with pytest.raises(InputError, match="does not match"):
        save_slice_gif(tmp_path / "a.gif", np.zeros((4, 4, 4)), compare=np.zeros((4, 4, 5)))
    with pytest.raises(InputError, match="2D"):
        save_xray_png(tmp_path / "x.png", np.zeros((3, 4, 5)))
    assert not list(tmp_path.iterdir())  # nothing half-written
