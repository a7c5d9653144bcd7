"""The 2x down- and upsamplers of the UNet and the VAE (diffusers' names: the conv is ``conv``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; with padding 0 (the VAE encoder) the input is padded right and bottom by one."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.pad_right_bottom = padding == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_right_bottom:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to ``size``: the UNet's odd latent sizes) then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if x.shape[0] >= 64 or x.numel() * 2 > 2**31:
            x = x.contiguous()  # upsample_nearest_nhwc fails on large tensors (diffusers guards the same way)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
