"""Generator and discriminator of pix2pix, built from MONAI networks.

The generator is MONAI's ``UNet`` (strided-conv encoder, transposed-conv decoder, skip connections)
whose depth follows the slice size, as pix2pix's ``unet_128``/``unet_256`` do, followed by ``tanh``
because targets live in [-1, 1]. The discriminator is MONAI's ``PatchDiscriminator`` fed the input
slice concatenated with the (real or generated) output slice: the *conditional* PatchGAN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import PatchDiscriminator, UNet
from torch import nn

from common.errors import InputError

MIN_BOTTLENECK = 2  # instance norm needs more than one pixel per channel at the bottleneck


def count_downsamplings(
    image_size: int | Sequence[int], max_downsamplings: int = 8, min_bottleneck: int = MIN_BOTTLENECK
) -> int:
    """How many stride-2 levels a slice of ``image_size`` allows: halve while every side stays even and
    at least ``min_bottleneck``. 256 -> 7 (2x2 bottleneck), 64 -> 5, 96 -> 5 (3x3), capped at ``max_downsamplings``."""
    sizes = [int(s) for s in ((image_size, image_size) if isinstance(image_size, int) else image_size)]
    if len(sizes) != 2 or min(sizes) < 1:
        raise InputError(None, f"image_size must be an int or (H, W), got {image_size!r}")
    n = 0
    while n < max_downsamplings and all(s % 2 == 0 and s // 2 >= min_bottleneck for s in sizes):
        sizes = [s // 2 for s in sizes]
        n += 1
    if n == 0:
        raise InputError(
            None, f"image_size {image_size!r} cannot be downsampled even once (needs even sides >= 4)"
        )
    return n


def unet_channels(n_down: int, base_channels: int = 64, max_multiplier: int = 8) -> tuple[int, ...]:
    """pix2pix channel ladder: base, 2x, 4x, 8x, then 8x for every deeper level."""
    return tuple(base_channels * min(2**i, max_multiplier) for i in range(n_down + 1))


class PhaseGenerator(nn.Module):
    """U-Net generator sized to the slice: ``tanh(UNet(x))``, input and output in [-1, 1] (B, C, H, W).

    ``residual`` (not in pix2pix; the CPU overlay's choice): ``clamp(x + UNet(x), -1, 1)`` with the U-Net's last
    convolution zero-initialised, so the untrained generator is the copy-input baseline and training learns
    only the difference between the average CT and the phase (a breathing shift), which a short CPU run can.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 256,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        max_downsamplings: int = 8,
        norm: str = "instance",
        dropout: float = 0.0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.residual = bool(residual)
        n_down = count_downsamplings(image_size, max_downsamplings)
        self.n_down = n_down
        self.multiple = 2**n_down  # slice sides must divide by this; forward pads to it
        self.least_side = self.multiple * MIN_BOTTLENECK  # instance norm needs a bottleneck over 1x1
        self.unet = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=unet_channels(n_down, base_channels),
            strides=(2,) * n_down,
            kernel_size=3,
            up_kernel_size=3,
            num_res_units=0,
            act=("leakyrelu", {"negative_slope": 0.2}),
            norm=norm,
            dropout=dropout,
        )

        if self.residual:
            last = [m for m in self.unet.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, C_out, H, W): any H, W. Slices whose sides are not a multiple of
        ``multiple`` (2**n_down: the skip connections need every level even), or smaller than
        ``MIN_BOTTLENECK`` multiples, are padded with -1 (air, the window's floor) around the centre and the
        output cropped back, so a CT of any in-plane size runs
        (a 270-pixel CTPA crop failed with "Sizes of tensors must match ... 13 but got 14")."""
        h, w = x.shape[-2], x.shape[-1]
        m, least = self.multiple, self.least_side
        ph, pw = max((-h) % m, least - h), max((-w) % m, least - w)
        if ph > 0 or pw > 0:
            x = torch.nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=-1.0)
        if self.residual:
            y = (x + self.unet(x)).clamp(-1.0, 1.0)
        else:
            y = torch.tanh(self.unet(x))
        if ph > 0 or pw > 0:
            y = y[:, :, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
        return y


def conditional_patch_discriminator(
    in_channels: int = 1,
    out_channels: int = 1,
    channels: int = 64,
    num_layers: int = 3,
    norm: str = "instance",
) -> PatchDiscriminator:
    """pix2pix's 70x70 PatchGAN (``num_layers=3``) judging (input, output) pairs concatenated on channels."""
    return PatchDiscriminator(
        spatial_dims=2,
        channels=channels,
        in_channels=in_channels + out_channels,
        out_channels=1,
        num_layers_d=num_layers,
        norm=norm,
    )
