"""A realistic cohort from real chest CTs: N plausible patients per source CT, with aligned label maps.

Why: phantoms have no real anatomy (no vessels, textures, heart chambers), and one or two real CTs are too
few to train or to test on. Each generated patient is a real CT deformed by anatomically meaningful random
variation, so its lungs, heart, spine and ribs are real ones moved within the spread of adult chests.

How: every source CT (with a TotalSegmentator label map where one exists, else lungs/body/bone by HU) is
resampled once, with area averaging, to the target spacing (``data_prep.resample.prepare_ct``); its
in-plane signed distance to the skin is computed once (at half the in-plane resolution). Each patient is
then a backward coordinate map at the target grid (``size``^3, scipy ``map_coordinates``, linear for HU and
for each label's area fraction; :func:`labels_from_fractions`), composed of (forward order): subcutaneous
fat shell stretched or thinned along the skin normal -> lungs inflated / diaphragm lowered (craniocaudal
stretch below the lung apex, lung HU by mass conservation) -> heart scaled and moved by a local field that
is affine inside the heart and fades over one heart radius -> body habitus scaling (width, depth, height)
about the thorax centre -> rotation and shift on the table; then contrast (vessel and heart blood scaled
towards or away from unenhanced blood) and extra image noise. Outside-body objects (the CT table) are
removed first. Beyond the scanned length the edge slices are repeated.
PA and lateral DRRs come from :mod:`common.drr` through ``data_prep.layout.write_case``.

Spread (uniform draws; each target is the intersection of "source +- a plausible warp" and the published
adult range, so no case leaves the range, and no warp is larger than stated):

========================  ================================  ===========================================
quantity                  cohort                            reference
========================  ================================  ===========================================
body width (lateral)      278-354 mm, source +-10 %         as ``data_prep.phantom``: LIDC-IDRI-0001 297/
                                                            314/345 mm at 25/50/75 % lung height; inner
                                                            thoracic width on PA films, adult group means
                                                            25.1-29.6 cm (Obikili and Okoye, West Afr J
                                                            Med 2006): about +-8 %. A 320 mm field (64 x
                                                            5 mm) cuts the widest chests at its edges, as
                                                            the papers' 320 mm crops do
body depth (AP)           197-251 mm, source +-10 %         as ``data_prep.phantom`` (LIDC-IDRI-0001:
                                                            243/246/226 mm)
subcutaneous fat          7-21 mm, source +-8 mm            as ``data_prep.phantom``; fat measured as
                                                            -190..-30 HU (the usual CT fat window) in the
                                                            outer 30 mm of the body, per skin area
thorax height (z scale)   source +-5 %                      adult stature CV about 4 %; lung height
                                                            follows
diaphragm (inflation)     +-15 mm at the lung base          breath-hold depth varies by a fraction of the
                                                            4.7-7 cm deep-breathing excursion (Boussuges
                                                            et al., Chest 2009; quiet breathing 1.8 cm);
                                                            lung HU: (HU + 1000) scales by 1 / stretch
lung volume               2.9-4.8 L measured on 200 cases   follows from the above (LIDC-IDRI-0001:
                          of LIDC-IDRI-0001 (3.7 L); tests  3.7 L); adult CT inspiratory lung volumes
                          keep it in ``LUNG_VOLUME_L``      span about 2.5-7 L
heart size                +-8 % per axis                    cardiothoracic ratio 0.36-0.52 (mean 0.43);
                                                            as ``data_prep.phantom``
heart position            +-10 mm left-right and            about two thirds of the heart lies left of the
                          craniocaudal, +-5 mm AP; the      midline; ``data_prep.phantom``: centre 12-32
                          drawn shift keeps the centroid    mm left; LIDC-IDRI-0001: 27 mm (centroid of
                          10-40 mm left of the thoracic     its TotalSegmentator heart, midline halfway
                          midline (measured on 200 cases:   between the lungs' outer edges)
                          18-42 mm)
table position            yaw +-3 deg, roll +-2 deg,        positioning; off-centring of chest CT patients
                          shift +-10 mm per axis            is mostly within 2-3 cm (Toth et al., Med
                                                            Phys 2007)
contrast                  half the cases unenhanced         unenhanced blood 40 HU; enhanced: the source's
                          (blood pool -> 40 HU); the rest   own enhancement scaled (only with a label map
                          source enhancement x 0.8-1.2      naming heart and vessels; else as the source)
extra noise               0-10 HU white noise per voxel     thin-slice noise of 30-100 HU (standard to low
                                                            dose) averaged over the ~100 source voxels of
                                                            a 5 mm voxel is 3-10 HU
========================  ================================  ===========================================

Labels (``label.nii.gz``, uint8, same grid as ``ct.nii.gz``): :data:`LABEL_OUTSIDE` 0 outside the body,
:data:`LABEL_BODY` 1 other tissue, :data:`LABEL_LUNG` 2, :data:`LABEL_HEART` 3 (none without a label
map), :data:`LABEL_BONE` 4.

Datalist: the dataset layout of ``data_prep.build_pairs`` (``ct``, ``pa``, ``lateral``, ``spacing``) plus
``label`` (the label map), ``source`` (the source CT's id) and ``patient`` (the generated patient). With
several sources the splits group by ``source`` (no source in two splits); with one source they group by
generated patient and the datalist says ``"same_source": true``: its test cases share that patient's
vessels and textures, so a figure on them measures how well the X-rays steer the shape, not whether a
method generalises to other patients.

CLI::

    python -m data_prep.cohort <root> --n_cases 200 --size 64 --spacing 5 --drr_pixels 128 \\
        [--sources '[a.nii.gz,b.nii.gz]' --masks '[a_seg.nii.gz,""]' --structures structures.csv]

Without ``--sources`` the example CT (LIDC-IDRI-0001 with its TotalSegmentator labels) is fetched.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from common.anatomy import ANATOMY_LABELS
from common.atomic import atomic_write_text
from common.drr import detector_geometry
from common.errors import InputError, require_file
from common.io import load_volume, save_volume
from common.preview import save_montage_png
from common.volume import Volume
from data_prep.example_ct import fetch_example_ct
from data_prep.inputs import input_case_id
from data_prep.layout import assign_splits, case_entry, write_case, write_datalist
from data_prep.resample import load_ct, prepare_ct

# Label values: the one convention of common.anatomy (label maps travel with the CTs to the anatomy metrics).
LABEL_OUTSIDE, LABEL_BODY, LABEL_LUNG, LABEL_HEART, LABEL_BONE = (
    ANATOMY_LABELS[name] for name in ("outside", "body", "lung", "heart", "bone")
)
LABEL_NAMES = {value: name for name, value in ANATOMY_LABELS.items()}

# Spread (see the module docstring for the sources).
BODY_WIDTH_MM = (278.0, 354.0)
BODY_DEPTH_MM = (197.0, 251.0)
HABITUS_WARP = 0.10  # at most +-10 % scaling of the source's width / depth
FAT_MM, FAT_WARP_MM = (7.0, 21.0), 8.0
HEIGHT_WARP = 0.05
DIAPHRAGM_MM = 15.0
HEART_SCALE_WARP = 0.08
HEART_SHIFT_MM = (10.0, 5.0, 10.0)  # x, y, z
HEART_LEFT_MM = (10.0, 40.0)  # heart centroid left of the thoracic midline (measure_anatomy)
YAW_DEG, ROLL_DEG, TABLE_SHIFT_MM = 3.0, 2.0, 10.0
UNENHANCED_FRACTION, CONTRAST_SCALE = 0.5, (0.8, 1.2)
NOISE_HU = (0.0, 10.0)
LUNG_VOLUME_L = (2.5, 7.0)  # adult CT inspiratory lung volumes: the generated cases must stay inside

HU_AIR, HU_BLOOD = -1024.0, 40.0
HU_CLIP = (-1024.0, 3071.0)
FAT_HU = (-190.0, -30.0)
BODY_HU = -500.0  # body outline threshold (air / lung parenchyma below)
LUNG_HU = -400.0  # lungs by HU without labels
OPEN_MM = 4.5  # in-plane opening of the body mask (detaches the table)
OUTSIDE_MARGIN_MM = 3.0  # remove_outside keeps this much beyond the body outline (skin partial volume)
BONE_HU = 250.0  # bone by HU without labels
LUNG_SLICE_CM2 = 20.0  # a slice belongs to the lung height when it holds more lung than this

LABEL_FILE = "label.nii.gz"
CASE_FILE = "cohort_case.json"  # written last: a case is done when it exists with this run's settings
SETTINGS_FILE = "cohort_settings.json"
SOURCES_FILE = "cohort_sources.json"  # each source's measured anatomy
PREVIEW_FILE = "preview.png"
FORMAT_VERSION = 1

# TotalSegmentator names (structures.csv ``structure`` column) of each class.
_LUNG_NAMES = re.compile(r"^lung_")
_HEART_NAMES = re.compile(r"^(heart|atrial_appendage_left)$")
_BONE_NAMES = re.compile(
    r"^(vertebrae_|rib_|sternum|costal_cartilages|scapula_|clavicula_|humerus_|sacrum|hip_|"
    r"femur_|skull)"
)
_BLOOD_NAMES = re.compile(
    r"^(heart|aorta|pulmonary_vein|brachiocephalic_|subclavian_artery_|common_carotid_|"
    r"atrial_appendage_left|superior_vena_cava|inferior_vena_cava)"
)


@dataclasses.dataclass
class Source:
    """One source CT at the target spacing (canonical RAS) with its fields, in world mm.

    ``hu`` / ``label`` / ``fractions`` (5, X, Y, Z: area fraction of each label value) / ``blood`` (enhanced
    blood fraction 0..1) / ``sdf`` (in-plane signed distance to the skin, mm, > 0 outside) / ``normal``
    (2, X, Y, Z: in-plane outward normal) share ``affine``. ``centre`` is the thorax centre (body centroid at
    mid-lung, lung mid-height) that the generated grid is centred on; ``stats`` its measured anatomy.
    """

    id: str
    path: str
    hu: np.ndarray
    label: np.ndarray
    fractions: np.ndarray
    blood: np.ndarray | None
    sdf: np.ndarray
    normal: np.ndarray
    affine: np.ndarray
    centre: np.ndarray
    stats: dict


# ------------------------------------------------------------------------------------------------ source
def read_structures(path: str | os.PathLike) -> dict[int, str]:
    """label value -> structure name from a TotalSegmentator ``structures.csv`` (columns structure, id)."""
    path = require_file(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        names = {int(r["id"]): str(r["structure"]).strip() for r in rows}
    except (KeyError, ValueError, TypeError, csv.Error) as e:
        raise InputError(path, f"need columns 'structure' and 'id' (integers): {e}") from None
    if not names:
        raise InputError(path, "no structures listed")
    return names


def _ids(names: dict[int, str], pattern: re.Pattern) -> list[int]:
    return sorted(i for i, n in names.items() if pattern.search(n))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice along z (the lungs and airways are holes of the body outline)."""
    out = np.empty_like(mask)
    for k in range(mask.shape[2]):
        out[..., k] = ndimage.binary_fill_holes(mask[..., k])
    return out


