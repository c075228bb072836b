"""Building blocks shared by the models: conv-GroupNorm-SiLU, GhostConv3d, squeeze-excitation.

The LightMedSeg spec (``specs/lightmedseg.md`` section 3) defines the blocks; other models may
reuse them. Every GroupNorm has at most 4 groups ("GN4", spec 3), reduced to a divisor of the
channel count so that any width works. The blocks are plain PyTorch; the CPU speed work
(layout-keeping convs, accurate ``channels_last_3d`` norms, fused kernels) is swapped in by
:func:`lightseg.accel.accelerate` when a model is loaded for inference.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ConvBlock = Callable[[int, int, int], nn.Module]
"""``block(in_channels, out_channels, stride)``: a 3x3x3 conv unit (ghost or standard)."""


def group_norm(channels: int, groups: int = 4) -> nn.GroupNorm:
    """GroupNorm with ``gcd(groups, channels)`` groups: GN4 for every width that 4 divides."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def instance_norm(channels: int, affine: bool = False) -> nn.GroupNorm:
    """Instance norm built as ``GroupNorm(channels, channels)``: the same function (eps 1e-5) and
    parameters as ``nn.InstanceNorm3d`` without running statistics, so state dicts load either way.

    Why: on CPU ``nn.InstanceNorm3d`` runs through batch norm over a reshaped input, 2.9x slower
    than group norm at 1x16x128^3 (52 vs 18 ms, 2 threads), 4.8x in ``channels_last_3d``, whose
    layout it also drops; its forward and backward together are 2.1x slower (docs/models.md).
    """
    return nn.GroupNorm(channels, channels, eps=1e-5, affine=affine)


class ConvNormAct(nn.Module):
    """``SiLU(GN4(Conv3d(x)))`` with 'same' padding; the plain conv unit of spec section 3."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=bias
        )
        self.norm = group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))


class GhostConv3d(nn.Module):
    """GhostConv3D with ghost ratio 2 (spec 3.0).

    Half of the output channels come from a dense 3x3x3 conv (``primary``), the other half from
    a depthwise 3x3x3 conv of that half (``cheap``); both without bias [G]. GN4 and SiLU [G]
    follow the concatenation. ``out_channels`` must be even.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"GhostConv3d needs an even out_channels, got {out_channels}")
        half = out_channels // 2
        self.primary = nn.Conv3d(in_channels, half, 3, stride=stride, padding=1, bias=False)
        self.cheap = nn.Conv3d(half, half, 3, padding=1, groups=half, bias=False)
        self.norm = group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)
        return F.silu(self.norm(torch.cat([primary, self.cheap(primary)], dim=1)))


def standard_conv3d(in_channels: int, out_channels: int, stride: int = 1) -> ConvNormAct:
    """The standard-conv replacement of GhostConv3d (spec 3.0): one dense 3x3x3 conv, no bias."""
    return ConvNormAct(in_channels, out_channels, 3, stride=stride, bias=False)


class SqueezeExcite(nn.Module):
    """Channel recalibration ``x * sigmoid(W2 SiLU(W1 GAP(x)))`` (spec Eq. 10).

    The bottleneck width is ``max(min_hidden, channels // divisor)`` [I: divisor 8, floor 4];
    both linear layers have a bias (the spec's totals need them).
    """

    def __init__(self, channels: int, divisor: int = 8, min_hidden: int = 4) -> None:
        super().__init__()
        hidden = max(min_hidden, channels // divisor)
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, channels)

    def scale(self, pooled: torch.Tensor) -> torch.Tensor:
        """The ``(B, C)`` channel scale ``sigmoid(W2 SiLU(W1 pooled))`` from the channel means ``pooled``."""
        return torch.sigmoid(self.expand(F.silu(self.reduce(pooled))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x.mean(dim=(2, 3, 4)))[:, :, None, None, None]
