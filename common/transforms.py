"""MONAI transform factories that apply the project's named intensity conventions.

Bundles build their pipelines from MONAI transforms; these helpers only make sure the HU numbers
come from :mod:`common.intensity` instead of being retyped in every config.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import ScaleIntensityRange, ScaleIntensityRanged

from common.intensity import HUWindow, get_window


def hu_window_transform(
    keys: str | Sequence[str] | None = None, window: str | HUWindow = "xray2ct", symmetric: bool = False
):
    """HU -> [0, 1] (or [-1, 1] when ``symmetric``) with clipping, as a MONAI (dict) transform."""
    w = get_window(window)
    b_min, b_max = (-1.0, 1.0) if symmetric else (0.0, 1.0)
    kwargs = dict(a_min=w.lo, a_max=w.hi, b_min=b_min, b_max=b_max, clip=True)
    if keys is None:
        return ScaleIntensityRange(**kwargs)
    return ScaleIntensityRanged(keys=keys, **kwargs)



def inverse_hu_window_transform(
    keys: str | Sequence[str] | None = None, window: str | HUWindow = "xray2ct", symmetric: bool = False
):
    """[0, 1] (or [-1, 1]) -> HU, the inverse of :func:`hu_window_transform` (values clipped first): the
    volume-in bundles' inference ``postprocessing`` ends in HU, which MONAI Label returns as is."""
    w = get_window(window)
    a_min, a_max = (-1.0, 1.0) if symmetric else (0.0, 1.0)
    kwargs = dict(a_min=a_min, a_max=a_max, b_min=w.lo, b_max=w.hi, clip=True)
    if keys is None:
        return ScaleIntensityRange(**kwargs)
    return ScaleIntensityRanged(keys=keys, **kwargs)