def body_mask(hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Body outline (bool, same shape) of an RAS HU volume: largest component above -500 HU, filled per slice.

    An in-plane opening of about :data:`OPEN_MM` first detaches the table and blankets from the skin (none
    when the voxels are coarser than that: it would break a thin chest wall and leave the lungs unfilled)."""
    mask = hu > BODY_HU
    r = [int(OPEN_MM / (2 * float(s))) for s in spacing[:2]]
    if min(r) > 0:
        mask = ndimage.binary_opening(mask, structure=np.ones((2 * r[0] + 1, 2 * r[1] + 1, 1), bool))
    return _fill_slices(_largest_component(mask))


def _resample_mask(mask: np.ndarray, affine: np.ndarray, spacing, size) -> np.ndarray:
    """Area-averaged fraction (0..1) of a boolean mask on the target grid of :func:`_grid`."""
    frac = prepare_ct(Volume(mask.astype(np.float32), affine), spacing, size).array
    return np.clip(frac, 0.0, 1.0)


def _grid_size(vol: Volume, spacing: float) -> tuple[int, int, int]:
    """In-plane: the scan plus 4 voxels of air; along z: no more than the scan (edges are replicated)."""
    ext = np.asarray(vol.shape) * np.asarray(vol.spacing)
    return (
        int(math.ceil(ext[0] / spacing)) + 4,
        int(math.ceil(ext[1] / spacing)) + 4,
        max(2, int(math.floor(ext[2] / spacing))),
    )


def load_source(
    ct_path: str | os.PathLike,
    spacing: float,
    mask_path: str | os.PathLike | None = None,
    structures: dict[int, str] | None = None,
    source_id: str | None = None,
    remove_outside: bool = True,
) -> Source:
    """Read a chest CT (any :func:`common.io.load_volume` format) and prepare it at ``spacing`` mm.

    ``remove_outside``: voxels farther than :data:`OUTSIDE_MARGIN_MM` outside the body outline (the table,
    blankets, separate arms) become air: a radiograph taken standing shows no CT table, and the phantoms
    have none.

    With ``mask_path`` (a TotalSegmentator label map on the CT's grid) and ``structures`` (its names), the
    lungs, heart, bones and blood pool come from it; otherwise lungs (< -400 HU) and bone (> 250 HU) come from
    HU inside the body and there is no heart label. Errors name the offending file.
    """
    ct_path = os.fspath(require_file(ct_path))
    vol = load_ct(ct_path)
    if vol.array.ndim != 3 or min(vol.shape) < 8:
        raise InputError(ct_path, f"need a 3D CT of at least 8 voxels per axis, got shape {vol.shape}")
    vol = vol.to_canonical()
    lin = vol.affine[:3, :3]
    if np.abs(lin - np.diag(np.diag(lin))).max() > 1e-4 * np.abs(np.diag(lin)).max():
        raise InputError(ct_path, "oblique scan (rotated axes): resample it to axis-aligned first")
    hu = np.ascontiguousarray(vol.array, dtype=np.float32)
    # body outline and skin distance on a 2x in-plane subsampled grid (1.4 mm at 512^2: 4x faster)
    sub_affine = vol.affine.copy()
    sub_affine[:2, :2] *= 2.0
    sub_spacing = (2 * vol.spacing[0], 2 * vol.spacing[1], vol.spacing[2])
    hu_sub = hu[::2, ::2]
    body = body_mask(hu_sub, sub_spacing)
    if body.sum() * np.prod(sub_spacing) < 1e6:  # < 1 L
        raise InputError(ct_path, "no body found (less than 1 L above -500 HU): is this a CT in HU?")
    classes = None  # full-resolution class codes 0 none, 2 lung, 3 heart, 4 bone; 5 enhanced blood
    if mask_path is not None:
        mask_path = os.fspath(require_file(mask_path))
        if not structures:
            raise InputError(mask_path, "a label map needs its structure names (structures.csv)")
        mvol = load_volume(mask_path, dtype=None).to_canonical()
        if mvol.shape != vol.shape or not np.allclose(mvol.affine, vol.affine, atol=1e-3):
            raise InputError(
                mask_path,
                f"label map is not on the CT's voxel grid (shape {mvol.shape} vs "
                f"{vol.shape}, or the affines differ)",
            )
        seg = np.asarray(mvol.array)
        if not np.issubdtype(seg.dtype, np.integer) or seg.min() < 0 or seg.max() > 65535:
            raise InputError(mask_path, f"label map must hold integer labels 0..65535, got {seg.dtype}")
        lut = np.zeros(int(seg.max()) + 1, dtype=np.uint8)
        for code, pattern in (
            (LABEL_LUNG, _LUNG_NAMES),
            (5, _BLOOD_NAMES),
            (LABEL_HEART, _HEART_NAMES),
            (LABEL_BONE, _BONE_NAMES),
        ):
            lut[[i for i in _ids(structures, pattern) if i < len(lut)]] = code
        classes = lut[seg]
        if not (classes == LABEL_LUNG).any():
            raise InputError(mask_path, "the label map has no lung label (structure names starting 'lung_')")
        lung, heart, bone = classes == LABEL_LUNG, classes == LABEL_HEART, classes == LABEL_BONE
        blood = ((classes == 5) | heart) & (hu > 100.0)
    body_full = np.repeat(np.repeat(body, 2, axis=0), 2, axis=1)[: hu.shape[0], : hu.shape[1]]
    if classes is None:
        lung = body_full & (hu < LUNG_HU)
        lung &= ndimage.binary_opening(lung, structure=np.ones((3, 3, 1), bool))
        heart = np.zeros_like(lung)
        bone = body_full & (hu > BONE_HU)
        blood = None

    size = _grid_size(vol, spacing)
    sp = (float(spacing),) * 3
    if remove_outside:
        r = [max(1, int(round(OUTSIDE_MARGIN_MM / s))) for s in sub_spacing[:2]]
        near = ndimage.binary_dilation(body, structure=np.ones((2 * r[0] + 1, 2 * r[1] + 1, 1), bool))
        near = np.repeat(np.repeat(near, 2, axis=0), 2, axis=1)[: hu.shape[0], : hu.shape[1]]
        hu[~near] = HU_AIR
        del near
    grid = prepare_ct(Volume(hu, vol.affine), sp, size)
    f_lung, f_heart, f_bone = (_resample_mask(m, vol.affine, sp, size) for m in (lung, heart, bone))
    # every mask is resampled from the full-resolution grid: prepare_ct centres its grid on the scan it gets
    f_body = np.maximum(
        _resample_mask(body_full, vol.affine, sp, size), np.clip(f_lung + f_heart + f_bone, 0, 1)
    )
    del body_full
    other = np.clip(f_body - f_lung - f_heart - f_bone, 0.0, None)
    fractions = np.stack([1.0 - f_body, other, f_lung, f_heart, f_bone]).astype(np.float32)
    label = labels_from_fractions(fractions)
    f_blood = None if blood is None or not blood.any() else _resample_mask(blood, vol.affine, sp, size)

    # in-plane signed distance to the skin (mm, > 0 outside), per slice (z sampling huge)
    sampling = (sub_spacing[0], sub_spacing[1], 1e6)
    sdf_sub = ndimage.distance_transform_edt(~body, sampling=sampling) - ndimage.distance_transform_edt(
        body, sampling=sampling
    )
    sdf = _sample_at(np.clip(sdf_sub, -80, 80).astype(np.float32), sub_affine, grid.affine, grid.shape)
    gx, gy = np.gradient(sdf, spacing, axis=0), np.gradient(sdf, spacing, axis=1)
    norm = np.sqrt(gx**2 + gy**2) + 1e-6
    normal = np.stack([gx / norm, gy / norm]).astype(np.float32)

    stats = measure_anatomy(label, sp)
    if "lung_z_mm" not in stats:
        raise InputError(
            mask_path or ct_path, f"no slice with more than {LUNG_SLICE_CM2} cm^2 of lung: not a chest CT?"
        )
    stats["lung_z_mm"] = [grid.affine[2, 3] + z for z in stats["lung_z_mm"]]  # world mm
    stats["fat_mm"] = _fat_thickness(hu_sub, body, lung[::2, ::2], sdf_sub, stats, sub_affine)
    if f_blood is not None and (f_blood > 0.5).any():
        stats["blood_hu"] = float(grid.array[f_blood > 0.5].mean())  # the source's enhanced blood pool
    centre = _thorax_centre(label, grid.affine)
    sid = source_id or _source_id(ct_path)
    return Source(
        sid,
        ct_path,
        grid.array.astype(np.float32),
        label,
        fractions,
        f_blood,
        sdf,
        normal,
        grid.affine,
        centre,
        stats,
    )


def labels_from_fractions(fractions: np.ndarray) -> np.ndarray:
    """Label map (uint8) from area fractions (5, ...): outside where less than half the voxel is body (so an
    outside voxel holds at most half tissue), else the body class with the largest fraction."""
    inside = np.argmax(fractions[1:], axis=0).astype(np.uint8) + 1
    return np.where(fractions[0] > 0.5, np.uint8(LABEL_OUTSIDE), inside).astype(np.uint8)


def _source_id(path: str) -> str:
    name = input_case_id(path)
    return "example" if name == "cxr" else name


def _sample_at(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape) -> np.ndarray:
    """``array`` (voxel -> world ``affine``) sampled linearly at the voxel centres of another grid."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = target_affine[:3, :3] @ idx + target_affine[:3, 3:4]
    vox = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])
    return ndimage.map_coordinates(array, vox, order=1, mode="nearest").reshape(shape).astype(np.float32)


