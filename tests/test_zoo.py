"""LUnet vs the doubling U-Net (lunet spec 1.2 table), plainunet topology, zoo options."""

from __future__ import annotations

import pytest
import torch

from lightseg.benchmark.flops import count_macs, count_parameters
from lightseg.errors import ModelError
from lightseg.models import create_model
from lightseg.models.lunet import UNet3D, lunet, unet

# Spec 1.2 table (1 input channel, 2 classes, STAMP blocks, 5 levels):
# C -> (standard params, LUnet params, conv MACs per voxel standard, LUnet).
SPEC_TABLE = {
    4: (354e3, 9.9e3, 3.6e3, 2.2e3),
    8: (1.41e6, 39e3, 14.4e3, 8.5e3),
    16: (5.65e6, 155e3, 56.9e3, 33.3e3),
    32: (22.6e6, 616e3, 227e3, 132e3),
}
EQUAL_PARAMETER_WIDTH = {4: 25, 8: 49, 16: 98, 32: 195}  # spec 1.2, "about 6.1 C"


def _params_on_meta(builder, width: int) -> int:
    with torch.device("meta"):  # shapes only: building wide nets costs no memory or time
        return count_parameters(builder(1, 2, width=width))


@pytest.mark.parametrize("width", sorted(SPEC_TABLE))
def test_parameter_counts_match_spec_table(width: int) -> None:
    standard, flat = _params_on_meta(unet, width), _params_on_meta(lunet, width)
    spec_standard, spec_flat, _, _ = SPEC_TABLE[width]
    assert standard == pytest.approx(spec_standard, rel=0.01)
    assert flat == pytest.approx(spec_flat, rel=0.01)
    assert 35.0 <= standard / flat <= 37.0
    # The spec's "about 599 C^2" exactly: 599 C^2 weights, 87 C biases and norm affines, 2 head biases.
    assert flat == 599 * width**2 + 87 * width + 2


@pytest.mark.parametrize("width", sorted(SPEC_TABLE))
def test_macs_per_voxel_match_spec_table(width: int) -> None:
    side = 32
    voxels = side**3
    standard = count_macs(unet(1, 2, width=width), (1, 1, side, side, side)).conv_linear_macs / voxels
    flat = count_macs(lunet(1, 2, width=width), (1, 1, side, side, side)).conv_linear_macs / voxels
    _, _, spec_standard, spec_flat = SPEC_TABLE[width]
    assert standard == pytest.approx(spec_standard, rel=0.02)
    assert flat == pytest.approx(spec_flat, rel=0.02)
    assert 0.40 <= 1 - flat / standard <= 0.42


@pytest.mark.parametrize("width", sorted(EQUAL_PARAMETER_WIDTH))
def test_equal_parameter_width(width: int) -> None:
    """The smallest flat width whose net has at least the doubling net's parameters (spec 1.2)."""
    target = _params_on_meta(unet, width)
    low, high = width, 10 * width  # parameters grow with width: bisect for the first w reaching target
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if _params_on_meta(lunet, mid) < target else (low, mid)
    equal = low
    assert equal == EQUAL_PARAMETER_WIDTH[width]
    assert 6.0 <= equal / width <= 6.3


def test_width_schedules_and_divisor() -> None:
    assert lunet(4, 4, width=8, levels=4).widths == (8, 8, 8, 8)
    model = unet(4, 4, width=8, levels=4)
    assert model.widths == (8, 16, 32, 64)
    assert model.size_divisor == (8, 8, 8)


def _layer_kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.GroupNorm) and module.num_groups == module.num_channels:
        return "instance_norm"  # the instance norm, built as a per-channel group norm
    return type(module).__name__


@pytest.mark.parametrize("block", ["stamp", "nnunet"])
def test_block_styles(block: str) -> None:
    model = lunet(1, 2, width=4, levels=3, block=block, dropout=0.1)
    norms = {_layer_kind(m) for m in model.modules() if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.GroupNorm))}
    assert norms == {"BatchNorm3d" if block == "stamp" else "instance_norm"}
    has_dropout = any(isinstance(m, torch.nn.Dropout3d) for m in model.modules())
    assert has_dropout == (block == "stamp")  # targeted dropout belongs to the STAMP block
    first = model.encoders[0][0]
    # STAMP's order is conv -> ReLU -> BN; nnU-Net's is conv -> IN -> LeakyReLU.
    assert [_layer_kind(m) for m in first][:3] == (
        ["Conv3d", "ReLU", "BatchNorm3d"] if block == "stamp" else ["Conv3d", "instance_norm", "LeakyReLU"]
    )
    assert model(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_invalid_options_are_model_errors() -> None:
    with pytest.raises(ModelError, match="block style"):
        create_model("lunet", 1, 2, block="resnet")
    with pytest.raises(ModelError, match="at least 2 levels"):
        UNet3D(1, 2, widths=[8])
    with pytest.raises(ModelError, match="multiple of 16"):
        create_model("unetr", 1, 2, img_size=40)
    with pytest.raises(ModelError, match="invalid arguments"):
        create_model("plainunet", 1, 2, colour="blue")


def test_plainunet_is_nnunet_3d_fullres() -> None:
    with torch.device("meta"):
        model = create_model("plainunet", 4, 4)
    assert model.widths == (32, 64, 128, 256, 320, 320)
    assert model.size_divisor == (32, 32, 32)
    # nnU-Net's 3d_fullres net for 4 channels / 4 classes has about 31.2 M parameters.
    assert count_parameters(model) == pytest.approx(31.2e6, rel=0.01)
    strides = [m.stride for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    assert strides.count((2, 2, 2)) == 5  # strided convs replace pooling


def test_plainunet_deep_supervision() -> None:
    model = create_model("plainunet", 1, 2, stages=4, width=4, max_width=16, deep_supervision=True)
    x = torch.randn(1, 1, 16, 16, 16)
    outputs = model.train()(x)
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    with torch.inference_mode():
        assert model.eval()(x).shape == (1, 2, 16, 16, 16)


def test_unetr_only_accepts_its_img_size() -> None:
    model = create_model("unetr", 1, 2, img_size=32, feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4)
    with pytest.raises(ModelError, match=r"exactly \(32, 32, 32\)"), torch.inference_mode():
        model(torch.zeros(1, 1, 64, 64, 64))


def test_monai_group_norms_are_the_accurate_ones() -> None:
    """The accelerator turns SegResNet's group norms into lightseg's (accurate in channels_last_3d):
    same state dict as MONAI's own network, same outputs in both layouts."""
    from monai.networks.nets import SegResNet

    from lightseg.accel import accelerate
    from lightseg.accel.layers import AccurateGroupNorm

    torch.manual_seed(0)
    model = accelerate(create_model("segresnet", 2, 3).eval())
    assert not any(type(m) is torch.nn.GroupNorm for m in model.modules())
    assert any(isinstance(m, AccurateGroupNorm) for m in model.modules())
    plain = SegResNet(spatial_dims=3, in_channels=2, out_channels=3, init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    assert {f"net.{k}" for k in plain.state_dict()} == set(model.state_dict())
    x = torch.randn(1, 2, 32, 32, 32) * 2 + 3
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last_3d)), reference, atol=1e-5, rtol=1e-5)
