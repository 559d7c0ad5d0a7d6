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
:class:`LatentSlidingWindowInferer` is the one object that does all three (same-size, encode, decode).
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


class LatentSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` that also knows an autoencoder's latent grid (``factor``).

    One object carries the window settings (``roi_size``, ``overlap``, ``mode``, ``sw_batch_size``,
    ``sw_device`` for the windows, ``device`` for the whole-volume accumulators, ``progress``), as MONAI's
    ``SliceInferer(SlidingWindowInferer)`` does, instead of threading them through every call:

    * ``inferer(volume, network)``: image -> same-size image (MONAI's blending; replicate padding);
    * ``inferer.encode(volume, encode_fn)``: image -> latent of ``ceil(size / factor)`` (module docstring);
    * ``inferer.decode(latent, decode_fn, out_size)``: latent -> image, the same windows seen from the latent.

    ``factor`` may be None here and given per call (the codec reads it from the network).
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        factor: int | None = None,
        overlap: float = 0.25,
        mode: str = "gaussian",
        sw_batch_size: int = 1,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        padding_mode: str = "replicate",
        sigma_scale: float = 0.125,
    ):
        super().__init__(
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            padding_mode=padding_mode,
            sw_device=sw_device,
            device=device,
            progress=progress,
        )
        self.factor = None if factor is None else int(factor)

    def _factor(self, factor: int | None) -> int:
        factor = self.factor if factor is None else int(factor)
        if factor is None or factor < 1:
            raise ValueError("the latent factor is unknown: give it to the inferer or to encode/decode")
        if self.factor is not None and factor != self.factor:
            raise ValueError(f"the network's latent factor {factor} differs from the inferer's {self.factor}")
        return factor

    def _roi(self, ndim: int) -> tuple[int, ...]:
        return _as_tuple(self.roi_size if not isinstance(self.roi_size, int) else self.roi_size, ndim)

    def _windows(self, roi: Sequence[int], overlap: float | Sequence[float]) -> SlidingWindowInferer:
        return SlidingWindowInferer(
            roi_size=tuple(roi),
            sw_batch_size=self.sw_batch_size,
            overlap=overlap,
            mode=self.mode,
            sigma_scale=self.sigma_scale,
            padding_mode=self.padding_mode,
            sw_device=self.sw_device,
            device=self.device,
            progress=self.progress,
        )

    def encode(self, volume: torch.Tensor, fn: Fn, factor: int | None = None) -> torch.Tensor:
        """Encode (B, C, *spatial) with a network that downsamples by ``factor``; returns the blended latent."""
        factor = self._factor(factor)
        roi = aligned_roi(self._roi(volume.ndim - 2), factor)
        padded, size = pad_to_windows(volume, roi, factor)
        latent = self._windows(roi, aligned_overlap(roi, float(self.overlap), factor))(padded, fn)
        crop = tuple(slice(0, -(-s // factor)) for s in size)
        return latent[(slice(None), slice(None), *crop)]

    def decode(
        self,
        latent: torch.Tensor,
        fn: Fn,
        out_size: Sequence[int] | None = None,
        factor: int | None = None,
    ) -> torch.Tensor:
        """Decode a latent with a network that upsamples by ``factor``; ``out_size`` crops to the volume's size.

        The window is ``roi / factor`` latent voxels with stride ``stride / factor``: the windows of
        :meth:`encode` seen from the latent grid.
        """
        factor = self._factor(factor)
        roi = aligned_roi(self._roi(latent.ndim - 2), factor)
        latent_roi = tuple(r // factor for r in roi)
        padded, size = pad_to_windows(latent, latent_roi, 1)
        overlap = float(self.overlap)
        latent_overlap = tuple(
            monai_overlap_for_stride(lr, aligned_stride(r, overlap, factor) // factor) for lr, r in zip(latent_roi, roi)
        )
        image = self._windows(latent_roi, latent_overlap)(padded, fn)
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