def _fat_thickness(hu, body, lung, sdf, stats, affine) -> float:
    """Mean subcutaneous fat thickness (mm) over the middle half of the lung height: volume of fat (-190..-30
    HU) in the outer 30 mm of the body per skin area; skin area = volume of the outer three voxel layers
    (depth <= 3 h, h the in-plane voxel size) / 3 h."""
    z_mm = affine[2, 3] + np.arange(hu.shape[2]) * affine[2, 2]
    lo, hi = stats["lung_z_mm"]
    q = (z_mm >= lo + 0.25 * (hi - lo)) & (z_mm <= hi - 0.25 * (hi - lo))
    if not q.any():
        return float("nan")
    h = float(np.sqrt(abs(affine[0, 0] * affine[1, 1])))
    depth = -sdf[..., q]
    b, lg, v = body[..., q], lung[..., q], hu[..., q]
    fat = b & ~lg & (depth > 0) & (depth <= max(30.0, 3 * h)) & (v >= FAT_HU[0]) & (v <= FAT_HU[1])
    skin = b & (depth > 0) & (depth <= 3.01 * h)
    return float(3 * h * fat.sum() / max(int(skin.sum()), 1))


def _world_axes(affine: np.ndarray, shape) -> list[np.ndarray]:
    return [affine[a, 3] + np.arange(shape[a]) * affine[a, a] for a in range(3)]


