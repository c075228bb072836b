"""nnU-Net's 3d_fullres network topology (``PlainConvUNet``), written for this project.

nnU-Net's own network package pulls in a CUDA build of torch, so the topology is rebuilt here
from its published description (Isensee et al., Nature Methods 2021, and nnU-Net v2's default
plans for an isotropic 128^3 patch):

* ``stages`` resolution stages; stage ``s`` has ``min(width * 2**s, max_width)`` channels
  (32, 64, 128, 256, 320, 320 for the default 6 stages, bottleneck 4^3 at a 128^3 patch);
* every stage has two conv units, conv 3^3 (bias) -> InstanceNorm3d (affine, eps 1e-5) ->
  LeakyReLU(0.01); the first conv of stages 1.. has stride 2 (no pooling);
* decoder: ``ConvTranspose3d(k=2, s=2)``, concatenation with the skip, two conv units;
* He initialisation with negative slope 1e-2, biases zero (nnU-Net's ``InitWeights_He``).

Deep supervision (``deep_supervision=True``, the default, as nnU-Net trains this network): in
training mode ``forward`` returns a list of logits, one per decoder stage, full resolution
first; in eval mode only the full-resolution logits, and the lower heads are not run.
nnU-Net always builds the extra 1x1x1 heads; here they exist only when deep supervision is on
(``deep_supervision=False`` drops them: ``(sum of the lower stages' widths + stages - 2) x
classes`` fewer parameters, 772 x classes at the default 6 stages).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lightseg.errors import ModelError
from lightseg.models.registry import check_input, register_model

# nnU-Net's default trainer: SGD (Nesterov, momentum 0.99) at 1e-2, weight decay 3e-5, PolyLR 0.9.
_RECIPE = {
    "optimizer": "sgd",
    "lr": 1e-2,
    "weight_decay": 3e-5,
    "schedule": "poly",
    "warmup_epochs": 0,
    "loss": "dice_ce",
}


def _conv_unit(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True),
        nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class PlainConvUNet(nn.Module):
    """nnU-Net 3d_fullres U-Net: strided-conv encoder, transposed-conv decoder, IN + LeakyReLU."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        stages: int = 6,
        width: int = 32,
        max_width: int = 320,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if stages < 2:
            raise ModelError(f"plainunet needs at least 2 stages, got stages={stages}")
        widths = [min(width * 2**s, max_width) for s in range(stages)]
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.widths = tuple(widths)
        self.deep_supervision = deep_supervision
        self.size_divisor = (2 ** (stages - 1),) * 3
        self.min_bottleneck_voxels = 2  # the bottleneck's instance norm (registry.check_input_size)
        self.channels_last = False  # its wide dense convs run 1.27x slower in channels_last_3d (docs/benchmarks.md)

        self.encoders = nn.ModuleList(
            nn.Sequential(_conv_unit(cin, cout, stride=1 if s == 0 else 2), _conv_unit(cout, cout))
            for s, (cin, cout) in enumerate(zip([in_channels, *widths[:-1]], widths))
        )
        levels = range(stages - 2, -1, -1)  # decoder order: deepest first
        self.ups = nn.ModuleList(nn.ConvTranspose3d(widths[s + 1], widths[s], kernel_size=2, stride=2) for s in levels)
        self.decoders = nn.ModuleList(
            nn.Sequential(_conv_unit(2 * widths[s], widths[s]), _conv_unit(widths[s], widths[s])) for s in levels
        )
        head_levels = levels if deep_supervision else [0]
        self.heads = nn.ModuleList(nn.Conv3d(widths[s], num_classes, kernel_size=1) for s in head_levels)
        self.apply(_init_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(self, x.shape)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        outputs = []
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([skip, up(x)], dim=1))
            if self.deep_supervision and self.training:
                outputs.append(self.heads[len(outputs)](x))
        if not (self.deep_supervision and self.training):
            return self.heads[-1](x)
        return outputs[::-1]


def _init_he(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model(
    "plainunet",
    description="nnU-Net 3d_fullres topology (conv-IN-LeakyReLU, strided convs, 32 -> 320 channels)",
    recipe=_RECIPE,
)
def plainunet(
    in_channels: int,
    num_classes: int,
    stages: int = 6,
    width: int = 32,
    max_width: int = 320,
    deep_supervision: bool = True,
) -> PlainConvUNet:
    return PlainConvUNet(in_channels, num_classes, stages, width, max_width, deep_supervision)
