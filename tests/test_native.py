"""The fused CPU kernels: built from source on first use, the same results as the PyTorch ops they
stand in for, a silent PyTorch path wherever they do not apply, and a warned one wherever they
cannot be built (no compiler, a failing compiler, a CPU without the needed extensions)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightseg.accel import accelerate, native, native_library
from lightseg.accel.layers import (
    AccurateGroupNorm, FastConv3d, GroupSumConv3d, gated_silu_sum, norm_silu, takes_narrow_kernel,
)
from lightseg.accel.lightmedseg import decoder_input
from lightseg.models import create_model

CL = torch.channels_last_3d
pytestmark = pytest.mark.skipif(native_library.compiler_command() is None, reason="no C compiler")


def _maps(*shape: int, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape) * 3 + offset).contiguous(memory_format=CL)


def test_kernels_build_and_load():
    assert native.library() is not None


def test_loading_the_kernels_keeps_subnormal_floats_in_a_fresh_process():
    """Loading them must not switch the process to flush-to-zero (what -ffast-math's crtfastmath
    does): NumPy in the user's own code, and the readers' checks, must see subnormals as before."""
    code = ("import numpy as np; from lightseg.accel import native; assert native.library() is not None; "
            "print(np.float32(1e-45) * np.float32(1) > 0, np.nextafter(np.float64(0), 1) > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]


def test_channel_sums_are_float64_accurate():
    """Per-sample channel sums of a channels_last map far from zero mean, against float64."""
    torch.manual_seed(0)
    x = _maps(2, 8, 40, 48, 56, offset=10.0)
    total, squares = native.channel_sums(x)
    assert total.dtype == torch.float64 and total.shape == (2, 8)
    torch.testing.assert_close(total, x.double().sum(dim=(2, 3, 4)), rtol=1e-7, atol=0)
    torch.testing.assert_close(squares, x.double().square().sum(dim=(2, 3, 4)), rtol=1e-7, atol=0)


def test_affine_silu_is_the_affine_then_silu():
    torch.manual_seed(0)
    x = _maps(2, 8, 20, 24, 28)
    scale, shift = torch.rand(2, 8) + 0.5, torch.randn(2, 8)
    reference = F.silu(x * scale[..., None, None, None] + shift[..., None, None, None])
    out = native.affine_silu_(x, scale, shift)
    assert out.data_ptr() == x.data_ptr()  # in place
    torch.testing.assert_close(out, reference, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("c", [8, 16, 5])
def test_gated_silu_sum_matches_pytorch(c):
    """The fused gate against softmax, affine, SiLU, weighted sum and mean in PyTorch, including
    logits large enough to overflow a naive exponential: the channel counts the kernel has its own
    forms for (8, 16) and any other."""
    torch.manual_seed(0)
    logits = _maps(2, 3, 16, 20, 23) * 30
    branches = [_maps(2, c, 16, 20, 23) for _ in range(3)]
    scales = [torch.rand(2, c) + 0.5 for _ in range(3)]
    shifts = [torch.randn(2, c) for _ in range(3)]
    weights = torch.softmax(logits, 1)
    reference = sum(
        weights[:, k : k + 1] * F.silu(b * s[..., None, None, None] + h[..., None, None, None])
        for k, (b, s, h) in enumerate(zip(branches, scales, shifts))
    )
    y, means = native.gated_silu_sum3(logits, branches, scales, shifts)
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, reference, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(means, reference.mean(dim=(2, 3, 4)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("out_channels, batch", [(4, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("biased", [True, False])
def test_decoder_input_matches_pytorch(half, biased, out_channels, batch, monkeypatch):
    """The upsampling (in the same pass where it runs on the doubling kernel: 8 outputs), position
    bias, x2 trilinear resize (PyTorch's align_corners=False edges included), concatenation and
    channel means, against the PyTorch ops on a non-cubic map; a batch of one folds a scale into
    the upsampling."""
    torch.manual_seed(0)
    up = accelerate(torch.nn.ConvTranspose3d(6, out_channels, 3, stride=2, padding=1, output_padding=1))
    x = _maps(batch, 6, 5, 6, 7)
    skip = _maps(batch, 6, 5, 6, 7) if half else _maps(batch, 6, 10, 12, 14)
    position = torch.nn.Conv3d(8, out_channels, 1) if biased else None
    anchors = torch.rand(batch, 8, 3) if biased else None
    in_scale = torch.rand(1, 6) + 0.5 if batch == 1 else None
    with torch.inference_mode():
        fused, fused_means = decoder_input(up, x, in_scale, skip, position, anchors)
        monkeypatch.setattr(native, "applies", lambda *maps: False)
        plain, plain_means = decoder_input(up, x, in_scale, skip, position, anchors)
    assert fused.is_contiguous(memory_format=CL)
    torch.testing.assert_close(fused, plain, atol=2e-5, rtol=2e-6)
    torch.testing.assert_close(fused_means, plain_means, atol=1e-6, rtol=1e-6)


def test_decoder_input_with_a_skip_neither_same_nor_half_takes_pytorch():
    """A skip at half size along some axes only is resized by PyTorch, not refused."""
    torch.manual_seed(0)
    up = accelerate(torch.nn.ConvTranspose3d(4, 8, 3, stride=2, padding=1, output_padding=1))
    x, skip = _maps(1, 4, 4, 4, 4), _maps(1, 4, 4, 8, 8)
    with torch.inference_mode():
        f, _ = decoder_input(up, x, None, skip, None, None)
    torch.testing.assert_close(f[:, 8:], F.interpolate(skip, size=(8, 8, 8), mode="trilinear", align_corners=False))


@pytest.mark.parametrize("outputs", [4, 8])
@pytest.mark.parametrize(
    "shape, bias",
    [((2, 16, 20, 24, 29), True), ((1, 3, 5, 7, 13), False), ((1, 1, 1, 1, 1), True), ((1, 8, 3, 2, 12), True),
     ((1, 12, 3, 4, 17), False), ((1, 9, 3, 2, 150), True)],
)
def test_narrow_conv_matches_pytorch(shape, bias, outputs):
    """The narrow conv (4 or 8 outputs, whether or not this CPU's build takes 8 in models) and two
    1x1 convs riding along (5 and 3 outputs, so a group of lanes spans both for 4 outputs) against
    PyTorch's, in float64: widths that are and are not whole register blocks, rows of several blocks
    and a partial one (150), single voxels and planes, one input channel, channels transposed in
    8x8 blocks, one at a time and both (12 and 9), with and without bias."""
    torch.manual_seed(0)
    x = _maps(*shape)
    c = shape[1]
    weight, b = torch.randn(outputs, c, 3, 3, 3), torch.randn(outputs) if bias else None
    sides = [(torch.randn(5, c, 1, 1, 1), torch.randn(5) if bias else None), (torch.randn(3, c, 1, 1, 1), torch.randn(3))]

    def reference(w: torch.Tensor, b: torch.Tensor | None, padding: int) -> torch.Tensor:
        return F.conv3d(x.double(), w.double(), None if b is None else b.double(), padding=padding)

    y, outs = native.conv3x3x3_narrow(x, weight, b, sides, moments=True)
    alone, none = native.conv3x3x3_narrow(x, weight, b)
    assert none == [] and y.shape == (shape[0], outputs, *shape[2:]) and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), reference(weight, b, 1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(alone, y, atol=0, rtol=0)
    assert native.take_moments(y) is None and native.take_moments(outs[1]) is None  # the first side's only
    for out, (w, sb) in zip(outs, sides):
        assert out.shape == (shape[0], len(w), *shape[2:]) and out.is_contiguous(memory_format=CL)
        torch.testing.assert_close(out.double(), reference(w, sb, 0), atol=1e-5, rtol=1e-5)
    _assert_moments_recorded(outs[0])


def _assert_moments_recorded(y: torch.Tensor) -> None:
    """The kernel's recorded channel sums and sums of squares are y's, to float64 accuracy, and
    are handed out once."""
    recorded = native.take_moments(y)
    assert recorded is not None
    exact = y.double()
    torch.testing.assert_close(recorded[0], exact.sum(dim=(2, 3, 4)), rtol=1e-6, atol=1e-6 * y[0, 0].numel())
    torch.testing.assert_close(recorded[1], exact.square().sum(dim=(2, 3, 4)), rtol=1e-6, atol=1e-6)
    assert native.take_moments(y) is None


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 9, 10, 35), (1, 4, 3, 2, 16), (1, 4, 1, 1, 1), (1, 4, 2, 3, 2), (1, 4, 20, 30, 33), (2, 8, 3, 4, 11),
     (1, 16, 2, 3, 5), (1, 32, 3, 2, 3), (1, 8, 1, 1, 1)],
)
def test_ghost_expand_matches_pytorch(shape):
    """The ghost conv's two halves in one pass against the concatenation of the primary half and
    its depthwise conv: 4 to 32 channels, widths below, at and beyond a register block, odd and
    even, single voxels."""
    torch.manual_seed(0)
    c = shape[1]
    primary, weight = _maps(*shape), torch.randn(c, 1, 3, 3, 3)
    reference = torch.cat([primary, F.conv3d(primary.double(), weight.double(), padding=1, groups=c).float()], 1)
    g = native.ghost_expand(primary, weight)
    assert g.is_contiguous(memory_format=CL)
    torch.testing.assert_close(g, reference, atol=1e-5, rtol=1e-5)
    _assert_moments_recorded(g)


@pytest.mark.parametrize(
    "shape, bias",
    [((2, 16, 9, 10, 11), True), ((1, 8, 3, 2, 17), False), ((1, 32, 4, 5, 6), True), ((1, 64, 1, 2, 3), True),
     ((1, 16, 24, 30, 31), True)],
)
def test_grouped_pairs_match_pytorch(shape, bias):
    """The grouped conv with two inputs per group against PyTorch's grouped conv in float64: every
    channel count the kernel takes, rows shorter and longer than a register block."""
    torch.manual_seed(0)
    x, c = _maps(*shape), shape[1]
    weight, b = torch.randn(c // 2, 2, 3, 3, 3), torch.randn(c // 2) if bias else None
    reference = F.conv3d(x.double(), weight.double(), None if b is None else b.double(), padding=1, groups=c // 2)
    y = native.grouped_pairs3(x, weight.reshape(c, 1, 3, 3, 3), b)
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), reference, atol=1e-4, rtol=1e-5)
    _assert_moments_recorded(y)


@pytest.mark.parametrize(
    "shape, out_channels, bias",
    [((2, 16, 5, 6, 13), 8, True), ((1, 3, 1, 1, 1), 16, False), ((1, 32, 4, 3, 7), 16, True), ((1, 5, 2, 1, 6), 24, True)],
)
def test_up_conv_x2_matches_pytorch(shape, out_channels, bias):
    """The doubling transposed conv against PyTorch's in float64: rows that are and are not whole
    register blocks, single voxels, several 8-channel output chunks, with and without bias."""
    torch.manual_seed(0)
    x = _maps(*shape)
    weight, b = torch.randn(shape[1], out_channels, 3, 3, 3), torch.randn(out_channels) if bias else None
    reference = F.conv_transpose3d(x.double(), weight.double(), None if b is None else b.double(), 2, 1, 1)
    y = native.up_conv_x2(x, weight, b)
    assert y.shape == reference.shape and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), reference, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="8k"):
        native.up_conv_x2(x, torch.randn(shape[1], 4, 3, 3, 3), None)


@pytest.mark.parametrize(
    "shape, out_channels, bias",
    [((2, 4, 9, 10, 17), 8, True), ((1, 1, 1, 1, 1), 3, False), ((1, 8, 6, 5, 32), 4, True), ((1, 3, 4, 7, 40), 8, False),
     ((2, 2, 3, 5, 19), 2, True), ((1, 4, 1, 1, 1), 4, False)],
)
def test_down_conv_x2_matches_pytorch(shape, out_channels, bias):
    """The halving conv against PyTorch's in float64: odd and even sizes (an odd row's last output
    has no right neighbour), rows of whole register blocks and rows with a rest, a single voxel,
    a batch of two, fewer than 8 outputs, with and without bias; at most 4 outputs from an even
    number of inputs take input channels in pairs."""
    torch.manual_seed(0)
    x = _maps(*shape)
    weight, b = torch.randn(out_channels, shape[1], 3, 3, 3), torch.randn(out_channels) if bias else None
    reference = F.conv3d(x.double(), weight.double(), None if b is None else b.double(), stride=2, padding=1)
    y = native.down_conv_x2(x, weight, b)
    assert y.shape == reference.shape and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), reference, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="1..8"):
        native.down_conv_x2(x, torch.randn(9, shape[1], 3, 3, 3), None)


@pytest.mark.parametrize("shape, out_channels, bias", [((2, 8, 5, 6, 7), 4, True), ((1, 1, 3, 1, 9), 2, False), ((1, 32, 2, 3, 5), 8, True), ((1, 5, 1, 1, 1), 7, True)])
def test_pointwise_conv_matches_pytorch(shape, out_channels, bias):
    """The 1x1 conv against PyTorch's in float64: voxel counts that are and are not whole register
    blocks, a single voxel, a batch of two, 1 to 8 outputs, with and without bias."""
    torch.manual_seed(0)
    x = _maps(*shape)
    weight, b = torch.randn(out_channels, shape[1], 1, 1, 1), torch.randn(out_channels) if bias else None
    reference = F.conv3d(x.double(), weight.double(), None if b is None else b.double())
    y = native.pointwise_conv(x, weight, b)
    assert y.shape == reference.shape and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), reference, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="1..8"):
        native.pointwise_conv(x, torch.randn(9, shape[1], 1, 1, 1), None)


@pytest.mark.parametrize("groups, affine", [(4, True), (8, False), (1, True)])
def test_group_scale_shift_matches_the_tensor_ops(groups, affine, monkeypatch):
    """A group norm's per-channel scale and shift from one kernel call equal those the tensor ops
    compute from the same sums (batch of two, groups of one, two and eight channels, with and
    without an affine), and the normalised map matches PyTorch's group norm."""
    torch.manual_seed(0)
    norm = accelerate(torch.nn.GroupNorm(groups, 8, affine=affine))
    if affine:
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = _maps(2, 8, 5, 6, 7, offset=3.0)
    with torch.inference_mode():
        scale, shift = norm.scale_shift(x)
        monkeypatch.setattr(native, "applies", lambda *maps: False)
        expected = norm.scale_shift(x)
        affine_terms = [None if p is None else p.double() for p in (norm.weight, norm.bias)]
        reference = F.group_norm(x.double(), groups, *affine_terms)
    assert scale.dtype == shift.dtype == torch.float32
    torch.testing.assert_close((scale, shift), expected, atol=1e-6, rtol=1e-6)
    normalised = x * scale[:, :, None, None, None] + shift[:, :, None, None, None]
    torch.testing.assert_close(normalised, reference.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [8, 5])
def test_texture_blend_matches_pytorch(channels):
    """Eq. (9)'s blend and its channel means in one pass against the PyTorch ops, batch of two,
    a channel count that fills vectors and one that does not, voxels past a whole block."""
    torch.manual_seed(0)
    smooth, detail = _maps(2, channels, 5, 6, 7), _maps(2, channels, 5, 6, 7)
    texture = torch.rand(2, 1, 5, 6, 7)
    z, means = native.texture_blend(smooth, detail, texture)
    reference = smooth.double() + texture.double() * (detail.double() - smooth.double())
    assert z.is_contiguous(memory_format=CL)
    torch.testing.assert_close(z.double(), reference, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(means.double(), reference.mean(dim=(2, 3, 4)), atol=1e-5, rtol=1e-6)


def test_norms_use_recorded_moments_once_and_not_after_an_in_place_change(monkeypatch):
    """A norm reading a map whose kernel recorded its moments skips its own statistics pass and
    gives the same output; a map changed in place since is summed anew."""
    torch.manual_seed(0)
    norm = AccurateGroupNorm(4, 8).eval()
    x = _maps(1, 16, 9, 10, 11)
    weight = torch.randn(16, 1, 3, 3, 3)
    with torch.no_grad():
        expected = norm(native.grouped_pairs3(x, weight, None, moments=False))
        y = native.grouped_pairs3(x, weight, None)
        assert native.take_moments(y.clone(memory_format=torch.preserve_format)) is None  # a copy carries none
        summed = native.channel_sums
        monkeypatch.setattr(native, "channel_sums", lambda t: pytest.fail("summed again"))
        torch.testing.assert_close(norm(y), expected, atol=1e-6, rtol=1e-6)
        monkeypatch.setattr(native, "channel_sums", summed)
        y = native.grouped_pairs3(x, weight, None)
        y.mul_(2.0)
        torch.testing.assert_close(norm(y), expected, atol=1e-5, rtol=1e-5)  # scale-free: stats of the new y


def _group_sum(in_channels: int, groups: int, stride: int = 1) -> GroupSumConv3d:
    return GroupSumConv3d(in_channels, groups, 3, stride=stride, padding=1, groups=groups)


def test_group_sum_conv_takes_the_group_kernels_only_where_they_fit():
    """Two inputs per group: the pair kernel; one group: the sum kernel; other groupings, strides,
    widths, layouts or gradients: PyTorch's ops. Outputs as PyTorch's grouped conv."""
    x16, x128 = _maps(1, 16, 6, 6, 7), _maps(1, 128, 4, 4, 4)
    pairs, fours, wide, one = _group_sum(16, 8), _group_sum(16, 4), _group_sum(128, 64), _group_sum(16, 1)
    with torch.inference_mode():
        assert pairs.takes_pair_kernel(x16) and not pairs.takes_sum_kernel(x16)
        assert one.takes_sum_kernel(x16) and not one.takes_pair_kernel(x16)
        assert not fours.takes_pair_kernel(x16) and not fours.takes_sum_kernel(x16) and not wide.takes_pair_kernel(x128)
        assert not _group_sum(16, 8, stride=2).takes_pair_kernel(x16) and not _group_sum(16, 1, stride=2).takes_sum_kernel(x16)
        assert not pairs.takes_pair_kernel(x16.contiguous()) and not one.takes_sum_kernel(x16.contiguous())
        for conv, groups in ((pairs, 8), (one, 1)):
            expected = F.conv3d(x16, conv.weight, conv.bias, padding=1, groups=groups)
            torch.testing.assert_close(conv(x16), expected, atol=1e-5, rtol=1e-5)
    assert not pairs.takes_pair_kernel(x16) and not one.takes_sum_kernel(x16)  # gradients on: PyTorch's ops


@pytest.mark.parametrize("shape, bias", [((2, 16, 5, 6, 13), True), ((1, 8, 1, 1, 1), False), ((1, 32, 3, 4, 7), True), ((1, 64, 2, 3, 5), True)])
def test_grouped_sum3_matches_pytorch(shape, bias):
    """The one-output conv against PyTorch's in float64: 8 to 64 inputs, rows that are and are not
    whole blocks, a single voxel, a batch of two, with and without bias."""
    torch.manual_seed(0)
    x, c = _maps(*shape), shape[1]
    weight, b = torch.randn(1, c, 3, 3, 3), torch.randn(1) if bias else None
    reference = F.conv3d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    y = native.grouped_sum3(x, weight.reshape(c, 1, 3, 3, 3), b)
    assert y.shape == reference.shape and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), reference, atol=1e-4, rtol=1e-5)


