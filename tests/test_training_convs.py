"""The training path of depthwise 3D convs: PyTorch's gradients to float rounding, on the C kernel
and on its PyTorch fallback, and the module swap keeps parameters, state dict and outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.accel import native, training_convs
from lightseg.accel.training_convs import DepthwiseConv3dFunction, GroupSumFunction, use_training_convs


def _autograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, go: torch.Tensor, ours: bool):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    if ours:
        y = DepthwiseConv3dFunction.apply(x, weight, bias)
    else:
        y = F.conv3d(x, weight, bias, 1, weight.shape[-1] // 2, 1, x.shape[1])
    y.backward(go)
    return y, x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("channels, kernel, size, channels_last", [
    (16, 3, (8, 12, 10), True), (4, 3, (6, 6, 9), True), (13, 5, (7, 8, 6), True), (8, 5, (6, 7, 8), False),
])
def test_gradients_equal_autograd(channels: int, kernel: int, size: tuple[int, int, int], channels_last: bool) -> None:
    """float32 against PyTorch's own backward in float64; 13 channels reach the C kernel's 8-, 4- and
    single-channel loops."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, *size, generator=g)
    weight, bias = torch.randn(channels, 1, kernel, kernel, kernel, generator=g), torch.randn(channels, generator=g)
    go = torch.randn(2, channels, *size, generator=g)
    if channels_last:
        x, go = x.contiguous(memory_format=torch.channels_last_3d), go.contiguous(memory_format=torch.channels_last_3d)
    got = _autograd(x, weight, bias, go, ours=True)
    expected = _autograd(x.double(), weight.double(), bias.double(), go.double(), ours=False)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_gradcheck_float64() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(DepthwiseConv3dFunction.apply, (x, weight, bias))
    assert torch.autograd.gradcheck(DepthwiseConv3dFunction.apply, (x, weight, None))
    maps = torch.randn(1, 6, 3, 4, 2, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last_3d)
    for per_group in (2, 3, 6):
        assert torch.autograd.gradcheck(lambda m: GroupSumFunction.apply(m, per_group), (maps.requires_grad_(),))


def test_swap_keeps_parameters_state_and_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(8, 8, 5, padding=2, groups=8), nn.Conv3d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.Conv3d(8, 4, 3, padding=1, groups=4), nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 4, 3, stride=2, padding=1, groups=4),
    )
    reference = [type(m) for m in model]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    x = torch.randn(2, 8, 8, 8, 8)
    expected = model(x)
    use_training_convs(use_training_convs(model))
    assert [type(m).__mro__[2] for m in model[:3]] == reference[:3]  # swapped: the training class, the mixin, its own class
    # a dense conv and a strided one: oneDNN where PyTorch would take its own kernel, else as they were
    assert [type(m).__mro__[1:3] for m in model][3:] == [(training_convs._TrainingOnednn, nn.Conv3d)] * 2
    assert list(model.parameters()) == parameters and model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.allclose(model(x), expected, atol=1e-5)
    with torch.no_grad():  # no gradient recorded: the module's own forward
        assert torch.allclose(model(x), expected, atol=1e-5)
    calls = []
    original = DepthwiseConv3dFunction.apply
    try:  # every swapped conv takes the training path
        DepthwiseConv3dFunction.apply = lambda *a: calls.append(1) or original(*a)
        model[0](x), model[2](x), model[1](x)
    finally:
        DepthwiseConv3dFunction.apply = original
    assert len(calls) == 3
    x = x.contiguous(memory_format=torch.channels_last_3d)  # the group sum keeps the layout
    assert model[2](x).is_contiguous(memory_format=torch.channels_last_3d)