def _thorax_centre(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    x, y, z = _world_axes(affine, label.shape)
    lung_area = (label == LABEL_LUNG).sum(axis=(0, 1)) * abs(affine[0, 0] * affine[1, 1])
    ks = np.flatnonzero(lung_area > LUNG_SLICE_CM2 * 100.0)
    if len(ks) == 0:
        ks = np.arange(label.shape[2])
    kz = int(round((ks[0] + ks[-1]) / 2))
    body = label[..., kz] > 0
    i, j = np.nonzero(body)
    return np.array([x[i].mean(), y[j].mean(), z[kz]], dtype=np.float64)


def measure_anatomy(label: np.ndarray, spacing: Sequence[float]) -> dict:
    """Body width/depth (mm) at mid-lung height, lung volume (L), lung height (mm, slices with > 20 cm^2 of
    lung), heart centroid left of the thoracic midline (mm, > 0 = patient's left; midline halfway between the
    lungs' outer edges on the heart's centroid slice) and heart volume (mL), from an RAS label map."""
    sx, sy, sz = (float(s) for s in spacing)
    lung = label == LABEL_LUNG
    area = lung.sum(axis=(0, 1)) * sx * sy
    ks = np.flatnonzero(area > LUNG_SLICE_CM2 * 100.0)
    out: dict = {
        "lung_volume_l": float(lung.sum() * sx * sy * sz / 1e6),
        "lung_height_mm": float(len(ks) * sz),
    }
    if len(ks) == 0:
        return out
    kz = int(round((ks[0] + ks[-1]) / 2))
    out["lung_z_mm"] = [float(ks[0] * sz), float(ks[-1] * sz)]  # index mm; load_source shifts to world
    i, j = np.nonzero(label[..., kz] > 0)
    out["body_width_mm"] = float((i.max() - i.min() + 1) * sx)
    out["body_depth_mm"] = float((j.max() - j.min() + 1) * sy)
    heart = label == LABEL_HEART
    if heart.any():
        hi, _, hk = np.nonzero(heart)
        k = int(round(hk.mean()))
        # thoracic midline: halfway between the lungs' outer edges on the heart's slice (the body outline
        # may be cut by the field of view; the lungs are not)
        bi, _ = np.nonzero(label[..., k] == LABEL_LUNG)
        if len(bi) == 0:
            bi, _ = np.nonzero(label[..., k] > 0)
        midline = (bi.min() + bi.max()) / 2.0
        out["heart_left_mm"] = float((midline - hi.mean()) * sx)  # RAS: +x is the patient's right
        out["heart_volume_ml"] = float(heart.sum() * sx * sy * sz / 1e3)
    return out


# -------------------------------------------------------------------------------------------- one patient
def _within(rng: np.random.Generator, src: float, warp: float, bounds: tuple[float, float]) -> float:
    """Uniform in [src - warp, src + warp] intersected with ``bounds``; the reachable end nearest the bounds
    when the intersection is empty (a source outside the range moves towards it by at most ``warp``)."""
    lo, hi = max(src - warp, bounds[0]), min(src + warp, bounds[1])
    if lo > hi:
        return src + warp if src + warp < bounds[0] else src - warp
    return float(rng.uniform(lo, hi))


def draw_parameters(source_stats: dict, rng: np.random.Generator, has_blood: bool) -> dict:
    """One patient's variation (see the module docstring's table), as plain numbers (recorded per case)."""
    u = lambda a: float(rng.uniform(-a, a))  # noqa: E731
    fat_src = source_stats.get("fat_mm", float("nan"))
    fat_src = 10.0 if not math.isfinite(fat_src) else fat_src
    fat = _within(rng, fat_src, FAT_WARP_MM, FAT_MM)
    fat_delta = max(fat - fat_src, -0.7 * max(fat_src, 1.0))
    w_src, d_src = source_stats["body_width_mm"], source_stats["body_depth_mm"]
    width = _within(rng, w_src, HABITUS_WARP * w_src, BODY_WIDTH_MM)
    depth = _within(rng, d_src, HABITUS_WARP * d_src, BODY_DEPTH_MM)
    p = {
        "fat_mm": fat,
        "fat_delta_mm": fat_delta,
        "body_width_mm": width,
        "body_depth_mm": depth,
        "scale": [width / (w_src + 2 * fat_delta), depth / (d_src + 2 * fat_delta), 1.0 + u(HEIGHT_WARP)],
        "diaphragm_mm": u(DIAPHRAGM_MM),
        "heart_scale": [1.0 + u(HEART_SCALE_WARP) for _ in range(3)],
        "heart_shift_mm": [u(s) for s in HEART_SHIFT_MM],
        "yaw_deg": u(YAW_DEG),
        "roll_deg": u(ROLL_DEG),
        "table_shift_mm": [u(TABLE_SHIFT_MM) for _ in range(3)],
        "contrast": None,
        "noise_hu": float(rng.uniform(*NOISE_HU)),
    }
    if has_blood:
        p["contrast"] = 0.0 if rng.uniform() < UNENHANCED_FRACTION else float(rng.uniform(*CONTRAST_SCALE))
    left = source_stats.get("heart_left_mm")
    if left is not None:  # keep the heart centroid inside HEART_LEFT_MM after the shift and width scaling
        target = left - p["heart_shift_mm"][0]  # the shift is along +x, the patient's right
        target = float(np.clip(target * p["scale"][0], *HEART_LEFT_MM)) / p["scale"][0]
        p["heart_shift_mm"][0] = left - target
    return p


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def generate_case(
    source: Source, params: dict, size: Sequence[int], spacing: float, noise_seed: Sequence[int]
) -> tuple[Volume, Volume]:
    """One generated patient: (CT in HU, label map uint8), ``size`` voxels of ``spacing`` mm, centred at 0."""
    size = tuple(int(s) for s in size)
    st = source.stats
    axes = [(np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * spacing for n in size]
    p = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)  # output patient frame (mm)

    # inverse rigid: output = R @ y + shift
    yaw, roll = math.radians(params["yaw_deg"]), math.radians(params["roll_deg"])
    rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    ry = np.array([[math.cos(roll), 0, math.sin(roll)], [0, 1, 0], [-math.sin(roll), 0, math.cos(roll)]])
    rot = rz @ ry
    y = rot.T @ (p - np.asarray(params["table_shift_mm"])[:, None])
    # inverse habitus scaling about the thorax centre
    y /= np.asarray(params["scale"])[:, None]
    # inverse heart field (fixed point of x = y - u(x)), centre in the post-diaphragm frame
    z_top = st["apex_z"]
    h = st["lung_height_mm"]
    stretch = (h + params["diaphragm_mm"]) / h if h > 0 else 1.0
    if "heart_centre" in st:
        c = np.asarray(st["heart_centre"], dtype=np.float64).copy()
        c[2] = z_top - (z_top - c[2]) * stretch if c[2] < z_top else c[2]
        radius = st["heart_radius_mm"]
        scale = np.asarray(params["heart_scale"])[:, None]
        shift = np.asarray(params["heart_shift_mm"])[:, None]
        x = y.copy()
        for _ in range(4):
            d = x - c[:, None]
            w = 1.0 - _smoothstep((np.sqrt((d**2).sum(0)) - radius) / radius)
            x = y - w * ((scale - 1.0) * d + shift)
        y = x
    # inverse diaphragm stretch below the lung apex
    below = y[2] < z_top
    y[2, below] = z_top - (z_top - y[2, below]) / stretch
    # inverse fat shell: source depth [-F, 0] <- output [-F, delta] along the in-plane normal
    world = y + source.centre[:, None]
    vox = np.linalg.solve(source.affine[:3, :3], world - source.affine[:3, 3:4])
    f_src, delta = max(st["fat_mm"], 1.0), params["fat_delta_mm"]
    if abs(delta) > 1e-6:
        s = ndimage.map_coordinates(source.sdf, vox, order=1, mode="nearest")
        shell = -f_src + (s + f_src) * f_src / (f_src + delta)
        s_src = np.where(s > delta, s - delta, np.where(s > -f_src, shell, s))
        move = s - s_src
        for a in range(2):
            n = ndimage.map_coordinates(source.normal[a], vox, order=1, mode="nearest")
            vox[a] -= move * n / source.affine[a, a]

    hu = ndimage.map_coordinates(source.hu, vox, order=1, mode="nearest").reshape(size)
    # labels: the largest interpolated class fraction, so they share the HU's interpolation weights
    fractions = np.stack([ndimage.map_coordinates(f, vox, order=1, mode="nearest") for f in source.fractions])
    label = labels_from_fractions(fractions).reshape(size)
    # lung mass conserved: the lung part of each voxel has its density (HU + 1000) scaled by 1 / stretch
    f_lung = fractions[LABEL_LUNG].reshape(size)
    hu += f_lung * (np.maximum(hu, -1000.0) + 1000.0) * (1.0 / stretch - 1.0)
    if source.blood is not None and params.get("contrast") is not None:
        blood = ndimage.map_coordinates(source.blood, vox, order=1, mode="nearest").reshape(size)
        hu -= blood * (1.0 - params["contrast"]) * (hu - HU_BLOOD)
    if params["noise_hu"] > 0:
        hu += np.random.default_rng(list(noise_seed)).normal(0.0, params["noise_hu"], size).astype(np.float32)
    np.clip(hu, *HU_CLIP, out=hu)
    return Volume.from_spacing(hu.astype(np.float32), (spacing,) * 3), Volume.from_spacing(
        label, (spacing,) * 3
    )


def _source_geometry(source: Source) -> None:
    """Per-source numbers the deformation needs, in the patient frame (mm, relative to ``source.centre``)."""
    st = source.stats
    x, y, z = _world_axes(source.affine, source.label.shape)
    lung_area = (source.label == LABEL_LUNG).sum(axis=(0, 1)) * abs(source.affine[0, 0] * source.affine[1, 1])
    ks = np.flatnonzero(lung_area > LUNG_SLICE_CM2 * 100.0)
    st["apex_z"] = float(z[ks[-1]] - source.centre[2]) if len(ks) else float(z[-1] - source.centre[2])
    heart = source.label == LABEL_HEART
    if heart.any():
        i, j, k = np.nonzero(heart)
        st["heart_centre"] = [
            float(x[i].mean() - source.centre[0]),
            float(y[j].mean() - source.centre[1]),
            float(z[k].mean() - source.centre[2]),
        ]
        vol_mm3 = heart.sum() * float(np.prod(np.abs(np.diag(source.affine)[:3])))
        st["heart_radius_mm"] = float((3 * vol_mm3 / (4 * math.pi)) ** (1 / 3))


# ------------------------------------------------------------------------------------------------ dataset
def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.basename(path)}:{st.st_size}"


