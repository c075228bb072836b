"""The accelerator's layers (lightseg.accel.layers) against the plain PyTorch layers they stand in
for: same function, accurate and layout-keeping in ``channels_last_3d``; and the plain blocks'
instance norm against ``nn.InstanceNorm3d``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightseg.accel.layers import (
    AccurateGroupNorm as GroupNorm, FastConv3d as Conv3d, FastConvTranspose3d as ConvTranspose3d, GroupSumConv3d,
    is_channels_last, scale_inputs, takes_down_kernel, takes_pointwise_kernel, takes_slow_path, takes_up_kernel,
)
from lightseg.accel import accelerate
from lightseg.models.blocks import instance_norm

CL = torch.channels_last_3d


def _offset_maps(batch: int, channels: int, side: int) -> torch.Tensor:
    """Maps with a mean far from zero: where a one-pass float variance loses its digits."""
    torch.manual_seed(0)
    return torch.randn(batch, channels, side, side, side) * 3 + 10 + torch.randn(batch, channels, 1, 1, 1) * 2


@pytest.mark.parametrize(("batch", "groups", "affine"), [(1, 4, True), (2, 4, True), (1, 8, False), (2, 8, False)])
def test_group_norm_is_accurate_in_channels_last(batch, groups, affine):
    """Within 5e-6 of float64 in channels_last_3d, batch of one (batch-norm pass) or more
    (scale-and-shift pass); PyTorch's own kernel is off by far more on the same maps."""
    x = _offset_maps(batch, 8, 64)
    norm = GroupNorm(groups, 8, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1.0, 1.0)
    weight, bias = (norm.weight.double(), norm.bias.double()) if affine else (None, None)
    reference = F.group_norm(x.double(), groups, weight, bias, norm.eps)
    with torch.no_grad():
        out = norm(x.contiguous(memory_format=CL))
        torch_own = torch.nn.GroupNorm.forward(norm, x.contiguous(memory_format=CL))
    assert is_channels_last(out)
    assert (out.double() - reference).abs().max() < 5e-6
    assert (torch_own.double() - reference).abs().max() > 1e-5  # the kernel this replaces
    assert (norm(x).double() - reference).abs().max() < 5e-6  # contiguous: PyTorch's own


def test_group_norm_gradients_match_in_channels_last():
    x = _offset_maps(1, 8, 16)
    norm = GroupNorm(4, 8)
    grads = []
    for layout in (torch.contiguous_format, CL):
        inp = x.contiguous(memory_format=layout).detach().requires_grad_()
        norm.zero_grad()
        (norm(inp) * torch.linspace(0, 1, 16)).sum().backward()
        grads.append((inp.grad, norm.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-4, rtol=1e-4)


def test_instance_norm_is_torchs_instance_norm():
    """Same function and state dict as nn.InstanceNorm3d (affine), so old checkpoints load;
    accelerated, the same in ``channels_last_3d`` too."""
    x = _offset_maps(2, 6, 12)
    reference = torch.nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2.0)
        reference.bias.uniform_(-1.0, 1.0)
    norm = instance_norm(6, affine=True)
    norm.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(norm(x), reference(x), atol=1e-5, rtol=1e-5)
        fast = accelerate(copy.deepcopy(norm))
        torch.testing.assert_close(fast(x.contiguous(memory_format=CL)), reference(x), atol=1e-5, rtol=1e-5)
    assert instance_norm(6).state_dict().keys() == torch.nn.InstanceNorm3d(6).state_dict().keys()


def test_conv_keeps_channels_last_where_pytorch_drops_it():
    """A batch-of-one 3x3x3 conv this small runs on PyTorch's own kernel, which returns a
    contiguous map; the block hands the input's layout on, with the same values."""
    torch.manual_seed(0)
    conv = Conv3d(4, 8, 3, padding=1).to(memory_format=CL)
    x = torch.randn(1, 4, 16, 16, 16).contiguous(memory_format=CL)
    with torch.no_grad():
        plain = torch.nn.Conv3d.forward(conv, x)
        out = conv(x)
    assert not plain.is_contiguous(memory_format=CL)  # what PyTorch does on its own
    assert is_channels_last(out)
    torch.testing.assert_close(out, plain)