def test_without_a_compiler_the_pytorch_sums_give_the_same_gradients(tmp_path) -> None:
    """CC=/bin/false in a fresh process with an empty kernel cache: one warning, then PyTorch's sums."""
    code = (
        "import warnings, torch\n"
        "from lightseg.accel import native, training_convs as t\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert native.library() is None\n"
        "assert any('unavailable' in str(m.message) for m in w)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, go = torch.randn(2, 5, 6, 7, 8, generator=g), torch.randn(2, 5, 6, 7, 8, generator=g)\n"
        "torch.save(t.depthwise_weight_grad(x, go, 3), r'%s')\n" % (tmp_path / "fallback.pt")
    )
    env = {"CC": "/bin/false", "LIGHTSEG_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **env})
    g = torch.Generator().manual_seed(0)
    x, go = torch.randn(2, 5, 6, 7, 8, generator=g), torch.randn(2, 5, 6, 7, 8, generator=g)
    fallback = torch.load(tmp_path / "fallback.pt", weights_only=True)
    weight = torch.zeros(5, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    F.conv3d(x.double(), weight, None, 1, 1, 1, 5).backward(go.double())
    assert (fallback.double() - weight.grad).abs().max() <= 1e-5 * weight.grad.abs().max()
    if native.library() is not None:  # the C kernel agrees with the fallback
        assert torch.allclose(training_convs.depthwise_weight_grad(x, go, 3), fallback, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(native.library() is None, reason="the C kernels are not built on this machine")
@pytest.mark.parametrize("cin, cout, size", [(16, 4, (8, 12, 10)), (8, 8, (6, 5, 9)), (24, 4, (4, 7, 6))])
def test_dense_conv_gradients_equal_autograd(cin: int, cout: int, size: tuple[int, int, int]) -> None:
    """The few-output dense conv (a ghost conv's dense half) on channels_last_3d maps: every gradient
    from :class:`DenseConv3dFunction` in float32 against PyTorch's in float64."""
    g = torch.Generator().manual_seed(4)
    layout = torch.channels_last_3d
    x = torch.randn(2, cin, *size, generator=g).contiguous(memory_format=layout)
    weight, bias = torch.randn(cout, cin, 3, 3, 3, generator=g), torch.randn(cout, generator=g)
    go = torch.randn(2, cout, *size, generator=g).contiguous(memory_format=layout)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    training_convs.DenseConv3dFunction.apply(*leaves).backward(go)
    reference = [t.double().requires_grad_() for t in (x, weight, bias)]
    F.conv3d(reference[0], reference[1], reference[2], 1, 1).backward(go.double())
    for ours, expected in zip(leaves, reference):
        assert ours.grad.dtype == torch.float32
        assert (ours.grad.double() - expected.grad).abs().max() <= 1e-5 * expected.grad.abs().max()


def test_dense_swap_takes_only_few_output_convs_on_channels_last_maps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(16, 4, 3, padding=1, bias=False), nn.Conv3d(4, 16, 3, padding=1),
                          nn.Conv3d(16, 16, 3, padding=1), nn.Conv3d(16, 8, 1))
    use_training_convs(model)
    assert isinstance(model[0], training_convs._TrainingDense)
    assert not any(isinstance(m, training_convs._TrainingDense) for m in model[1:])  # Cin 4, Cout 16, a 1x1 conv
    calls = []
    original = training_convs.DenseConv3dFunction.apply
    try:
        training_convs.DenseConv3dFunction.apply = lambda *a: calls.append(1) or original(*a)
        x = torch.randn(1, 16, 6, 6, 6)
        model[0](x)  # contiguous: the conv's own path
        model[0](x.contiguous(memory_format=torch.channels_last_3d))
    finally:
        training_convs.DenseConv3dFunction.apply = original
    assert len(calls) == (native.library() is not None)


@pytest.mark.skipif(native.library() is None, reason="the C kernels are not built on this machine")
@pytest.mark.parametrize("channels", [8, 16])
def test_grouped_pairs_take_the_fused_kernel_with_autograds_gradients(channels: int) -> None:
    """A grouped conv with two inputs per group on a channels_last_3d map runs :class:`GroupedPairsFunction`;
    every gradient agrees with PyTorch's grouped conv in float64."""
    torch.manual_seed(5)
    conv = nn.Conv3d(channels, channels // 2, 3, padding=1, groups=channels // 2)
    reference = nn.Conv3d(channels, channels // 2, 3, padding=1, groups=channels // 2).double()
    reference.load_state_dict(conv.state_dict())
    use_training_convs(conv)
    x = torch.randn(2, channels, 6, 7, 5).contiguous(memory_format=torch.channels_last_3d)
    go = torch.randn(2, channels // 2, 6, 7, 5).contiguous(memory_format=torch.channels_last_3d)
    calls = []
    original = training_convs.GroupedPairsFunction.apply
    try:
        training_convs.GroupedPairsFunction.apply = lambda *a: calls.append(1) or original(*a)
        ours = x.clone().requires_grad_()
        conv(ours).backward(go)
    finally:
        training_convs.GroupedPairsFunction.apply = original
    assert calls == [1]
    expected = x.double().requires_grad_()
    reference(expected).backward(go.double())
    for got, want in ((ours.grad, expected.grad), (conv.weight.grad, reference.weight.grad), (conv.bias.grad, reference.bias.grad)):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_other_convs_train_on_onednn_where_pytorch_would_not() -> None:
    """On one thread a 1x1 conv of a batch under 16 trains on oneDNN with PyTorch's gradients; a
    conv subclass with a forward of its own keeps it."""

    class Scaled(nn.Conv3d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(16, 8, 1), Scaled(8, 8, 1))
    plain = nn.Sequential(nn.Conv3d(16, 8, 1), Scaled(8, 8, 1))
    plain.load_state_dict(model.state_dict())
    use_training_convs(model)
    assert type(model[0]) is not nn.Conv3d and type(model[1]) is Scaled
    x = torch.randn(2, 16, 6, 6, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile() as prof:
            out = model(x)
        assert "aten::mkldnn_convolution" in {event.name for event in prof.events()}
        reference = plain(x)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out.square().sum(), (x, *model.parameters()))
        reference_grads = torch.autograd.grad(reference.square().sum(), (x, *plain.parameters()))
        torch.testing.assert_close(grads, reference_grads, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_a_dense_conv_whose_weight_no_longer_fits_takes_pytorchs_path() -> None:
    """Channel pruning shrinks a conv's weight in place; the kernel's rule reads the weight, so a
    16 -> 6 conv that was 16 -> 8 when swapped runs PyTorch's backward, and a direct call is refused."""
    conv = use_training_convs(nn.Conv3d(16, 8, 3, padding=1, bias=False))
    assert isinstance(conv, training_convs._TrainingDense)
    conv.weight = nn.Parameter(conv.weight.detach()[:6].clone())
    x = torch.randn(1, 16, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    conv(x).sum().backward()
    expected = F.conv3d(x.detach().double(), conv.weight.detach().double(), None, 1, 1)
    assert torch.allclose(conv(x).double(), expected, atol=1e-4) and conv.weight.grad.shape == (6, 16, 3, 3, 3)
    with pytest.raises(ValueError, match="Cin a multiple of 8"):
        training_convs.dense_weight_grad(x.detach(), torch.randn(1, 6, 5, 6, 7), 3)


@pytest.mark.parametrize("times, layout", [(2, torch.channels_last_3d), (3, torch.contiguous_format)])
def test_repeat_channels_repeats_each_channel_in_a_row(times: int, layout: torch.memory_format) -> None:
    grad = torch.randn(2, 5, 6, 7, 8).contiguous(memory_format=layout)
    out = training_convs.repeat_channels(grad, times)
    assert out.shape == (2, 5 * times, 6, 7, 8) and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out, grad.repeat_interleave(times, dim=1))