def test_conv3d_takes_the_narrow_kernel_only_where_it_fits():
    """4 outputs always; 8 only where the build has 16-float vectors (AVX-512), where oneDNN's
    output blocks are 16 wide; never 16, strided, unpadded or grouped convs."""
    x = _maps(1, 8, 8, 8, 8)
    fits, eight_out, strided = FastConv3d(8, 4, 3, padding=1), FastConv3d(8, 8, 3, padding=1), FastConv3d(8, 4, 3, 2, padding=1)
    unpadded, grouped, wide = FastConv3d(8, 4, 3), FastConv3d(8, 4, 3, padding=1, groups=4), FastConv3d(8, 16, 3, padding=1)
    avx512 = native.library().narrow_floats() == 16
    assert native.narrow_outputs() == ((4, 8) if avx512 else (4,))
    with torch.inference_mode():
        assert takes_narrow_kernel(fits, x) and takes_narrow_kernel(eight_out, x) == avx512
        assert not any(takes_narrow_kernel(c, x) for c in (strided, unpadded, grouped, wide))
        assert not takes_narrow_kernel(fits, x.contiguous())
        for conv in (fits, eight_out):
            torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias, padding=1), atol=1e-5, rtol=1e-5)
    assert not takes_narrow_kernel(fits, x)  # gradients on: training takes PyTorch's conv


