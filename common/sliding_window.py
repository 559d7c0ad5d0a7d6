"""Whole-volume inference by overlapping windows, including networks that change resolution.

Autoencoders used for latent models (VQ-GAN, VAE) encode a volume to a grid ``factor`` times smaller
(8 for three stride-2 levels) and decode it back. Running them on windows of a large CT only gives a
seamless result when every window's latent lies on the latent grid, i.e. when window starts and strides
are multiples of ``factor``. MONAI's :func:`monai.inferers.sliding_window_inference` already blends
outputs whose size differs from the window by a zoom factor; this module only makes the geometry line up:

- the volume is padded at its far end (replicate) to a multiple of ``factor`` and at least one window;
- the overlap is snapped so that MONAI's stride ``int(roi * (1 - overlap))`` is a multiple of ``factor``;
- MONAI then places the last window at ``size - roi``, also a multiple of ``factor``;
- the result is cropped back (``size`` voxels, or ``size / factor`` latent voxels).
The same holds in the latent grid when decoding (window ``roi / factor``, stride ``stride / factor``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer

Fn = Callable[[torch.Tensor], torch.Tensor]


def _as_tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    values = (int(value),) * ndim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f"expected {ndim} values, got {values}")
    return values


def aligned_stride(roi: int, overlap: float, factor: int) -> int:
    """The window stride nearest to ``roi * (1 - overlap)`` (rounded down) that is a multiple of ``factor``."""
    if roi % factor:
        raise ValueError(f"window size {roi} is not a multiple of the downsampling factor {factor}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    stride = int(roi * (1.0 - overlap)) // factor * factor
    return max(stride, factor)


def monai_overlap_for_stride(roi: int, stride: int) -> float:
    """An overlap for which MONAI computes exactly ``stride`` (it truncates ``roi * (1 - overlap)``)."""
    return 1.0 - (stride + 0.5) / roi


def aligned_overlap(roi: Sequence[int], overlap: float, factor: int) -> tuple[float, ...]:
    """Per-axis overlaps giving strides that are multiples of ``factor`` (see the module docstring)."""
    return tuple(monai_overlap_for_stride(r, aligned_stride(r, overlap, factor)) for r in roi)


def pad_to_windows(
    volume: torch.Tensor, roi: Sequence[int], factor: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Replicate-pad (B, C, *spatial) at the far end to a multiple of ``factor`` and at least ``roi``.

    Returns the padded tensor and the original spatial size.
    """
    size = tuple(int(s) for s in volume.shape[2:])
    target = [max(r, -(-s // factor) * factor) for s, r in zip(size, roi)]
    pads: list[int] = []
    for s, t in zip(reversed(size), reversed(target)):
        pads += [0, t - s]
    if any(pads):
        # replicate padding needs float and at most 3 spatial dims, which is what we have
        volume = F.pad(volume, pads, mode="replicate")
    return volume, size


def make_inferer(
    roi: Sequence[int],
    overlap: float | Sequence[float],
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> SlidingWindowInferer:
    """MONAI's SlidingWindowInferer with our defaults (replicate padding, sigma 0.125 gaussian)."""
    return SlidingWindowInferer(
        roi_size=tuple(roi),
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode=mode,
        padding_mode="replicate",
        sw_device=sw_device,
        device=device,
        progress=progress,
    )


def sliding_window_same_size(
    fn: Fn,
    volume: torch.Tensor,
    roi: Sequence[int],
    overlap: float = 0.25,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Apply a same-resolution network (image -> image) to a whole volume by blended windows.

    The network must accept windows of size ``roi`` (MONAI pads volumes smaller than a window).
    """
    roi = _as_tuple(roi, volume.ndim - 2)
    inferer = make_inferer(roi, overlap, mode, sw_batch_size, sw_device, device, progress)
    return inferer(volume, fn)


def sliding_window_encode(
    fn: Fn,
    volume: torch.Tensor,
    roi: Sequence[int],
    factor: int,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Encode a whole volume with a network that downsamples by ``factor``; windows align to the latent grid.

    Returns the blended latent of size ``ceil(size / factor)`` per axis.
    """
    roi = _as_tuple(roi, volume.ndim - 2)
    padded, size = pad_to_windows(volume, roi, factor)
    inferer = make_inferer(
        roi, aligned_overlap(roi, overlap, factor), mode, sw_batch_size, sw_device, device, progress
    )
    latent = inferer(padded, fn)
    crop = tuple(slice(0, -(-s // factor)) for s in size)
    return latent[(slice(None), slice(None), *crop)]


def sliding_window_decode(
    fn: Fn,
    latent: torch.Tensor,
    roi: Sequence[int],
    factor: int,
    overlap: float = 0.25,
    mode: str = "gaussian",
    out_size: Sequence[int] | None = None,
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Decode a whole latent with a network that upsamples by ``factor``.

    ``roi`` is the window in *image* voxels (the latent window is ``roi / factor``), so encode and decode
    use the same windows. ``out_size`` crops the result to the original volume size.
    """
    roi = _as_tuple(roi, latent.ndim - 2)
    latent_roi = tuple(r // factor for r in aligned_roi(roi, factor))
    padded, size = pad_to_windows(latent, latent_roi, 1)
    latent_overlap = tuple(
        monai_overlap_for_stride(lr, aligned_stride(r, overlap, factor) // factor)
        for lr, r in zip(latent_roi, roi)
    )
    inferer = make_inferer(latent_roi, latent_overlap, mode, sw_batch_size, sw_device, device, progress)
    image = inferer(padded, fn)
    out = tuple(s * factor for s in size) if out_size is None else tuple(int(s) for s in out_size)
    return image[(slice(None), slice(None), *(slice(0, s) for s in out))]


def aligned_roi(roi: Sequence[int], factor: int) -> tuple[int, ...]:
    """``roi`` checked to be a multiple of ``factor`` per axis."""
    for r in roi:
        if r % factor:
            raise ValueError(
                f"window size {tuple(roi)} is not a multiple of the downsampling factor {factor}"
            )
    return tuple(roi)
