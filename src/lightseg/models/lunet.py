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

from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn as nn

from lightseg.errors import ModelError
from lightseg.models.blocks import instance_norm
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
    conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
    if block == "stamp":
        layers: list[nn.Module] = [conv, nn.ReLU(inplace=True), nn.BatchNorm3d(out_channels)]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        return nn.Sequential(*layers)
    if block == "nnunet":
        return nn.Sequential(conv, instance_norm(out_channels, affine=True), nn.LeakyReLU(0.01, inplace=True))
    raise ModelError(f"unknown block style {block!r}; choose 'stamp' or 'nnunet'")


class UNet3D(nn.Module):
    """The STAMP-topology 3D U-Net with an arbitrary width per level (spec 1.1-1.2).

    ``architecture`` (``{conv unit: output channels}``, what :meth:`architecture` returns and a
    channel-pruned run saves as ``architecture.json``) overrides the level widths of single conv
    units; every unit reading a changed unit (the next conv, the decoder conv reading a skip, a
    transposed conv) gets the matching input width. The transposed convs keep their level's width.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        block: BlockStyle = "stamp",
        dropout: float = 0.0,
        architecture: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ModelError(f"UNet3D needs at least 2 levels of positive width, got widths={widths}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.widths = tuple(widths)
        self.block, self.dropout = block, dropout
        self.size_divisor = (2 ** (len(widths) - 1),) * 3
        self.min_bottleneck_voxels = 2 if block == "nnunet" else 1  # instance norm (registry.check_input_size)
        out = _unit_widths(widths, architecture)

        def units(prefix: str, cin: int, count: int) -> nn.Sequential:
            names = [f"{prefix}.{i}" for i in range(count)]
            return nn.Sequential(*(conv_unit(c, out[n], block, dropout) for c, n in zip([cin, *(out[n] for n in names)], names)))

        self.pool = nn.MaxPool3d(2)
        self.encoders = nn.ModuleList()
        cin = in_channels
        for level in range(len(widths)):
            self.encoders.append(units(f"encoders.{level}", cin, 2))
            cin = out[f"encoders.{level}.1"]
        # Decoder modules are stored deepest first, the order in which forward uses them.
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for i, level in enumerate(range(len(widths) - 2, -1, -1)):
            self.ups.append(nn.ConvTranspose3d(cin, widths[level], kernel_size=2, stride=2))
            skip = out[f"encoders.{level}.1"] + widths[level]
            if level > 0:
                self.decoders.append(units(f"decoders.{i}", skip, 2))
                cin = out[f"decoders.{i}.1"]
            else:
                self.decoders.append(conv_unit(skip, out[f"decoders.{i}"], block, dropout))
                cin = out[f"decoders.{i}"]
        self.head = nn.Sequential(conv_unit(cin, out["head.0"], block, dropout), nn.Conv3d(out["head.0"], num_classes, 1))

    def architecture(self) -> dict[str, int]:
        """``{conv unit: output channels}``, JSON-ready; passed back as ``architecture=`` it rebuilds this shape."""
        return {name: int(unit[0].out_channels) for name, unit in conv_units(self).items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load weights, first reshaping to the widths they carry: a checkpoint saved before a later
        channel-pruning step still loads into a model built from the newer ``architecture.json``."""
        widths = {name: int(state_dict[f"{name}.0.weight"].shape[0]) for name in conv_units(self) if f"{name}.0.weight" in state_dict}
        if widths != {name: w for name, w in self.architecture().items() if name in widths}:
            rebuilt = UNet3D(self.in_channels, self.num_classes, self.widths, self.block, self.dropout, {**self.architecture(), **widths})
            for name, child in rebuilt.named_children():
                setattr(self, name, child)
        return super().load_state_dict(state_dict, strict, assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x.shape)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pool(x))
            skips.append(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def _unit_widths(widths: Sequence[int], architecture: Mapping[str, int] | None) -> dict[str, int]:
    """Every conv unit's output width: its level's width, unless ``architecture`` names it."""
    levels = len(widths)
    default = {f"encoders.{l}.{j}": widths[l] for l in range(levels) for j in range(2)}
    for i, level in enumerate(range(levels - 2, -1, -1)):
        default.update({f"decoders.{i}.{j}": widths[level] for j in range(2)} if level > 0 else {f"decoders.{i}": widths[0]})
    default["head.0"] = widths[0]
    given = {str(k): v for k, v in (architecture or {}).items()}
    unknown = sorted(set(given) - set(default))
    if unknown:
        raise ModelError(f"UNet3D: architecture names unknown conv units {unknown}; known: {list(default)}")
    bad = {k: v for k, v in given.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ModelError(f"UNet3D: architecture widths must be positive integers, got {bad}")
    return {**default, **given}


def conv_units(model: nn.Module) -> dict[str, nn.Sequential]:
    """The model's conv units (a 3x3x3 conv with its norm and activation) by module name, in
    forward order: the layers channel pruning ranks and narrows."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Sequential) and len(module) > 1 and isinstance(module[0], nn.Conv3d) and module[0].kernel_size == (3, 3, 3)
    }


def flat_widths(width: int, levels: int) -> list[int]:
    """LUnet's width schedule: ``C`` at every level (spec 1.2)."""
    return [width] * levels


def doubling_widths(width: int, levels: int) -> list[int]:
    """The standard U-Net's schedule: ``C * 2**l`` at level ``l`` (spec 1.1)."""
    return [width * 2**level for level in range(levels)]


@register_model("lunet", description="Lean U-Net: the same width C at every level (>30x fewer parameters)", recipe=_RECIPE)
def lunet(
    in_channels: int, num_classes: int, width: int = 16, levels: int = 5, block: BlockStyle = "stamp", dropout: float = 0.0,
    architecture: Mapping[str, int] | None = None,
) -> UNet3D:
    return UNet3D(in_channels, num_classes, flat_widths(width, levels), block, dropout, architecture)


@register_model("unet", description="Reference 3D U-Net (STAMP topology), width doubling per level", recipe=_RECIPE)
def unet(
    in_channels: int, num_classes: int, width: int = 16, levels: int = 5, block: BlockStyle = "stamp", dropout: float = 0.0,
    architecture: Mapping[str, int] | None = None,
) -> UNet3D:
    return UNet3D(in_channels, num_classes, doubling_widths(width, levels), block, dropout, architecture)