def test_norm_blocks_agree_with_and_without_kernels(monkeypatch):
    """``norm_silu`` and ``gated_silu_sum`` give PyTorch's results whichever path they take."""
    torch.manual_seed(0)
    norms = [AccurateGroupNorm(4, 8) for _ in range(3)]
    for norm in norms:
        torch.nn.init.uniform_(norm.weight, 0.5, 2.0)
        torch.nn.init.uniform_(norm.bias, -1.0, 1.0)
    logits, maps = _maps(1, 3, 24, 24, 24), [_maps(1, 8, 24, 24, 24, offset=4.0) for _ in range(3)]
    with torch.inference_mode():
        fused = norm_silu(maps[0].clone(), norms[0]), gated_silu_sum(logits, [(m.clone(), n) for m, n in zip(maps, norms)])
        monkeypatch.setattr(native, "applies", lambda *maps: False)
        plain = norm_silu(maps[0].clone(), norms[0]), gated_silu_sum(logits, [(m.clone(), n) for m, n in zip(maps, norms)])
    torch.testing.assert_close(fused, plain, atol=2e-6, rtol=2e-6)


def test_kernels_apply_to_channels_last_inference_only():
    x = _maps(1, 8, 8, 8, 8)
    with torch.inference_mode():
        assert native.applies(x)
        assert not native.applies(x.contiguous())  # contiguous layout
        assert not native.applies(x.double())
    assert not native.applies(x)  # gradients on: training takes PyTorch's ops


