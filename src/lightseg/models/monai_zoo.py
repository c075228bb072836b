"""MONAI's UNet, SegResNet, UNETR and SwinUNETR as registered baselines (thin wrappers).

Each builder spells out every MONAI argument that shapes the network (MONAI's defaults can
change between releases) and passes any other keyword straight to MONAI, so
``create_model("segresnet", 4, 4, init_filters=32)`` works. The wrapper adds what the registry
contract needs: ``in_channels``, ``size_divisor`` and a clear error for a wrong input.

Default configurations (also in ``docs/models.md``):

* ``monai_unet``: channels 16-256, four stride-2 levels, two residual units, instance norm,
  PReLU (MONAI's own tutorial net, instance norm for small batches). Divisor 16.
* ``segresnet``: ``init_filters=16``, blocks down (1, 2, 2, 4), up (1, 1, 1), dropout 0.2,
  trilinear upsampling (MONAI's BraTS tutorial). Divisor 8.
* ``unetr``: the UNETR paper's ViT-B/16 (hidden 768, MLP 3072, 12 heads, feature size 16,
  conv patch embedding, instance norm, residual blocks). Its position embedding fixes the input
  size: ``img_size`` (default 128^3) is the only legal size. Models whose input size is fixed
  by construction take an ``img_size`` argument; the benchmark relies on that convention.
* ``swinunetr``: the SwinUNETR paper's net (feature size 48, depths (2, 2, 2, 2), heads
  (3, 6, 12, 24), window 7, instance norm, no dropout, v1 blocks). Divisor 32.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from monai.networks.nets import UNETR, SegResNet, SwinUNETR, UNet

from lightseg.errors import ModelError
from lightseg.models.registry import check_input, register_model

# MONAI baselines share the project's AdamW + cosine defaults (the published recipes differ per
# paper and data set; this keeps baseline comparisons on equal footing).
_RECIPE = {
    "optimizer": "adamw",
    "lr": 1e-4,
    "weight_decay": 1e-5,
    "schedule": "cosine",
    "warmup_epochs": 5,
    "loss": "dice_ce",
}


class MonaiNet(nn.Module):
    """A MONAI network with the registry contract: input checked, size divisor (and
    ``min_bottleneck_voxels``, see :mod:`lightseg.models.registry`) declared."""

    def __init__(
        self, net: nn.Module, in_channels: int, size_divisor: int | Sequence[int], img_size: Sequence[int] | None = None,
        min_bottleneck_voxels: int = 1,
    ) -> None:
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.size_divisor = tuple(size_divisor) if isinstance(size_divisor, Sequence) else (int(size_divisor),) * 3
        self.img_size = tuple(img_size) if img_size is not None else None
        self.min_bottleneck_voxels = min_bottleneck_voxels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x.shape)
        if self.img_size is not None and tuple(x.shape[2:]) != self.img_size:
            raise ModelError(
                f"{type(self.net).__name__} was built for inputs of exactly {self.img_size}, got "
                f"{tuple(x.shape[2:])}; use patches of {self.img_size} or build it with img_size={tuple(x.shape[2:])}"
            )
        return self.net(x)


def _bottleneck_voxels(norm: Any) -> int:
    """2 for MONAI's instance norm (``"INSTANCE"`` or ``("instance", {...})``), which cannot
    normalise a 1-voxel bottleneck, else 1 (:mod:`lightseg.models.registry`)."""
    name = norm[0] if isinstance(norm, (tuple, list)) else norm
    return 2 if "instance" in str(name).lower() else 1


def _triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    values = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(values) != 3:
        raise ModelError(f"img_size must be one int or three ints, got {size}")
    return values  # type: ignore[return-value]


@register_model("monai_unet", description="MONAI UNet (residual units, instance norm), baseline", recipe=_RECIPE)
def monai_unet(in_channels: int, num_classes: int, **overrides: Any) -> MonaiNet:
    config: dict[str, Any] = dict(
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        kernel_size=3,
        up_kernel_size=3,
        num_res_units=2,
        act="PRELU",
        norm="INSTANCE",
        dropout=0.0,
        bias=True,
        adn_ordering="NDA",
    )
    config.update(overrides)
    divisor = 1
    for stride in config["strides"]:
        divisor *= int(stride)
    net = UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, **config)
    return MonaiNet(net, in_channels, divisor, min_bottleneck_voxels=_bottleneck_voxels(config["norm"]))


@register_model("segresnet", description="MONAI SegResNet (BraTS tutorial configuration), baseline", recipe=_RECIPE)
def segresnet(in_channels: int, num_classes: int, **overrides: Any) -> MonaiNet:
    config: dict[str, Any] = dict(
        init_filters=16,
        dropout_prob=0.2,
        act=("RELU", {"inplace": True}),
        norm=("GROUP", {"num_groups": 8}),
        use_conv_final=True,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
        upsample_mode="nontrainable",
    )
    config.update(overrides)
    net = SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, **config)
    return MonaiNet(net, in_channels, 2 ** (len(config["blocks_down"]) - 1))


@register_model("unetr", description="MONAI UNETR (ViT-B/16 encoder); fixed input size img_size", recipe=_RECIPE)
def unetr(in_channels: int, num_classes: int, img_size: int | Sequence[int] = 128, **overrides: Any) -> MonaiNet:
    size = _triple(img_size)
    if any(s % 16 for s in size):
        raise ModelError(f"UNETR embeds 16^3 patches: img_size {size} must be a multiple of 16 on every axis")
    config: dict[str, Any] = dict(
        feature_size=16,
        hidden_size=768,
        mlp_dim=3072,
        num_heads=12,
        proj_type="conv",
        norm_name="instance",
        conv_block=True,
        res_block=True,
        dropout_rate=0.0,
        qkv_bias=False,
    )
    config.update(overrides)
    net = UNETR(in_channels=in_channels, out_channels=num_classes, img_size=size, spatial_dims=3, **config)
    # MONAI builds a cross-attention LayerNorm in every ViT block even without cross-attention;
    # it never runs, so it is frozen (kept in the state dict for MONAI checkpoint compatibility).
    for block in net.vit.blocks:
        if not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)
    return MonaiNet(net, in_channels, size, img_size=size)


@register_model("swinunetr", description="MONAI SwinUNETR (Swin transformer encoder), baseline", recipe=_RECIPE)
def swinunetr(in_channels: int, num_classes: int, **overrides: Any) -> MonaiNet:
    config: dict[str, Any] = dict(
        patch_size=2,
        depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        feature_size=48,
        norm_name="instance",
        drop_rate=0.0,
        attn_drop_rate=0.0,
        dropout_path_rate=0.0,
        normalize=True,
        use_checkpoint=False,
        downsample="merging",
        use_v2=False,
    )
    config.update(overrides)
    net = SwinUNETR(in_channels=in_channels, out_channels=num_classes, spatial_dims=3, **config)
    # MONAI's own rule (SwinUNETR._check_input_size): every axis a multiple of patch_size**5.
    return MonaiNet(net, in_channels, int(config["patch_size"]) ** 5,
                    min_bottleneck_voxels=_bottleneck_voxels(config["norm_name"]))
