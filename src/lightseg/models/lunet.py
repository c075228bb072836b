"""Lean U-Net (LUnet) and the doubling U-Net it is compared with (lunet spec sections 1, 4).

One implementation, :class:`UNet3D`, takes a width per level. LUnet keeps the same width ``C``
at every level, bottleneck included (spec 1.2); the reference U-Net doubles it per level
(``C, 2C, 4C, ...``, spec 1.1). Everything else is the STAMP 3D U-Net topology of spec 1.1:

* encoder level: two 3x3x3 convs; levels are joined by ``MaxPool3d(2)``;
* up path: ``ConvTranspose3d(k=2, s=2)`` from level ``l+1`` to ``l``, concatenation with the
  encoder skip, two convs (one conv at level 0);
* head: one more 3x3x3 conv unit, then a 1x1x1 conv to the classes.

With the STAMP block this has about ``599 C^2`` parameters at 5 levels, and the doubling net
35.6-36.6 times more (spec table, reproduced in ``tests/test_zoo.py``).

Choices where the spec is silent (also in ``docs/models.md``):

* ``block="stamp"`` (default, spec 1.1): conv (bias) -> ReLU -> BatchNorm3d, ReLU before BN as
  in STAMP, plus ``Dropout3d(dropout)`` when ``dropout > 0``. STAMP's targeted dropout belongs
  to its pruning loop, so the default is ``dropout=0``. ``block="nnunet"`` (spec 4): conv (bias)
  -> instance norm (affine, built as ``GroupNorm(C, C)``: faster, same function) ->
  LeakyReLU(0.01), better suited to batch sizes of 1-2.
* The output is logits (no sigmoid as in STAMP), so the project's Dice + CE loss applies.
* Default width ``C = 16`` for both nets (spec 1.3's grid; LUnet then has about 155 k
  parameters with 1 input channel).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn

from lightseg.errors import ModelError
from lightseg.models.blocks import Conv3d, ConvTranspose3d, instance_norm
from lightseg.models.registry import check_input, register_model

BlockStyle = Literal["stamp", "nnunet"]

# The training recipe is not published (spec 5, question 3); these are the project's defaults.
_RECIPE = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 1e-5,
    "schedule": "cosine",
    "warmup_epochs": 5,
    "loss": "dice_ce",
}


def conv_unit(in_channels: int, out_channels: int, block: BlockStyle, dropout: float = 0.0) -> nn.Sequential:
    """One 3x3x3 conv with its norm and activation, in the order of the chosen block style."""
    conv = Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
    if block == "stamp":
        layers: list[nn.Module] = [conv, nn.ReLU(inplace=True), nn.BatchNorm3d(out_channels)]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        return nn.Sequential(*layers)
    if block == "nnunet":
        return nn.Sequential(conv, instance_norm(out_channels, affine=True), nn.LeakyReLU(0.01, inplace=True))
    raise ModelError(f"unknown block style {block!r}; choose 'stamp' or 'nnunet'")


class UNet3D(nn.Module):
    """The STAMP-topology 3D U-Net with an arbitrary width per level (spec 1.1-1.2)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        block: BlockStyle = "stamp",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ModelError(f"UNet3D needs at least 2 levels of positive width, got widths={widths}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.widths = tuple(widths)
        self.size_divisor = (2 ** (len(widths) - 1),) * 3
        self.min_bottleneck_voxels = 2 if block == "nnunet" else 1  # instance norm (registry.check_input_size)

        def double(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(conv_unit(cin, cout, block, dropout), conv_unit(cout, cout, block, dropout))

        self.pool = nn.MaxPool3d(2)
        self.encoders = nn.ModuleList(double(cin, cout) for cin, cout in zip([in_channels, *widths[:-1]], widths))
        # Decoder modules are stored deepest first, the order in which forward uses them.
        levels = range(len(widths) - 2, -1, -1)
        self.ups = nn.ModuleList(ConvTranspose3d(widths[l + 1], widths[l], kernel_size=2, stride=2) for l in levels)
        self.decoders = nn.ModuleList(
            double(2 * widths[l], widths[l]) if l > 0 else conv_unit(2 * widths[0], widths[0], block, dropout)
            for l in levels
        )
        self.head = nn.Sequential(conv_unit(widths[0], widths[0], block, dropout), Conv3d(widths[0], num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x.shape)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def flat_widths(width: int, levels: int) -> list[int]:
    """LUnet's width schedule: ``C`` at every level (spec 1.2)."""
    return [width] * levels


def doubling_widths(width: int, levels: int) -> list[int]:
    """The standard U-Net's schedule: ``C * 2**l`` at level ``l`` (spec 1.1)."""
    return [width * 2**level for level in range(levels)]


@register_model("lunet", description="Lean U-Net: the same width C at every level (>30x fewer parameters)", recipe=_RECIPE)
def lunet(
    in_channels: int, num_classes: int, width: int = 16, levels: int = 5, block: BlockStyle = "stamp", dropout: float = 0.0
) -> UNet3D:
    return UNet3D(in_channels, num_classes, flat_widths(width, levels), block, dropout)


@register_model("unet", description="Reference 3D U-Net (STAMP topology), width doubling per level", recipe=_RECIPE)
def unet(
    in_channels: int, num_classes: int, width: int = 16, levels: int = 5, block: BlockStyle = "stamp", dropout: float = 0.0
) -> UNet3D:
    return UNet3D(in_channels, num_classes, doubling_widths(width, levels), block, dropout)