def test_lightmedseg_forward_is_the_same_with_and_without_kernels(monkeypatch):
    torch.manual_seed(0)
    model = accelerate(create_model("lightmedseg", 4, 3).eval()).to(memory_format=CL)
    x = torch.randn(1, 4, 32, 32, 32).contiguous(memory_format=CL)
    with torch.inference_mode():
        fused = model(x)
        monkeypatch.setattr(native, "applies", lambda *maps: False)
        plain = model(x)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def _load_in_subprocess(tmp_path, **env: str) -> subprocess.CompletedProcess:
    code = "import warnings; warnings.simplefilter('always'); from lightseg.accel import native; print(native.library() is not None)"
    environment = {**os.environ, "LIGHTSEG_CACHE": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)


def test_build_lands_in_the_cache_and_is_reused(tmp_path):
    first = _load_in_subprocess(tmp_path)
    built = list((tmp_path / "native").glob("kernels-*.so"))
    assert first.stdout.strip() == "True" and len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _load_in_subprocess(tmp_path).stdout.strip() == "True"
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert not [p for p in (tmp_path / "native").iterdir() if p.suffix != ".so"]  # no half-written leftovers


def test_off_switch_missing_and_failing_compiler(tmp_path):
    """Off switches are silent; a missing compiler or one that fails (``CC=/bin/false``) warns once
    and leaves PyTorch's ops, never an error."""
    assert _load_in_subprocess(tmp_path, LIGHTSEG_NATIVE="0").stdout.strip() == "False"
    for value in ("0", "off", "False", " no "):
        off = _load_in_subprocess(tmp_path, LIGHTSEG_ACCEL=value)
        assert off.stdout.strip() == "False" and not off.stderr, value
    missing = _load_in_subprocess(tmp_path, CC="no-such-compiler")
    assert missing.stdout.strip() == "False" and "no C compiler 'no-such-compiler'" in missing.stderr
    failing = _load_in_subprocess(tmp_path, CC="/bin/false")  # a "compiler" that always fails
    assert failing.stdout.strip() == "False"
    assert failing.stderr.count("RuntimeWarning: lightseg: fused CPU kernels unavailable") == 1


