"""Deterministic synthetic thorax CT phantoms with known anatomy, for the tests of every bundle.

Why: real CTs are large and unlabelled for our tasks; a phantom gives in seconds a chest-like HU volume
whose structures (lungs, heart, contrast-filled pulmonary arteries, spine, ribs), emboli and breathing
motion are known exactly, so tests can check real numbers. MONAI has no anatomical phantom generator
(its ``create_test_image_3d`` draws random spheres), hence this module.

Geometry: the anatomy is defined in world millimetres (RAS+, origin at the volume centre) and sampled
at voxel centres, so the same seed gives the same patient at any shape or spacing. The heart sits to
the patient's left (-x) and anterior (+y) and the spine posterior (-y), so orientation errors show.

Anatomical spread (one patient per seed; uniform draws, independent unless stated). The ranges follow
adult chests, no wider, so that the mean-phantom baseline of the learning benchmark is as strong (or as
weak) as the mean of real chests would be:

========================  ==========================  =================================================
quantity                  phantoms                    reference
========================  ==========================  =================================================
body width (lateral)      278-354 mm (mean 316)       LIDC-IDRI-0001 (the example CT, measured here at
                                                      25/50/75 % of the lung height): 297/314/345 mm;
                                                      inner thoracic width on PA films, adult group
                                                      means 25.1-29.6 cm by sex and age (Obikili and
                                                      Okoye, West Afr J Med 2006): about +-8 %
body depth (AP)           197-251 mm (mean 224)       LIDC-IDRI-0001: 243/246/226 mm
subcutaneous fat          7-21 mm                     varies with habitus; a visible band in every case
lung height (label)       about 196-240 mm            LIDC-IDRI-0001: 235 mm (slices with > 20 cm^2 of
                                                      lung); half-height jitter +-10 %: breath-hold
                                                      depth varies by a fraction of the 4.7-7 cm deep-
                                                      breathing diaphragm excursion (Boussuges et al.,
                                                      Chest 2009; quiet breathing 1.8 +- 0.3 cm)
lung volume               about 3.2-5.1 L             LIDC-IDRI-0001: 3.7 L (HU < -400 inside the body)
heart size                +-8 % per semi-axis         cardiothoracic ratio (heart / lung width) 0.36-0.52,
                                                      mean 0.43; normal adults < 0.5 (Danzer's limit),
                                                      patients' chests sometimes above
heart centre              12-32 mm left of midline    about two thirds of the heart lies left of the
                                                      midline; its lateral position varies with habitus
========================  ==========================  =================================================

Within a 4D CT the breathing cycle (below) adds ``breathing_mm`` (default 15 mm, a quiet breath) on top.

Breathing: ``phase`` in ``[0, n_phases)`` follows ``a = (1 - cos(2 pi phase / n_phases)) / 2``; phase 0
is end-inhale (a = 0), ``n_phases / 2`` end-exhale (a = 1). With ``a`` the diaphragm and lung bases rise
by ``a * breathing_mm`` and the chest wall contracts by ``0.3 * a * breathing_mm`` at the sides; the
spine does not move.

CLI::

    python -m data_prep.phantom <root> --n_cases 8 --size 64 --spacing 6 --drr_pixels 64 [--n_phases 4]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_write_text
from common.drr import detector_geometry
from common.errors import InputError
from common.volume import Volume
from data_prep.layout import case_entry, case_is_done, write_case, write_datalist

# Hounsfield units of the phantom's materials.
HU_AIR = -1000.0
HU_LUNG = -850.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BLOOD = 40.0
HU_CONTRAST = 350.0  # CTPA: iodinated contrast in the pulmonary arteries
HU_EMBOLUS = 40.0  # a clot is a filling defect: blood density inside an enhanced artery
HU_CANCELLOUS = 250.0
HU_CORTICAL = 900.0
HU_RIB = 800.0
NOISE_HU = 10.0
HU_CLIP = (-1024.0, 3071.0)

# Spread of the patients (see the module docstring for the sources); ``j(s)`` draws uniformly in [1 - s, 1 + s].
BODY_SEMI_AXES_MM = (158.0, 112.0)  # mean body width 316 mm, depth 224 mm
BODY_JITTER = 0.12  # width 278-354 mm, depth 197-251 mm, drawn independently (depth/width 0.56-0.90)
FAT_MM, FAT_JITTER = 14.0, 0.5  # subcutaneous fat 7-21 mm
LUNG_HALF_HEIGHT_MM, LUNG_HEIGHT_JITTER = 118.0, 0.10  # lung ellipsoid half-height 106-130 mm
HEART_CENTRE_X_MM, HEART_SHIFT_MM = -22.0, 10.0  # heart centre 12-32 mm left of the midline

DEFAULT_FOV_MM = 384.0  # field of view when no spacing is given (6 mm voxels at 64^3)
STRUCTURES = ("body", "lungs", "heart", "pulmonary_arteries", "spine", "ribs", "emboli")


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    """Per-seed patient: sizes and positions in mm (inhale reference frame)."""

    body_axes: tuple[float, float]  # semi-axes (x, y) of the elliptic body cylinder
    fat_mm: float
    lung_axes: tuple[float, float, float]
    lung_centre: tuple[float, float, float]  # right lung; the left one mirrors x
    heart_axes: tuple[float, float, float]
    heart_centre: tuple[float, float, float]
    spine_centre_y: float
    rib_z: tuple[float, ...]
    artery_scale: float


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    """One patient, drawn within the spread of adult chests (see the module docstring's table)."""
    j = lambda scale: 1.0 + scale * rng.uniform(-1.0, 1.0)  # noqa: E731 - relative jitter
    bx, by = BODY_SEMI_AXES_MM[0] * j(BODY_JITTER), BODY_SEMI_AXES_MM[1] * j(BODY_JITTER)
    lung_top = 110.0 * j(0.08)
    lung_half_height = LUNG_HALF_HEIGHT_MM * j(LUNG_HEIGHT_JITTER)
    rib_top, n_ribs = lung_top - 5.0, 10
    return _Anatomy(
        body_axes=(bx, by),
        fat_mm=FAT_MM * j(FAT_JITTER),
        lung_axes=(0.38 * bx, 0.72 * by, lung_half_height),
        lung_centre=(0.47 * bx, -0.05 * by, lung_top - lung_half_height),
        heart_axes=(58.0 * j(0.08), 48.0 * j(0.08), 55.0 * j(0.08)),
        heart_centre=(HEART_CENTRE_X_MM + HEART_SHIFT_MM * rng.uniform(-1.0, 1.0), 0.3 * by, -45.0 * j(0.15)),
        spine_centre_y=-0.62 * by,
        rib_z=tuple(rib_top - k * 24.0 * j(0.03) for k in range(n_ribs)),
        artery_scale=j(0.1),
    )


def breathing_amplitude(phase: int, n_phases: int) -> float:
    """0 at end-inhale (phase 0), 1 at end-exhale (phase n_phases / 2), smooth in between."""
    if n_phases <= 1:
        return 0.0
    return 0.5 * (1.0 - math.cos(2.0 * math.pi * (phase % n_phases) / n_phases))


def _default_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    return tuple(DEFAULT_FOV_MM / n for n in shape)  # type: ignore[return-value]


def _world_grid(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _ellipsoid(x, y, z, centre, axes) -> np.ndarray:
    return ((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + (
        (z - centre[2]) / axes[2]
    ) ** 2 <= 1.0


def _segment_distance(x, y, z, p0, p1) -> np.ndarray:
    """Distance (mm) of every voxel centre from the segment p0-p1."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    d = p1 - p0
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)


def _arteries(x, y, z, an: _Anatomy, min_radius: float) -> np.ndarray:
    """Main pulmonary trunk from the heart, left/right pulmonary arteries and lobar branches (capsules)."""
    s = an.artery_scale
    hx, hy, hz = an.heart_centre
    lx, ly, lz = an.lung_centre
    top = hz + 0.8 * an.heart_axes[2]
    bif = (hx * 0.3, hy * 0.2, top + 25.0)
    segments = [((hx * 0.7, hy * 0.8, hz + 0.3 * an.heart_axes[2]), bif, 14.0 * s)]  # trunk
    for side in (1.0, -1.0):  # +x patient right, -x left
        hilum = (side * 0.85 * lx, ly + 5.0, bif[2] - 5.0)
        segments += [
            (bif, hilum, 10.0 * s),
            (hilum, (side * lx, ly - 15.0, lz - 0.35 * an.lung_axes[2]), 7.0 * s),  # lower lobe
            (hilum, (side * 1.05 * lx, ly - 10.0, lz + 0.55 * an.lung_axes[2]), 6.0 * s),  # upper lobe
            (hilum, (side * 1.1 * lx, ly + 25.0, hilum[2] - 10.0), 6.0 * s),  # middle / lingula
        ]
    mask = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    for p0, p1, r in segments:
        mask |= _segment_distance(x, y, z, p0, p1) <= max(r, min_radius)
    return mask


def _ribs(x, y, z, an: _Anatomy, radius: float) -> np.ndarray:
    """Rib arcs on an ellipse inside the body wall, sloping down anteriorly, open at the sternum."""
    bx, by = an.body_axes
    rx, ry = bx - an.fat_mm - 12.0, by - an.fat_mm - 12.0
    theta = np.arctan2(y / ry, x / rx)
    rho = np.sqrt((x / rx) ** 2 + (y / ry) ** 2)
    radial_mm = (rho - 1.0) * np.sqrt(rx * ry)
    slope = 30.0 * (1.0 + np.sin(theta)) / 2.0  # anterior ends lie lower than posterior heads
    open_front = np.abs(theta - np.pi / 2) < 0.45
    mask = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    for z0 in an.rib_z:
        mask |= radial_mm**2 + (z - (z0 - slope)) ** 2 <= radius**2
    return mask & ~open_front


def make_phantom(
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] | float | None = None,
    seed: int = 0,
    emboli: int = 0,
    phase: int = 0,
    n_phases: int = 1,
    breathing_mm: float = 15.0,
    noise_hu: float = NOISE_HU,
) -> tuple[Volume, dict]:
    """A chest CT phantom in HU (canonical RAS, centred at the origin) and its label masks.

    Args:
        shape: (X, Y, Z) voxels.
        spacing: mm per voxel (a number or three); default fits a 384 mm field of view.
        seed: the patient (body size, organ positions) and the image noise; same seed, same volume.
        emboli: number of pulmonary emboli (filling defects of ~+40 HU inside the contrast-filled arteries).
        phase, n_phases, breathing_mm: breathing state (see module docstring); phase 0 is end-inhale.
        noise_hu: standard deviation of the Gaussian image noise.

    Returns:
        (volume, labels): labels holds boolean masks ``body, lungs, heart, pulmonary_arteries, spine, ribs,
        emboli`` (each the voxels showing that structure; emboli lie inside ``pulmonary_arteries``), ``pe``
        (1 when any embolus is present) and ``n_emboli``.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise InputError(None, f"phantom shape must be three sizes >= 2, got {shape}")
    if spacing is None:
        spacing = _default_spacing(shape)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(None, f"phantom spacing must be positive, got {spacing}")
    if emboli < 0 or n_phases < 1:
        raise InputError(None, f"need emboli >= 0 and n_phases >= 1, got {emboli}, {n_phases}")

    rng = np.random.default_rng(seed)
    an = _anatomy(rng)
    x0, y0, z0 = _world_grid(shape, spacing)
    min_radius = 0.55 * max(spacing)  # thin structures keep at least one voxel at coarse spacing

    # Breathing: soft tissue is sampled at deformed (inhale-frame) coordinates; the spine is not.
    a = breathing_amplitude(phase, n_phases)
    lung_top = an.lung_centre[2] + an.lung_axes[2]
    lung_base = an.lung_centre[2] - an.lung_axes[2]
    rise = a * breathing_mm
    z = lung_top - (lung_top - z0) * (lung_top - lung_base) / (lung_top - lung_base - rise)
    expand = 1.0 + 0.3 * rise / an.body_axes[0]
    x, y = x0 * expand, y0 * expand

    body = np.broadcast_to((x / an.body_axes[0]) ** 2 + (y / an.body_axes[1]) ** 2 <= 1.0, shape)
    inner_axes = (an.body_axes[0] - an.fat_mm, an.body_axes[1] - an.fat_mm)
    inner = np.broadcast_to((x / inner_axes[0]) ** 2 + (y / inner_axes[1]) ** 2 <= 1.0, shape)
    lx, ly, lz = an.lung_centre
    dome = (lx, ly, lung_base - 0.35 * an.lung_axes[2])  # the diaphragm dome pushes up into each base
    dome_axes = (0.9 * an.lung_axes[0], 0.8 * an.lung_axes[1], 0.6 * an.lung_axes[2])
    lungs = np.zeros(shape, dtype=bool)
    for side in (1.0, -1.0):
        lungs |= _ellipsoid(x, y, z, (side * lx, ly, lz), an.lung_axes) & ~_ellipsoid(
            x, y, z, (side * dome[0], dome[1], dome[2]), dome_axes
        )
    heart = _ellipsoid(x, y, z, an.heart_centre, an.heart_axes)
    arteries = _arteries(x, y, z, an, min_radius) & inner
    ribs = _ribs(x, y, z, an, max(6.0, min_radius)) & body
    vb_centre = (0.0, an.spine_centre_y)
    vb_r = 20.0
    vb_dist = np.sqrt((x0 - vb_centre[0]) ** 2 + (y0 - vb_centre[1]) ** 2)
    spine_body = np.broadcast_to(vb_dist <= vb_r, shape)
    process = np.broadcast_to(
        (np.abs(x0) <= max(6.0, min_radius))
        & (y0 < vb_centre[1] - vb_r + 2)
        & (y0 > vb_centre[1] - vb_r - 35)
        & (y0 > -(an.body_axes[1] - an.fat_mm)),  # the spinous process stays under the back muscles
        shape,
    )
    spine = spine_body | process
    cortical = np.broadcast_to(vb_dist >= vb_r - max(4.0, min_radius), shape) | process

    emb = np.zeros(shape, dtype=bool)
    if emboli:
        emb = _place_emboli(an, emboli, rng, spacing, min_radius, (x0, y0, z0), (x, y, z), arteries)

    hu = np.full(shape, HU_AIR, dtype=np.float32)
    hu[body] = HU_FAT
    hu[body & inner] = HU_SOFT
    hu[lungs] = HU_LUNG
    hu[heart] = HU_BLOOD
    hu[arteries] = HU_CONTRAST
    hu[emb] = HU_EMBOLUS
    hu[ribs] = HU_RIB
    hu[spine] = HU_CANCELLOUS
    hu[spine & cortical] = HU_CORTICAL
    if noise_hu > 0:
        hu += np.random.default_rng([seed, phase, 7]).normal(0.0, noise_hu, shape).astype(np.float32)
    np.clip(hu, *HU_CLIP, out=hu)

    # Each mask holds the voxels that show the structure after painting (later paint wins).
    bone = ribs | spine
    labels = {
        "body": body | spine,
        "lungs": lungs & ~heart & ~arteries & ~bone,
        "heart": heart & ~arteries & ~bone,
        "pulmonary_arteries": arteries & ~bone,
        "spine": spine,
        "ribs": ribs & ~spine,
        "emboli": emb & ~bone,
    }
    labels["pe"] = int(labels["emboli"].any())
    labels["n_emboli"] = int(emboli) if labels["pe"] else 0
    return Volume.from_spacing(hu, spacing), labels


def _place_emboli(
    an: _Anatomy, n: int, rng: np.random.Generator, spacing, min_radius, ref, deformed, arteries
):
    """Spheres centred on random artery voxels (not in the heart or a rib) of the end-inhale phantom.

    Centres are chosen in the inhale frame (``ref`` grid) and drawn at the deformed coordinates, so a clot
    moves with its artery through the breathing cycle. Each keeps at least its nearest voxel.
    """
    x0, y0, z0 = ref
    inner_axes = (an.body_axes[0] - an.fat_mm, an.body_axes[1] - an.fat_mm)
    inner = (x0 / inner_axes[0]) ** 2 + (y0 / inner_axes[1]) ** 2 <= 1.0
    candidates = (
        _arteries(x0, y0, z0, an, min_radius)
        & inner
        & ~_ellipsoid(x0, y0, z0, an.heart_centre, an.heart_axes)
        & ~_ribs(x0, y0, z0, an, max(6.0, min_radius))
    )
    idx = np.argwhere(candidates)
    if len(idx) == 0:
        raise InputError(None, "phantom too coarse: no pulmonary artery voxel to hold an embolus")
    centres = idx[rng.choice(len(idx), size=n, replace=len(idx) < n)]
    radius = max(7.0, 0.6 * max(spacing))
    x, y, z = deformed
    mask = np.zeros(arteries.shape, dtype=bool)
    for i, j, k in centres:
        c = (x0[i, 0, 0], y0[0, j, 0], z0[0, 0, k])
        d2 = np.broadcast_to((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2, arteries.shape)
        sphere = (d2 <= radius**2) & arteries
        if not sphere.any():  # coarse grid, moved by breathing: keep the artery voxel nearest the centre
            sphere = d2 == np.where(arteries, d2, np.inf).min()
        mask |= sphere & arteries
    return mask


def make_4dct(
    shape: Sequence[int] = (64, 64, 64),
    n_phases: int = 10,
    seed: int = 0,
    spacing: Sequence[float] | float | None = None,
    breathing_mm: float = 15.0,
    emboli: int = 0,
) -> tuple[list[Volume], Volume]:
    """One patient's breathing cycle: ``n_phases`` phase volumes (phase 0 end-inhale) and their average."""
    if n_phases < 1:
        raise InputError(None, f"n_phases must be >= 1, got {n_phases}")
    phases = [
        make_phantom(
            shape, spacing, seed, emboli=emboli, phase=p, n_phases=n_phases, breathing_mm=breathing_mm
        )[0]
        for p in range(n_phases)
    ]
    average = np.mean([v.array for v in phases], axis=0).astype(np.float32)
    return phases, phases[0].with_array(average)


def make_phantom_dataset(
    root: str | os.PathLike,
    n_cases: int = 8,
    size: int | Sequence[int] = 64,
    spacing: float | Sequence[float] | None = None,
    geometry: str = "x2ctgan",
    drr_pixels: int = 64,
    emboli_fraction: float = 0.5,
    n_phases: int = 0,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_fraction: float = 0.25,
    breathing_mm: float = 15.0,
) -> str:
    """Write ``n_cases`` phantoms in the dataset layout of docs/ARCHITECTURE.md; returns dataset.json's path.

    Per case ``<root>/phantom_NNN/``: ``ct.nii.gz`` (HU), ``pa.nii.gz``, ``lateral.nii.gz`` (DRRs of ct),
    ``label.json`` (``{"pe", "n_emboli", "seed"}``). Exactly ``round(n_cases * emboli_fraction)`` cases
    have emboli (1-3 each). The split is stratified by ``pe`` and seeded by the case-id hash. Resumable:
    a case whose files all exist is kept as is (delete the root to rebuild with other settings).

    With ``n_phases > 0`` each case is a 4D CT: ``ct.nii.gz`` and ``phase0.nii.gz`` hold phase 0
    (end-inhale; the DRRs are rendered from it), ``avg.nii.gz`` the average of all phases. Datalist keys
    added: ``"avg"``, ``"phase0"`` (paths), ``"phase": 0`` and ``"n_phases"``.
    """
    shape = (int(size),) * 3 if np.ndim(size) == 0 else tuple(int(s) for s in size)
    camera = detector_geometry(geometry, int(drr_pixels))  # resolved once for every case and the datalist
    if spacing is None:
        spacing = _default_spacing(shape)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
    rng = np.random.default_rng(seed)
    n_pe = int(math.floor(n_cases * emboli_fraction + 0.5))
    has_pe = np.zeros(n_cases, dtype=bool)
    has_pe[rng.permutation(n_cases)[:n_pe]] = True
    n_emboli = rng.integers(1, 4, size=n_cases) * has_pe

    entries, labels = [], {}
    for i in tqdm(range(n_cases), desc="phantoms", unit="case", disable=n_cases < 4):
        case = f"phantom_{i:03d}"
        case_seed = seed * 100_003 + i
        extra = {"avg": "avg.nii.gz", "phase0": "phase0.nii.gz"} if n_phases > 0 else {}
        if not case_is_done(root, case, extra_files=list(extra.values()) + ["label.json"]):
            if n_phases > 0:
                phases, average = make_4dct(
                    shape, n_phases, case_seed, spacing, breathing_mm, int(n_emboli[i])
                )
                ct, volumes = phases[0], {"avg": average, "phase0": phases[0]}
            else:
                ct, _ = make_phantom(shape, spacing, case_seed, emboli=int(n_emboli[i]))
                volumes = {}
            label = {"pe": int(n_emboli[i] > 0), "n_emboli": int(n_emboli[i]), "seed": case_seed}
            write_case(root, case, ct, camera, label=label, extra_volumes=volumes)
        entry = case_entry(root, case, spacing, label=int(n_emboli[i] > 0), extra=extra)
        # each phantom is an independent draw of the generator, no patient shared: its own source, so reports
        # say "cross-source" (common.handlers.same_source) where the cohort of one real CT says "same-source"
        entry["source"] = case
        if n_phases > 0:
            entry.update(phase=0, n_phases=int(n_phases))
        entries.append(entry)
        labels[case] = int(n_emboli[i] > 0)
    return write_datalist(
        root,
        entries,
        spacing=spacing,
        size=shape,
        geometry=camera,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        strata=labels,
        description=f"xray2ct synthetic thorax phantoms (data_prep.phantom, seed {seed})",
        extra={"contrast_phase": "ctpa"},  # the arteries hold contrast (HU_CONTRAST)
    )


if __name__ == "__main__":
    import fire

    fire.Fire(make_phantom_dataset)


def make_pe_dataset(
    root: str | os.PathLike,
    n_patients: Sequence[int] = (24, 8, 16),
    size: int = 32,
    spacing: float = 4.0,
    emboli: int = 3,
    geometry: str = "x2ctgan",
    drr_pixels: int = 32,
    seed: int = 300,
) -> str:
    """A pulmonary-embolism dataset: CTPA crops around the central pulmonary arteries; returns dataset.json's path.

    Each patient (a phantom seed) appears twice, without and with ``emboli`` clots (7 mm spheres of +40 HU in
    350 HU arteries), so the two cases differ only by the emboli and a classifier must find them rather than
    memorise anatomy. ``size``^3 voxels at ``spacing`` mm (32 at 4 mm: a 128 mm field of view at the origin,
    where the trunk and hila lie); at whole-chest 12 mm spacing an embolus is one voxel and not learnable by a
    CPU-size network. ``n_patients`` = training, validation, test patients: the splits are per patient.
    PA/lateral DRRs of the crop are written too (an X-ray-only classifier sees no clot: its baseline role).
    Resumable like :func:`make_phantom_dataset`.
    """
    root = os.fspath(root)
    shape = (int(size),) * 3
    camera = detector_geometry(geometry, int(drr_pixels))  # resolved once for every case and the datalist
    splits: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    patient = int(seed)
    for split, n in zip(splits, n_patients):
        for _ in range(int(n)):
            for pe in (0, 1):
                case = f"patient{patient:04d}_pe{pe}"
                if not case_is_done(root, case, extra_files=["label.json"]):
                    ct, labels = make_phantom(shape, float(spacing), seed=patient, emboli=emboli * pe)
                    label = {"pe": int(labels["pe"]), "n_emboli": int(labels["n_emboli"]), "seed": patient}
                    write_case(root, case, ct, camera, label=label)
                entry = case_entry(root, case, (float(spacing),) * 3, label=pe)
                entry["patient"] = f"patient{patient:04d}"
                splits[split].append(entry)
            patient += 1
    meta = {
        "description": "phantom CTPA crops with and without pulmonary emboli (data_prep.phantom.make_pe_dataset)",
        **splits,
        "spacing": [float(spacing)] * 3,
        "size": list(shape),  # with the DRR geometry: an X-ray -> CT bundle can train on these pairs
        "geometry": camera.as_dict(),
        "contrast_phase": "ctpa",
        "split": {"by": "patient: each patient's two cases (with / without emboli) are in one split"},
    }
    path = os.path.join(root, "dataset.json")
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path
