"""The training path of group norm on channels_last_3d maps: PyTorch's outputs exactly and its
gradients to float rounding, and the swap leaves every other path to the module's own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.accel import native
from lightseg.accel.training_norms import GroupNormFunction, GroupNormSiLUFunction, _TrainingGroupNorm, use_training_norms
from lightseg.models.blocks import ConvNormAct, GhostConv3d

needs_kernels = pytest.mark.skipif(native.library() is None, reason="the C kernels are not built on this machine")
LAYOUT = torch.channels_last_3d


@needs_kernels
@pytest.mark.parametrize("channels, groups, affine", [(8, 4, True), (16, 4, True), (6, 6, False), (4, 1, True)])
def test_outputs_and_gradients_equal_autograd(channels: int, groups: int, affine: bool) -> None:
    """float32 against PyTorch's group norm in float64; the forward is PyTorch's, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, channels, 7, 9, 8, generator=g) + 1).contiguous(memory_format=LAYOUT)
    weight = torch.randn(channels, generator=g) if affine else None
    bias = torch.randn(channels, generator=g) if affine else None
    go = torch.randn(2, channels, 7, 9, 8, generator=g).contiguous(memory_format=LAYOUT)
    ours = [None if t is None else t.clone().requires_grad_() for t in (x, weight, bias)]
    y = GroupNormFunction.apply(*ours, groups, 1e-5)
    assert torch.equal(y, F.group_norm(x, groups, weight, bias, 1e-5))
    y.backward(go)
    assert ours[0].grad.is_contiguous(memory_format=LAYOUT)
    reference = [None if t is None else t.double().requires_grad_() for t in (x, weight, bias)]
    F.group_norm(reference[0], groups, reference[1], reference[2], 1e-5).backward(go.double())
    for got, expected in zip(ours, reference):
        if expected is not None:
            assert got.grad.dtype == torch.float32
            assert (got.grad.double() - expected.grad).abs().max() <= 1e-5 * expected.grad.abs().max()


def test_swap_keeps_the_module_and_takes_the_path_only_on_channels_last_training_maps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.GroupNorm(4, 8), nn.Conv3d(8, 8, 1), nn.GroupNorm(8, 8, affine=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    use_training_norms(use_training_norms(model))
    assert isinstance(model[0], _TrainingGroupNorm) and isinstance(model[2], _TrainingGroupNorm)
    assert type(model[0]).__mro__[2] is nn.GroupNorm  # swapped once: the training class, the mixin, GroupNorm
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    calls = []
    original = GroupNormFunction.apply
    x = torch.randn(2, 8, 5, 6, 7)
    try:
        GroupNormFunction.apply = lambda *a: calls.append(1) or original(*a)
        model[0](x)  # contiguous
        with torch.no_grad():
            model[0](x.contiguous(memory_format=LAYOUT))  # no gradient recorded
        out = model[0](x.contiguous(memory_format=LAYOUT))
    finally:
        GroupNormFunction.apply = original
    assert len(calls) == (native.library() is not None)
    assert torch.equal(out, F.group_norm(x.contiguous(memory_format=LAYOUT), 4, model[0].weight, model[0].bias))


@needs_kernels
@pytest.mark.parametrize("channels, groups, affine, size", [(8, 4, True, (34, 33, 32)), (4, 4, True, (7, 9, 8)),
                                                          (6, 6, False, (7, 9, 8)), (16, 4, True, (30, 31, 32))])
def test_norm_and_silu_equal_autograd_in_float64(channels: int, groups: int, affine: bool, size: tuple) -> None:
    """Sizes above and below the kernels' one-thread bound, and voxel counts off their 16-voxel rows."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, channels, *size, generator=g) + 1).contiguous(memory_format=LAYOUT)
    weight = torch.randn(channels, generator=g) if affine else None
    bias = torch.randn(channels, generator=g) if affine else None
    go = torch.randn(2, channels, *size, generator=g).contiguous(memory_format=LAYOUT)
    ours = [None if t is None else t.clone().requires_grad_() for t in (x, weight, bias)]
    y = GroupNormSiLUFunction.apply(*ours, groups, 1e-5)
    y.backward(go)
    reference = [None if t is None else t.double().requires_grad_() for t in (x, weight, bias)]
    expected = F.silu(F.group_norm(reference[0], groups, reference[1], reference[2], 1e-5))
    expected.backward(go.double())
    assert y.is_contiguous(memory_format=LAYOUT) and ours[0].grad.is_contiguous(memory_format=LAYOUT)
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    for got, ref in zip(ours, reference):
        if ref is not None:
            assert (got.grad.double() - ref.grad).abs().max() <= 1e-5 * ref.grad.abs().max()


@needs_kernels
@pytest.mark.parametrize("block", [lambda: ConvNormAct(8, 8, 3), lambda: GhostConv3d(8, 8)])
def test_conv_units_take_the_fused_norm_and_silu_only_on_training_maps(block) -> None:
    torch.manual_seed(0)
    unit = block()
    plain = [p.detach().clone() for p in unit.parameters()]
    use_training_norms(use_training_norms(unit))
    assert all(torch.equal(p, q) for p, q in zip(unit.parameters(), plain))
    x = torch.randn(2, 8, 32, 33, 34).contiguous(memory_format=LAYOUT)
    y = unit(x.requires_grad_())
    assert y.grad_fn.name().startswith("GroupNormSiLUFunction")
    assert unit(x[:, :, :9, :10, :11].contiguous(memory_format=LAYOUT)).grad_fn.name() == "SiluBackward0"  # small: PyTorch's SiLU
    assert unit(x.detach().contiguous()).grad_fn.name() == "SiluBackward0"  # contiguous: the module's own path
    with torch.no_grad():
        assert torch.allclose(unit(x), y, atol=1e-5)