@pytest.mark.parametrize(
    "conv",
    [
        Conv3d(6, 4, 3, padding=1),  # dense
        Conv3d(6, 4, 3, padding=1, groups=2),  # grouped: each output reads its group's inputs
        Conv3d(6, 6, 3, padding=1, groups=6),  # depthwise
        ConvTranspose3d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
        GroupSumConv3d(6, 3, 3, padding=1, groups=3),
    ],
    ids=["dense", "grouped", "depthwise", "transposed", "group-sum"],
)
def test_in_scale_is_the_conv_of_the_scaled_input(conv):
    """``in_scale`` folded into the weights gives the conv of ``x * in_scale``, gradients included."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 6, 7, 8)
    scale = torch.rand(1, 6, requires_grad=True)
    folded = conv(x, in_scale=scale)
    reference = conv(x * scale[:, :, None, None, None])
    torch.testing.assert_close(folded, reference, atol=1e-5, rtol=1e-5)
    grad_folded = torch.autograd.grad(folded.square().sum(), scale)
    grad_reference = torch.autograd.grad(reference.square().sum(), scale)
    torch.testing.assert_close(grad_folded, grad_reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_small_convs_run_on_onednn_with_the_same_outputs(layout):
    """A conv PyTorch would send to its slow kernel (batch 1, 8 x 16 x 16 <= 20480) runs on
    oneDNN instead: PyTorch's outputs and gradients, the input's layout kept."""
    torch.manual_seed(0)
    conv = Conv3d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 16, 16, 16).contiguous(memory_format=layout).requires_grad_()
    assert takes_slow_path(conv, x)
    with torch.profiler.profile() as prof:
        out = conv(x)
    assert "aten::slow_conv3d_forward" not in {event.name for event in prof.events()}
    reference = torch.nn.Conv3d.forward(conv, x)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    reference_grads = torch.autograd.grad(reference.square().sum(), (x, conv.weight))
    torch.testing.assert_close(grads, reference_grads, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_small_transposed_convs_run_on_onednn_in_inference(layout):
    """Without gradients, a transposed conv PyTorch would run on ``slow_conv_transpose3d`` runs
    on oneDNN: the same outputs and layout. With gradients it stays on PyTorch's op."""
    torch.manual_seed(0)
    up = ConvTranspose3d(16, 32, 3, stride=2, padding=1, output_padding=1)  # 32 outputs: not the doubling kernel's
    x = torch.randn(1, 16, 8, 8, 8).contiguous(memory_format=layout)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = up(x)
    assert "aten::slow_conv_transpose3d" not in {event.name for event in prof.events()}
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, torch.nn.ConvTranspose3d.forward(up, x), atol=1e-5, rtol=1e-5)
    assert up(x).requires_grad


@pytest.mark.parametrize("out_channels", [8, 16])
def test_doubling_transposed_convs_run_on_the_up_kernel(out_channels):
    """LightMedSeg's x2 upsampling with 8 or 16 outputs, without gradients, on a channels_last_3d
    map: the doubling kernel (no PyTorch conv op at all), PyTorch's outputs and layout; in the
    contiguous format or with gradients, PyTorch's op."""
    torch.manual_seed(0)
    up = ConvTranspose3d(16, out_channels, 3, stride=2, padding=1, output_padding=1)
    x = torch.randn(1, 16, 5, 6, 13).contiguous(memory_format=CL)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = up(x, in_scale=torch.full((1, 16), 0.5))
    assert not {event.name for event in prof.events()} & {"aten::convolution", "aten::_convolution", "mkldnn::_convolution_transpose_pointwise"}
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, torch.nn.ConvTranspose3d.forward(up, x * 0.5), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not takes_up_kernel(up, x.contiguous(), [1, 1, 1])
    assert not takes_up_kernel(up, x, [1, 1, 1])  # gradients on: training keeps PyTorch's op


