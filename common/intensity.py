"""Named HU windows and the scaling between Hounsfield units and network intensities.

Conventions (every metric and every model in xray2ct names one of these):

``XRAY2CT`` (ours)
    Clip HU to [-1024, 2048] and scale linearly to [0, 1]. -1024 is air on every scanner; 2048
    keeps dense cortical bone and iodinated contrast unsaturated (CTPA arteries reach ~600 HU),
    saturating only metal. Data range 1.0 for PSNR/SSIM, i.e. 3072 HU.
``X2CTGAN`` (X2CT-GAN, PerX2CT)
    ``clip(HU + 1024, 0, 2500) / 2500``: HU window [-1024, 1476] scaled to [0, 1]. Their PSNR is
    computed on that [0, 1] scale (data range 1.0 = 2500 HU); see :mod:`common.metrics`.
Clinical display windows (lung, mediastinum, bone) are for previews only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class HUWindow:
    """A clipping window [lo, hi] in HU mapped linearly to [0, 1]."""

    name: str
    lo: float
    hi: float

    @property
    def width(self) -> float:
        return self.hi - self.lo

    def to_unit(self, hu):
        """HU -> [0, 1] (clipped). Works on numpy arrays and torch tensors (differentiable inside)."""
        if isinstance(hu, torch.Tensor):
            return ((hu - self.lo) / self.width).clamp(0.0, 1.0)
        return np.clip((np.asarray(hu, dtype=np.float32) - self.lo) / self.width, 0.0, 1.0)

    def from_unit(self, x):
        """[0, 1] -> HU (values outside [0, 1] are clipped first)."""
        if isinstance(x, torch.Tensor):
            return x.clamp(0.0, 1.0) * self.width + self.lo
        return np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * self.width + self.lo

    def to_symmetric(self, hu):
        """HU -> [-1, 1] (GAN generators with tanh outputs, e.g. pix2pix)."""
        return self.to_unit(hu) * 2.0 - 1.0

    def from_symmetric(self, x):
        """[-1, 1] -> HU."""
        return self.from_unit((x + 1.0) / 2.0)

    def as_dict(self) -> dict:
        return {"name": self.name, "hu_min": self.lo, "hu_max": self.hi}


XRAY2CT = HUWindow("xray2ct", -1024.0, 2048.0)
X2CTGAN = HUWindow("x2ctgan", -1024.0, 1476.0)
LUNG = HUWindow("lung", -1350.0, 150.0)  # W1500 L-600
MEDIASTINUM = HUWindow("mediastinum", -160.0, 240.0)  # W400 L40
BONE = HUWindow("bone", -450.0, 1050.0)  # W1500 L300
PE = HUWindow("pe", -100.0, 700.0)  # W800 L300, CTPA reading window

WINDOWS = {w.name: w for w in (XRAY2CT, X2CTGAN, LUNG, MEDIASTINUM, BONE, PE)}


def get_window(name_or_window: str | HUWindow | dict) -> HUWindow:
    """Look a window up by name (``"xray2ct"``, ``"x2ctgan"``, ``"lung"``...), or rebuild a recorded one
    (``HUWindow.as_dict()``, as checkpoint records store it)."""
    if isinstance(name_or_window, HUWindow):
        return name_or_window
    if isinstance(name_or_window, dict):
        try:
            return HUWindow(
                str(name_or_window["name"]), float(name_or_window["hu_min"]), float(name_or_window["hu_max"])
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not an HU window: {name_or_window!r} (needs name, hu_min, hu_max)") from None
    try:
        return WINDOWS[name_or_window.lower()]
    except KeyError:
        raise ValueError(f"unknown HU window {name_or_window!r}; known: {sorted(WINDOWS)}") from None


MU_WATER_PER_MM = 0.0206  # linear attenuation of water at ~60 keV effective energy (1/mm)


def hu_to_mu(hu, mu_water: float = MU_WATER_PER_MM):
    """HU -> linear attenuation (1/mm): mu = mu_water * (1 + HU/1000), clipped at 0 (air)."""
    if isinstance(hu, torch.Tensor):
        return (mu_water * (1.0 + hu / 1000.0)).clamp_min(0.0)
    return np.maximum(mu_water * (1.0 + np.asarray(hu, dtype=np.float32) / 1000.0), 0.0)