def test_a_compiler_with_a_launcher_or_flags_builds(tmp_path):
    """``CC`` as build systems take it: a launcher (``env cc``, like ``ccache gcc``) or extra flags."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CC", "env cc -Wall")
        assert native_library.compiler_command() == [shutil.which("env"), "cc", "-Wall"]
    loaded = _load_in_subprocess(tmp_path, CC="env cc -Wall")
    assert loaded.stdout.strip() == "True" and "unavailable" not in loaded.stderr
    assert len(list((tmp_path / "native").glob("kernels-*.so"))) == 1
    unparsable = _load_in_subprocess(tmp_path, CC='cc "-O2')  # an unclosed quote: no compiler, PyTorch's ops
    assert unparsable.stdout.strip() == "False" and "no C compiler" in unparsable.stderr


@pytest.mark.parametrize("cache", ["a file", "read-only", "under a file"])
def test_an_unwritable_cache_gets_pytorchs_ops_and_advice(tmp_path, cache):
    """A kernel cache that is a file, read-only or below a file: one warning naming the folder and
    LIGHTSEG_CACHE, and PyTorch's ops."""
    root = tmp_path / "cache"
    if cache == "read-only":
        (root / "native").mkdir(parents=True)
        (root / "native").chmod(0o555)
    else:
        root.write_text("not a folder")
        root = root / "below" if cache == "under a file" else root
    if cache == "read-only" and os.access(root / "native", os.W_OK):
        pytest.skip("running as a user who may write anywhere (root)")
    result = _load_in_subprocess(root)
    assert result.stdout.strip() == "False"
    assert result.stderr.count("RuntimeWarning: lightseg: fused CPU kernels unavailable") == 1
    assert "cannot write the kernel cache" in result.stderr and "set LIGHTSEG_CACHE to a writable folder" in result.stderr