def make_cohort(
    root: str | os.PathLike,
    n_cases: int = 200,
    size: int = 64,
    spacing: float = 5.0,
    drr_pixels: int = 128,
    geometry: str = "x2ctgan",
    sources: Sequence[str] | str | None = None,
    masks: Sequence[str | None] | str | None = None,
    structures: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    previews: int = 4,
    cache_dir: str | None = None,
    remove_outside: bool = True,
) -> str:
    """Write ``n_cases`` generated patients in the dataset layout; returns ``dataset.json``'s path.

    Args:
        root: output folder (``<case>/ct.nii.gz``, ``pa.nii.gz``, ``lateral.nii.gz``, ``label.nii.gz``,
            ``cohort_case.json``; ``dataset.json``, ``cohort_settings.json``, ``preview.png``).
        n_cases: generated patients, spread round-robin over the sources.
        size, spacing: output grid, ``size``^3 voxels of ``spacing`` mm (64 at 5 mm: a 320 mm field).
        drr_pixels, geometry: detector size and DRR geometry preset (``common.drr``).
        sources: CT files (default: the example CT LIDC-IDRI-0001 with its TotalSegmentator labels).
        masks: one TotalSegmentator label map per source ("" or None: derive by HU); ``structures`` (its
            structures.csv) names the labels.
        seed: same seed and settings, same cohort.
        val_fraction, test_fraction: split fractions (groups: sources when several, else generated patients).
        previews: generated cases drawn in ``preview.png`` beside the source (0: none).
        remove_outside: the table and anything else outside the body become air (:func:`load_source`).

    Resumable: a case whose ``cohort_case.json`` carries this run's settings fingerprint is kept; a folder
    made with other settings is refused (delete it, or use another root).
    """
    root = Path(root)
    n_cases, size, spacing, drr_pixels = int(n_cases), int(size), float(spacing), int(drr_pixels)
    if n_cases < 1 or size < 8 or not (math.isfinite(spacing) and spacing > 0) or drr_pixels < 8:
        raise InputError(
            None,
            f"need n_cases >= 1, size >= 8, spacing > 0, drr_pixels >= 8; got "
            f"{n_cases}, {size}, {spacing}, {drr_pixels}",
        )
    camera = detector_geometry(geometry, drr_pixels)  # resolved once for every case and the datalist
    source_list, mask_list, names = _resolve_sources(sources, masks, structures, cache_dir)
    settings = {
        "format": FORMAT_VERSION,
        "n_sources": len(source_list),
        "size": size,
        "spacing": spacing,
        "drr_pixels": drr_pixels,
        "geometry": geometry,
        "seed": int(seed),
        "remove_outside": bool(remove_outside),
        "sources": [_file_digest(s) for s in source_list],
        "masks": [None if m is None else _file_digest(m) for m in mask_list],
    }
    fp = _fingerprint(settings)
    root.mkdir(parents=True, exist_ok=True)
    settings_path = root / SETTINGS_FILE
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        if old.get("fingerprint") != fp:
            raise InputError(
                settings_path,
                "this folder holds a cohort made with other settings "
                f"({old.get('settings')}); delete it or choose another root",
            )
    else:
        atomic_write_text(settings_path, json.dumps({"settings": settings, "fingerprint": fp}, indent=2))

    loaded: dict[int, Source] = {}

    def get_source(k: int) -> Source:
        if k not in loaded:
            src = load_source(
                source_list[k],
                spacing,
                mask_list[k],
                names if mask_list[k] else None,
                remove_outside=remove_outside,
            )
            _source_geometry(src)
            loaded[k] = src
        return loaded[k]

    source_ids = _unique_ids([_source_id(s) for s in source_list])
    entries, params_of = [], {}
    timings = {"generate": 0.0, "write": 0.0}
    for i in tqdm(range(n_cases), desc="cohort", unit="case"):
        k = i % len(source_list)
        case = f"{source_ids[k]}_{i:04d}"
        folder = root / case
        meta_path = folder / CASE_FILE
        meta = _read_meta(meta_path)
        done = (
            meta is not None
            and meta.get("fingerprint") == fp
            and all((folder / f).is_file() for f in ("ct.nii.gz", "pa.nii.gz", "lateral.nii.gz", LABEL_FILE))
        )
        if not done:
            src = get_source(k)
            rng = np.random.default_rng([int(seed), k, i])
            params = draw_parameters(src.stats, rng, src.blood is not None)
            t0 = time.perf_counter()
            ct, label = generate_case(src, params, (size,) * 3, spacing, noise_seed=(int(seed), k, i, 1))
            t1 = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            save_volume(label, folder / LABEL_FILE)
            write_case(root, case, ct, camera)
            measured = measure_anatomy(label.array, label.spacing)
            meta = {
                "fingerprint": fp,
                "source": source_ids[k],
                "source_path": source_list[k],
                "patient": case,
                "parameters": params,
                "measured": measured,
            }
            atomic_write_text(meta_path, json.dumps(meta, indent=2))
            timings["generate"] += t1 - t0
            timings["write"] += time.perf_counter() - t1
        entry = case_entry(root, case, (spacing,) * 3, extra={"label": LABEL_FILE})
        entry.update(source=meta["source"], patient=case)
        entries.append(entry)
        params_of[case] = meta

    several = len(source_list) > 1
    groups = {e["id"]: (e["source"] if several else e["patient"]) for e in entries}
    splits = assign_splits([e["id"] for e in entries], val_fraction, test_fraction, seed, groups=groups)
    stats_path = root / SOURCES_FILE  # kept across resumed runs, which may load no source
    stats = (_read_meta(stats_path) or {}) if stats_path.is_file() else {}
    if loaded:
        stats.update({source_ids[k]: _jsonable(src.stats) for k, src in loaded.items()})
        atomic_write_text(stats_path, json.dumps(stats, indent=2))
    extra = {
        "same_source": not several,
        "sources": source_ids,
        "split_by": "source" if several else "patient (generated): every case shares one source",
        "labels": {str(v): n for v, n in LABEL_NAMES.items()},
        "source_stats": {k: stats[k] for k in source_ids if k in stats},
    }
    path = write_datalist(
        root,
        entries,
        (spacing,) * 3,
        (size,) * 3,
        camera,
        val_fraction,
        test_fraction,
        seed,
        splits=splits,
        extra=extra,
        description=f"xray2ct cohort from real CTs (data_prep.cohort, seed {seed})",
    )
    if previews > 0 and (loaded or not (root / PREVIEW_FILE).is_file()):
        _write_preview(root, entries[: int(previews)], loaded.get(0), spacing, size)
    if timings["generate"]:
        print(f"cohort: generate {timings['generate']:.1f} s, DRR + write {timings['write']:.1f} s")
    return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def _read_meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: rebuild the case