def _assert_runs_on_a_kernel(conv: Conv3d, x: torch.Tensor) -> None:
    """``conv`` on ``x`` with an ``in_scale``, without gradients: no PyTorch conv op at all, and
    PyTorch's outputs (of ``x`` scaled) in ``x``'s layout."""
    in_scale = torch.full((1, x.shape[1]), 0.5)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = conv(x, in_scale=in_scale)
    assert not {event.name for event in prof.events()} & {"aten::convolution", "aten::_convolution", "aten::mkldnn_convolution"}
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, torch.nn.Conv3d.forward(conv, x * 0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_channels, out_channels", [(4, 4), (4, 8), (8, 8)])
def test_halving_convs_run_on_the_down_kernel(in_channels, out_channels):
    """Stride-2 3x3x3 convs with at most 8 inputs and outputs (LightMedSeg's stem and anchor
    detector), without gradients, on a channels_last_3d map: the halving kernel (no PyTorch conv op
    at all) with ``in_scale``, PyTorch's outputs and layout; 16 outputs, the contiguous format or
    gradients: PyTorch's op."""
    torch.manual_seed(0)
    conv = Conv3d(in_channels, out_channels, 3, stride=2, padding=1)
    x = torch.randn(1, in_channels, 9, 8, 19).contiguous(memory_format=CL)
    _assert_runs_on_a_kernel(conv, x)
    with torch.no_grad():
        assert not takes_down_kernel(conv, x.contiguous())
        assert not takes_down_kernel(Conv3d(in_channels, 16, 3, stride=2, padding=1), x)
        assert not takes_down_kernel(Conv3d(in_channels, out_channels, 3, stride=1, padding=1), x)
    assert not takes_down_kernel(conv, x)  # gradients on: training keeps PyTorch's op


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_channels, out_channels", [(8, 4), (1, 2), (32, 3)])
def test_narrow_pointwise_convs_run_on_the_kernel(in_channels, out_channels, threads, monkeypatch):
    """1x1 convs with fewer than 8 outputs (LightMedSeg's head, the LSPM's, the decoder gate at 64^3),
    without gradients, on a channels_last_3d map: the 1x1 kernel (no PyTorch conv op) with
    ``in_scale``, PyTorch's outputs and layout, on one thread and two; 8 outputs, the contiguous
    format or gradients: PyTorch's op."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    conv = Conv3d(in_channels, out_channels, 1)
    x = torch.randn(1, in_channels, 5, 8, 19).contiguous(memory_format=CL)
    _assert_runs_on_a_kernel(conv, x)
    with torch.no_grad():
        assert takes_pointwise_kernel(conv, x.contiguous()) == (in_channels == 1)  # one channel: both layouts
        assert not takes_pointwise_kernel(Conv3d(in_channels, 8, 1), x)
    assert not takes_pointwise_kernel(conv, x)  # gradients on: training keeps PyTorch's op


@pytest.mark.parametrize("batch", [1, 2])
def test_pointwise_convs_on_one_thread_run_on_onednn(batch):
    """On one thread PyTorch runs every 1x1 conv of a batch under 16 on its own kernel (7-16x
    slower in channels_last_3d); the fast form sends it to oneDNN: same outputs and gradients."""
    torch.manual_seed(0)
    conv = Conv3d(32, 16, 1)
    x = torch.randn(batch, 32, 8, 8, 8).contiguous(memory_format=CL).requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert takes_slow_path(conv, x)
        with torch.profiler.profile() as prof:
            out = conv(x)
        assert "aten::mkldnn_convolution" in {event.name for event in prof.events()}
        reference = torch.nn.Conv3d.forward(conv, x)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
        reference_grads = torch.autograd.grad(reference.square().sum(), (x, conv.weight, conv.bias))
        torch.testing.assert_close(grads, reference_grads, atol=1e-4, rtol=1e-4)
        assert not takes_slow_path(conv, torch.randn(16, 32, 2, 2, 2))  # 16 samples: PyTorch's oneDNN
        torch.set_num_threads(2)
        assert takes_slow_path(conv, x) == (batch == 1)  # two threads: only the rule for one small sample (32 x 8 x 8)
    finally:
        torch.set_num_threads(threads)


def test_slow_path_rule_leaves_other_convs_to_pytorch():
    conv = Conv3d(8, 8, 3, padding=1)
    assert not takes_slow_path(conv, torch.randn(2, 8, 16, 16, 16))  # batches: PyTorch picks oneDNN itself
    assert not takes_slow_path(Conv3d(8, 8, 3, padding=1, groups=2), torch.randn(1, 8, 16, 16, 16))
    assert not takes_slow_path(conv, torch.randn(1, 8, 16, 16, 16, dtype=torch.float64))


def test_in_scale_refuses_a_batch_of_several():
    with pytest.raises(ValueError, match="batch of one"):
        scale_inputs(torch.ones(4, 6, 3, 3, 3), torch.ones(2, 6), groups=1)
