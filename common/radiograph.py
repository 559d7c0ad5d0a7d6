"""A clinical radiograph mapped onto the geometry of the DRRs a model was trained on (issue 22, item 1).

:func:`common.xray.load_xray` gives the film in [0, 1] (modality and VOI LUTs applied, MONOCHROME1 inverted);
:func:`prepare_view` then

1. crops collimation borders and padding (uniform rows/columns at the edges: the collimator's unexposed
   shadow or a scanner's black frame), and fills burnt-in markers (small saturated blobs: "L", "R", text)
   with the local median;
2. finds the patient's scale in mm per pixel at the isocentre plane, and says where it came from
   (``scale_source``): DICOM ``PixelSpacing`` (calibrated) or ``ImagerPixelSpacing`` divided by
   ``EstimatedRadiographicMagnificationFactor``, else by ``DistanceSourceToDetector`` / (SID - the usual
   isocentre-to-detector distance); a film without tags (PNG/JPEG) or with a scale that gives an implausible
   body width gets the scale that makes its body width an adult's (:data:`ADULT_BODY_MM`): an estimate;
3. resamples so that a millimetre of patient covers as many pixels as in the training DRRs (their
   isocentre pixel spacing), percentile-normalises, and crops/pads to the model's square centred on the body.

AP films (``ViewPosition`` AP: portable, source in front, SID ~1000 mm) are scaled with their own
magnification and flagged: the heart, far from the detector, is magnified more than in a PA film. Beam
divergence itself (1800 mm films vs the 949 mm DRR presets) is not undone by a 2D rescale: train on the
``clinical`` DRR preset (:data:`common.drr.CLINICAL`) for that.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from common.datalist import load_split
from common.drr import DRRGeometry
from common.errors import InputError
from common.xray import DICOM_SUFFIXES, check_pixel_count, load_xray, percentile_normalise

# Adult chest breadth (PA: body width at mid-thorax) and depth (lateral), mm: rounded means of adult men and
# women in the ANSUR II anthropometric survey (Gordon et al. 2014: chest breadth ~300-330 mm, chest depth
# ~240-260 mm). Used only to estimate the scale of a film that carries none (PNG/JPEG).
ADULT_BODY_MM = {"pa": 320.0, "lateral": 250.0}
# Internal thoracic width (rib to rib at mid-thorax, the denominator of the cardiothoracic ratio), mm at the
# patient: ~28 cm on adult PA films (Danzer 1919; Hemingway & Bricker; films magnify ~1.1x), about 255-265 mm
# at the patient. Used when the arms hide the body's edges.
ADULT_THORAX_MM = 260.0
# A scale read from tags is trusted when it gives a body width in this range (mm); else it is estimated.
PLAUSIBLE_BODY_MM = {"pa": (220.0, 480.0), "lateral": (160.0, 400.0)}
# Typical source-to-detector distances (mm) and isocentre-to-detector distances (patient against the receptor)
CLINICAL_SID_MM = {"PA": 1800.0, "AP": 1000.0, "LATERAL": 1500.0}
ISOCENTRE_TO_DETECTOR_MM = {"pa": 160.0, "lateral": 180.0}
WORK_PIXELS = 1024  # films are box-downsampled to at most this many pixels a side first (speed, memory)
DICOM_TAGS = ("PixelSpacing", "ImagerPixelSpacing", "EstimatedRadiographicMagnificationFactor",
              "DistanceSourceToDetector", "ViewPosition", "PhotometricInterpretation", "Modality")  # fmt: skip


def read_tags(path: str) -> dict:
    """The geometry tags of a DICOM radiograph (header only; {} for other files or unreadable headers)."""
    if not path.lower().endswith(DICOM_SUFFIXES):
        return {}
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(DICOM_TAGS))
    except Exception:  # the pixel loader reports unreadable files with their reason
        return {}
    out: dict = {}
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        try:
            spacing = [float(v) for v in value] if value is not None else []
        except (TypeError, ValueError):
            spacing = []
        if len(spacing) == 2 and all(np.isfinite(s) and 0 < s < 10 for s in spacing):
            out[key] = spacing
    for key in ("EstimatedRadiographicMagnificationFactor", "DistanceSourceToDetector"):
        try:
            value = float(ds.get(key)) if ds.get(key) not in (None, "") else None
        except (TypeError, ValueError):
            value = None
        if value is not None and np.isfinite(value) and value > 0:
            out[key] = value
    for key in ("ViewPosition", "PhotometricInterpretation", "Modality"):
        if ds.get(key):
            out[key] = str(ds.get(key)).strip().upper()
    return out


# ----------------------------------------------------------------------------------------------- film clean-up
def collimation_box(image: np.ndarray, max_fraction: float = 0.25, tolerance: float = 0.02) -> tuple[int, ...]:
    """(top, bottom, left, right) rows/columns of uniform border to drop: collimator shadow or padding.

    A border row (column) is uniform when its standard deviation is under ``tolerance`` (intensities in
    [0, 1]: quantisation noise of an 8-bit film is 0.004) and its mean is within ``4 * tolerance`` of the
    previous border line's; at most ``max_fraction`` of the image per side.
    """
    h, w = image.shape

    def run(lines: np.ndarray, limit: int) -> int:
        n = 0
        while n < limit and lines[n].std() < tolerance and abs(lines[n].mean() - lines[0].mean()) < 4 * tolerance:
            n += 1
        return n

    top = run(image, int(h * max_fraction))
    bottom = run(image[::-1], int(h * max_fraction))
    left = run(image.T, int(w * max_fraction))
    right = run(image.T[::-1], int(w * max_fraction))
    return top, bottom, left, right


def suppress_markers(image: np.ndarray, max_area_fraction: float = 0.002) -> tuple[np.ndarray, int]:
    """Fill small saturated blobs (burnt-in letters, rulers, lead markers) from their surroundings.

    Saturated: within 1/255 of the image's maximum (an 8-bit film's top code); a marker: a connected blob of
    at least 4 pixels (single saturated pixels are noise or bone) and under ``max_area_fraction`` of the image
    (not a bright region of anatomy). Filled by normalised convolution (a Gaussian average of the pixels
    around, sigma 8 px). Returns the image and the number of pixels filled.
    """
    from scipy import ndimage

    top = float(image.max())
    labels, n = ndimage.label(image >= top - 1.0 / 255)
    if n == 0:
        return image, 0
    sizes = np.bincount(labels.ravel())[1:]
    small = np.flatnonzero((sizes >= 4) & (sizes <= max_area_fraction * image.size)) + 1
    if small.size == 0:
        return image, 0
    markers = ndimage.binary_dilation(np.isin(labels, small), iterations=2)  # the letters' anti-aliased rim
    keep = (~markers).astype(np.float32)
    weight = ndimage.gaussian_filter(keep, 8.0)
    fill = ndimage.gaussian_filter(image * keep, 8.0) / np.maximum(weight, 1e-6)
    out = image.copy()
    out[markers] = np.where(weight[markers] > 1e-3, fill[markers], np.median(image))
    return out, int(markers.sum())


def body_extent(image: np.ndarray) -> dict:
    """Where the body is along the columns of a film in [0, 1] (display convention: air dark).

    The column profile of the mid-thorax rows (35-65 % of the height); air outside the body is its darkest
    part, the chest wall (skin, muscle, ribs) brighter: the body runs from the first to the last column
    brighter than a quarter of the way from air (2nd percentile) to the central third's median (so the dark
    lungs inside count as body). ``{"left", "right", "centre", "width_px", "reaches_edge"}``;
    ``reaches_edge``: the body touches a side of the film (arms, tight crop), so its width is a lower bound
    and says nothing reliable about the scale.
    """
    h, w = image.shape
    band = image[int(0.35 * h) : max(int(0.65 * h), int(0.35 * h) + 1)]
    profile = np.convolve(band.mean(0), np.ones(5) / 5, mode="same")
    air = float(np.percentile(profile, 2))
    chest = float(np.median(profile[w // 3 : 2 * w // 3]))
    inside = np.flatnonzero(profile > air + 0.25 * (chest - air))
    left, right = (int(inside[0]), int(inside[-1])) if inside.size else (0, w - 1)
    margin = max(2, int(0.01 * w))
    return {
        "left": left, "right": right, "centre": float((left + right) / 2), "width_px": int(right - left + 1),
        "reaches_edge": bool(left < margin or right > w - 1 - margin),
    }  # fmt: skip


def lung_field_extent(image: np.ndarray, body: dict) -> dict | None:
    """Outer edges of the two lung fields on a PA film's mid-thorax profile (None when not found).

    Each lung is the darkest stretch between the body's edge and the mediastinum; its outer edge the first
    column, going out from the lung's darkest point, brighter than halfway to the chest wall's brightest.
    ``{"left", "right", "width_px"}``: the internal thoracic width, measurable when the arms hide the body edge.
    """
    h, w = image.shape
    band = image[int(0.35 * h) : max(int(0.65 * h), int(0.35 * h) + 1)]
    profile = np.convolve(band.mean(0), np.ones(5) / 5, mode="same")
    centre, gap = int(body["centre"]), max(2, int(0.05 * w))
    edges = []
    for lo, hi, step in ((body["left"], centre - gap, -1), (centre + gap, body["right"] + 1, 1)):
        if hi - lo < 4:
            return None
        lung = lo + int(np.argmin(profile[lo:hi]))
        outer = profile[body["left"] : lung + 1] if step < 0 else profile[lung : body["right"] + 1]
        wall = float(outer.max())
        half = profile[lung] + 0.5 * (wall - profile[lung])
        k = lung
        while body["left"] < k < body["right"] and profile[k] < half:
            k += step
        edges.append(k)
    left, right = edges
    if right - left < 0.3 * w:
        return None
    return {"left": int(left), "right": int(right), "width_px": int(right - left + 1)}


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    shrinking = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)
    return out[0, 0].numpy()


def _view_key(view: str) -> str:
    if view not in ("pa", "lateral"):
        raise ValueError(f"view must be 'pa' or 'lateral', got {view!r}")
    return view


# ----------------------------------------------------------------------------------------------- scale
def tag_scale(tags: dict, view: str) -> tuple[float | None, str, list[str]]:
    """(mm of patient per pixel at the isocentre plane, source, warnings) from DICOM tags (None: no tags)."""
    warnings: list[str] = []
    position = tags.get("ViewPosition", "")
    if view == "pa" and position == "AP":
        warnings.append("AP film (ViewPosition AP): the heart is magnified more than in a PA film; the model "
                        "was trained on PA-geometry DRRs")  # fmt: skip
    pixel, imager = tags.get("PixelSpacing"), tags.get("ImagerPixelSpacing")
    # PixelSpacing differing from ImagerPixelSpacing is calibrated at the patient; equal to it, it is not
    calibrated = pixel is not None and (imager is None or abs(np.mean(pixel) / np.mean(imager) - 1) > 0.01)
    if calibrated and "EstimatedRadiographicMagnificationFactor" not in tags:
        return float(np.mean(pixel)), "DICOM PixelSpacing", warnings
    detector = tags.get("ImagerPixelSpacing") or tags.get("PixelSpacing")
    if detector is None:
        return None, "none", warnings
    name = "ImagerPixelSpacing" if "ImagerPixelSpacing" in tags else "PixelSpacing"
    factor = tags.get("EstimatedRadiographicMagnificationFactor")
    if factor is not None and not 1.0 <= factor <= 3.0:
        warnings.append(f"EstimatedRadiographicMagnificationFactor {factor:g} is not a film's (1 to 3): ignored")
        factor = None
    if factor is not None:
        return float(np.mean(detector)) / factor, f"DICOM {name} / EstimatedRadiographicMagnificationFactor", warnings
    key = "LATERAL" if view == "lateral" else ("AP" if position == "AP" else "PA")
    sid = tags.get("DistanceSourceToDetector")
    source = f"DICOM {name}, magnification from DistanceSourceToDetector"
    if sid is None:
        sid = CLINICAL_SID_MM[key]
        source = f"DICOM {name}, magnification of a typical {key} film (SID {sid:.0f} mm)"
    depth = ISOCENTRE_TO_DETECTOR_MM[view]
    if not 2 * depth < sid <= 5000:
        warnings.append(f"DistanceSourceToDetector {sid} mm is implausible; typical {key} SID used")
        sid = CLINICAL_SID_MM[key]
    return float(np.mean(detector)) * (sid - depth) / sid, source, warnings


def prepare_view(
    source: str | os.PathLike | np.ndarray,
    view: str,
    geometry: DRRGeometry,
    size: int,
    clean: bool = True,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[np.ndarray, dict]:
    """A radiograph -> (size, size) float32 in [0, 1] on the training DRRs' isocentre scale, and what was done.

    ``geometry``: the model's DRR geometry (any pixel count; resized to ``size``). ``clean``: crop collimation,
    fill markers. The dict: ``scale_source``, ``input_mm_per_pixel``, ``training_mm_per_pixel``, ``scale``,
    ``body`` (extent in the input, width in mm), ``collimation`` (pixels cropped per side),
    ``markers_filled`` (pixels), ``view_position``, ``photometric``, ``warnings``.
    """
    view = _view_key(view)
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    tags = read_tags(path) if path else {}
    image, _ = load_xray(source)
    info: dict = {"view": view, "view_position": tags.get("ViewPosition"),
                  "photometric": tags.get("PhotometricInterpretation"), "warnings": []}  # fmt: skip
    work = 1.0  # input pixels per working pixel
    if max(image.shape) > WORK_PIXELS:
        work = max(image.shape) / WORK_PIXELS
        image = _resize(image, (max(2, round(image.shape[0] / work)), max(2, round(image.shape[1] / work))))
    box = (0, 0, 0, 0)
    if clean:
        box = collimation_box(image)
        t, b, left, r = box
        image = image[t : image.shape[0] - b, left : image.shape[1] - r]
        image, filled = suppress_markers(image)
        info["markers_filled"] = filled
    info["collimation"] = dict(zip(("top", "bottom", "left", "right"), (round(v * work) for v in box)))
    image = percentile_normalise(image, percentiles)
    body = body_extent(image)

    mm, scale_source, warnings = tag_scale(tags, view)
    info["warnings"] += warnings
    if mm is not None:
        mm *= work
        width = body["width_px"] * mm
        low, high = PLAUSIBLE_BODY_MM[view]
        if image.shape[1] * mm < low:
            info["warnings"].append(f"{scale_source} makes the film {image.shape[1] * mm:.0f} mm wide, narrower "
                                    f"than an adult chest ({low:.0f} mm): scale estimated instead")  # fmt: skip
            mm = None
        elif not body["reaches_edge"] and not (low <= width <= high):
            info["warnings"].append(f"{scale_source} gives a body {width:.0f} mm wide, outside the adult "
                                    f"{low:.0f}-{high:.0f} mm: scale estimated instead")  # fmt: skip
            mm = None
    lungs = lung_field_extent(image, body) if view == "pa" else None
    if mm is None:
        if body["reaches_edge"] and lungs is not None:
            mm = ADULT_THORAX_MM / lungs["width_px"]
            scale_source = f"estimate: lung fields' outer width taken as an adult's {ADULT_THORAX_MM:.0f} mm"
        elif body["reaches_edge"]:
            mm = 430.0 / max(image.shape)  # the film is a 43 cm receptor: nothing better to go on
            scale_source = "assumed: the film spans a 43 cm detector (the body reaches its side: no width to measure)"
            info["warnings"].append("scale assumed, not measured: " + scale_source)
        else:
            mm = ADULT_BODY_MM[view] / body["width_px"]
            scale_source = f"estimate: body {'width' if view == 'pa' else 'depth'} taken as an adult's " \
                           f"{ADULT_BODY_MM[view]:.0f} mm"  # fmt: skip
    target = geometry.for_view(view).resized(size).isocenter_pixel_spacing
    target_mm = float(np.mean(target))
    scale = mm / target_mm  # output pixels per working pixel
    shape = (max(2, round(image.shape[0] * scale)), max(2, round(image.shape[1] * scale)))
    check_pixel_count(path, shape, what="the film rescaled to the training geometry")
    resampled = np.clip(_resize(image, shape), 0.0, 1.0)
    out = np.zeros((size, size), dtype=np.float32)  # air outside the film, as outside the body in a DRR
    centre_col, centre_row = body["centre"] * scale, shape[0] / 2
    top, left = int(round(centre_row - size / 2)), int(round(centre_col - size / 2))
    src_r0, src_c0 = max(0, top), max(0, left)
    src_r1, src_c1 = min(shape[0], top + size), min(shape[1], left + size)
    out[src_r0 - top : src_r1 - top, src_c0 - left : src_c1 - left] = resampled[src_r0:src_r1, src_c0:src_c1]
    info.update(
        scale_source=scale_source,
        input_mm_per_pixel=float(mm / work),
        training_mm_per_pixel=target_mm,
        scale=float(scale / work),
        body={**body, "width_mm": float(body["width_px"] * mm), "centre_col_out": float(centre_col - left)},
        lung_fields=None if lungs is None else {**lungs, "width_mm": float(lungs["width_px"] * mm)},
        film_coverage_mm=[float(image.shape[0] * mm), float(image.shape[1] * mm)],
    )
    return out, info


# ----------------------------------------------------------------------------------------------- intensity
QUANTILE_LEVELS = tuple(float(q) for q in np.linspace(0.0, 1.0, 101))  # every percentile, 0 and 100 included


def drr_quantiles(datalist_file: str | os.PathLike, split: str = "training", max_cases: int = 200) -> dict | None:
    """Per view, the intensity quantiles (:data:`QUANTILE_LEVELS`) of a datalist's DRRs, for a checkpoint record.

    ``{"pa": [101 values in [0, 1]], "lateral": [...], "levels": "0..1 by 0.01", "n_cases"}``: the pooled
    pixels of up to ``max_cases`` DRRs of ``split``; None when the datalist is absent or holds no DRR.
    """

    if not datalist_file or not os.path.isfile(datalist_file):
        return None
    items = load_split(datalist_file, split)[: int(max_cases)]
    out: dict = {}
    for view in ("pa", "lateral"):
        pixels = [load_xray(i[view])[0].ravel() for i in items if i.get(view)]
        if pixels:
            out[view] = [float(v) for v in np.quantile(np.concatenate(pixels), QUANTILE_LEVELS)]
    if not out:
        return None
    return {**out, "levels": "0 to 1 by 0.01", "n_cases": len(items)}


def match_quantiles(image: np.ndarray, quantiles) -> np.ndarray:
    """Map ``image`` monotonically so its intensity quantiles are the reference's (training DRRs').

    Each pixel's mid-rank empirical quantile is looked up in the reference quantile function (linear between
    the stored percentiles): ties stay tied, the order of pixels is kept (a monotone map, so measures invariant
    to monotone maps do not change).
    """
    reference = np.asarray(quantiles, dtype=np.float64)
    if reference.ndim != 1 or reference.size < 2 or not np.all(np.isfinite(reference)):
        raise InputError(None, "reference quantiles must be a finite 1D list")
    values, inverse, counts = np.unique(image.ravel(), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - 0.5 * counts) / image.size
    levels = np.linspace(0.0, 1.0, reference.size)
    mapped = np.interp(ranks, levels, np.sort(reference))
    return mapped[inverse].reshape(image.shape).astype(np.float32)


def intensity_summary(image: np.ndarray) -> dict:
    """5th, 50th, 95th percentiles and standard deviation: the contrast spread a report compares."""
    p5, p50, p95 = np.percentile(image, (5, 50, 95))
    return {"p5": float(p5), "p50": float(p50), "p95": float(p95), "std": float(np.std(image))}