def _unique_ids(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in ids:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out


def _resolve_sources(sources, masks, structures, cache_dir):
    """(CT paths, mask paths or None, structure names) from the arguments (default: the example CT)."""
    if sources is None or sources == "example":
        ex = fetch_example_ct(cache_dir)
        return [ex["ct"]], [ex["mask"]], read_structures(ex["structures"])
    source_list = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not source_list:
        raise InputError(None, "no source CT given")
    source_list = [os.fspath(require_file(s)) for s in source_list]
    if masks is None:
        mask_list = [None] * len(source_list)
    else:
        mask_list = [masks] if isinstance(masks, (str, os.PathLike)) else list(masks)
        if len(mask_list) != len(source_list):
            raise InputError(
                None,
                f"{len(mask_list)} masks for {len(source_list)} sources: give one per source ('' for none)",
            )
        mask_list = [os.fspath(require_file(m)) if m else None for m in mask_list]
    names = None
    if any(mask_list):
        if structures is None:
            raise InputError(next(m for m in mask_list if m), "label maps need --structures (structures.csv)")
        names = read_structures(structures)
    return source_list, mask_list, names


IDENTITY = {
    "fat_delta_mm": 0.0,
    "scale": [1.0, 1.0, 1.0],
    "diaphragm_mm": 0.0,
    "heart_scale": [1.0, 1.0, 1.0],
    "heart_shift_mm": [0.0, 0.0, 0.0],
    "yaw_deg": 0.0,
    "roll_deg": 0.0,
    "table_shift_mm": [0.0, 0.0, 0.0],
    "contrast": None,
    "noise_hu": 0.0,
}


def _write_preview(root: Path, entries, source: Source | None, spacing: float, size: int) -> str:
    """``preview.png``: the source on the output grid (no variation) above a few generated cases, with the
    first case's PA and lateral DRRs as the last row."""
    volumes = {}
    if source is not None:
        volumes[f"source {source.id} (no variation)"] = generate_case(
            source, IDENTITY, (size,) * 3, spacing, (0,)
        )[0]
    for e in entries:
        volumes[e["id"]] = load_volume(root / e["ct"])
    first = entries[0]
    xrays = {f"{first['id']} {v}": _load_2d(root / first[v]) for v in ("pa", "lateral")}
    return save_montage_png(root / PREVIEW_FILE, volumes, xrays=xrays, window="lung", panel_size=192)


def _load_2d(path) -> np.ndarray:
    return np.asarray(nib.load(os.fspath(path)).dataobj, dtype=np.float32)


def _path_list(value):
    """A list of paths from the API or the command line (``a,b`` or ``[a,b]``; fire passes unquoted paths
    as one string); "" stays as the no-label-map marker."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    text = os.fspath(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return (
        [p.strip().strip("'\"") for p in text.split(",")] if "," in text or text != os.fspath(value) else text
    )


@functools.wraps(make_cohort)  # fire reads make_cohort's signature, so --help works
def main(*args, **kwargs) -> str:
    """CLI: :func:`make_cohort` (fire prints the datalist path it returns); bad input ends with one line."""
    bound = inspect.signature(make_cohort).bind(*args, **kwargs)  # fire passes every flag positionally
    for key in ("sources", "masks"):
        if key in bound.arguments:
            bound.arguments[key] = _path_list(bound.arguments[key])
    try:
        return make_cohort(*bound.args, **bound.kwargs)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    import fire

    fire.Fire(main)