def test_a_compiler_for_llvms_openmp_gets_advice_to_use_gcc(tmp_path):
    """clang's -fopenmp builds a library calling LLVM's OpenMP runtime (``__kmpc_*``), which does not
    load beside PyTorch's GNU one: one warning naming the fix, and PyTorch's ops. The "compiler"
    here is GCC plus one such call, so the test needs no clang."""
    probe = tmp_path / "probe.c"
    probe.write_text("extern int __kmpc_global_thread_num(void *);\nint lightseg_probe(void) { return __kmpc_global_thread_num(0); }\n")
    compiler = tmp_path / "llvm-openmp-cc"
    compiler.write_text(f'#!/bin/sh\nexec {shutil.which("cc")} "$@" {probe}\n')
    compiler.chmod(0o755)
    result = _load_in_subprocess(tmp_path, CC=str(compiler))
    assert result.stdout.strip() == "False"
    assert result.stderr.count("RuntimeWarning: lightseg: fused CPU kernels unavailable") == 1
    assert "set CC=gcc" in result.stderr and "__kmpc_global_thread_num" in result.stderr


def test_a_cpu_without_avx2_gets_pytorchs_ops_with_one_warning(monkeypatch):
    """A CPU whose flags lack AVX2 / FMA (a fake ``/proc/cpuinfo`` line): no build, one warning,
    and an accelerated LightMedSeg that still runs, on PyTorch's ops, with the plain model's output."""
    monkeypatch.setattr(native_library, "_cpu_features", lambda: "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx")
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="lacks avx2, fma") as caught:
            assert native.library() is None
            assert native.library() is None  # cached: the warning is given once
        assert len(caught) == 1
        torch.manual_seed(0)
        plain = create_model("lightmedseg", 1, 2).eval()
        fast = accelerate(create_model("lightmedseg", 1, 2).eval())
        fast.load_state_dict(plain.state_dict())
        x = torch.randn(1, 1, 32, 32, 32)
        with torch.inference_mode():
            assert not native.applies(x.contiguous(memory_format=CL))
            out = fast.to(memory_format=CL)(x.contiguous(memory_format=CL))
            torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-5)
    finally:
        native.library.cache_clear()


def test_required_features_are_read_from_the_flags_line(monkeypatch):
    monkeypatch.setattr(native_library.platform, "machine", lambda: "x86_64")
    assert native_library.missing_features("flags\t: fpu avx avx2 fma bmi2") == []
    assert native_library.missing_features("flags\t: fpu avx fma4") == ["avx2", "fma"]
    monkeypatch.setattr(native_library.platform, "machine", lambda: "aarch64")  # measured on x86 only
    assert native_library.missing_features("Features\t: fp asimd avx2 fma") == ["avx2", "fma"]


def test_bindings_check_every_argument():
    """The declared kinds catch a wrong dtype, a missing tensor or a wrong count before C sees them."""
    x = _maps(1, 8, 4, 4, 4)
    sums = torch.zeros(2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        native.call("channel_dot_sums", x[0], x[0], 8, 64, sums[0].float(), sums[1])
    with pytest.raises(TypeError, match="float32"):
        native.call("channel_dot_sums", x[0], None, 8, 64, sums[0], sums[1])
    with pytest.raises(TypeError, match="6 arguments"):
        native.call("channel_dot_sums", x[0], x[0], 8, 64, sums[0])
    native.call("channel_dot_sums", x[0], x[0], 8, 64, sums[0], sums[1])
    torch.testing.assert_close(sums[0], x[0].double().sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif("avx512f" not in native_library._cpu_features(), reason="the AVX2 build is this CPU's own, tested above")
def test_the_avx2_build_matches_pytorch_on_an_avx512_cpu(tmp_path):
    """The narrow conv has an AVX-512 form (16-float vectors) and an AVX2 one (8), and every other
    kernel is compiled for the CPU at hand; on an AVX-512 CPU the tests check the first, so the
    AVX2 build (a compiler wrapper adding ``-mno-avx512f``) is checked here in a fresh process by
    the narrow conv's tests and by tests/test_accel.py (every accelerated module against the plain
    one), as an AVX2-only CPU (AMD EPYC before Zen 4, older Xeons) runs them."""
    compiler = tmp_path / "avx2-cc"
    compiler.write_text(f'#!/bin/sh\nexec {shutil.which("cc")} "$@" -mno-avx512f\n')
    compiler.chmod(0o755)
    environment = {**os.environ, "LIGHTSEG_CACHE": str(tmp_path), "CC": str(compiler)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          str(Path(__file__).with_name("test_accel.py")), "-k",
                          "test_accel.py or ((kernels_build_and_load or narrow_conv_matches_pytorch or narrow_kernel_only) "
                          "and not avx2)"], env=environment, capture_output=True, text=True)
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]
    assert len(list((tmp_path / "native").glob("kernels-*.so"))) == 1  # built by the wrapper, not taken from the cache
