"""Fast CPU stand-ins for PyTorch's conv and group-norm layers, swapped in by :func:`lightseg.accel.accelerate`.

Each class subclasses the plain layer it replaces and changes only ``forward``: same parameters,
state dict and function (to float rounding; tests/test_accel.py). They keep a
``channels_last_3d`` input's layout, route convs to oneDNN where PyTorch would pick a slower
kernel, keep group-norm statistics accurate in ``channels_last_3d``, run the fused C kernels of
:mod:`lightseg.accel.native` where they apply, and take ``in_scale``: a per-input-channel scale
(``(1, C_in)``) folded into the weights instead of multiplied into the map (:func:`folds_scales`).
Measurements behind each choice: docs/models.md ("CPU accelerator").
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.accel import native


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 5-D map strictly in ``channels_last_3d`` (a one-channel map is both layouts)."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def keep_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``channels_last_3d`` when ``x`` is strictly in that layout
    (:func:`is_channels_last`); otherwise ``y`` unchanged.

    Why: for a batch of one, PyTorch runs small dense convs (channels x depth x height at most
    20,480) on its own kernels, which return contiguous tensors whatever the input's layout. One
    such tensor turns every later elementwise op on mixed layouts into a strided, slower one and
    makes oneDNN reorder the next conv's input (LightMedSeg's skip router at 32^3: docs/models.md).
    """
    layout = torch.channels_last_3d
    if is_channels_last(x) and not y.is_contiguous(memory_format=layout):
        return y.contiguous(memory_format=layout)
    return y


def folds_scales(x: torch.Tensor) -> bool:
    """Whether a channel scale meant for ``x`` is folded into the next conv's weights
    (``in_scale``) instead of multiplied into ``x``: for a batch of one.

    Why: multiplying a 16x128^3 map by its squeeze-excitation scale is a full pass over 128 MB
    (about 25 ms on 2 cores); scaling the next conv's few hundred weights costs nothing, and the
    outputs are the same to float rounding (docs/models.md).
    """
    return x.shape[0] == 1


def scale_inputs(weight: torch.Tensor, in_scale: torch.Tensor, groups: int, transposed: bool = False) -> torch.Tensor:
    """A conv's ``weight`` with every input channel's slice multiplied by ``in_scale`` (``(1, C_in)``),
    so that the conv of ``x`` equals the conv of ``x * in_scale`` (:func:`folds_scales`)."""
    if in_scale.shape[0] != 1:
        raise ValueError(f"in_scale folds into conv weights for a batch of one, got shape {tuple(in_scale.shape)}")
    trailing = (1,) * (weight.dim() - 2)
    if transposed:  # (C_in, C_out / groups, k...): input channels lead
        return weight * in_scale.view(-1, 1, *trailing)
    out = weight.shape[0]  # (C_out, C_in / groups, k...): output o reads its group's inputs
    scale = in_scale.view(groups, 1, -1).expand(groups, out // groups, -1).reshape(out, -1)
    return weight * scale.view(*scale.shape, *trailing)


def pytorch_takes_onednn(conv: nn.Conv3d | nn.ConvTranspose3d, x: torch.Tensor) -> bool:
    """Whether PyTorch itself runs this CPU float32 conv on oneDNN (its ``use_mkldnn`` rule, torch
    2.13): a 1x1 kernel (in the last two dims) unstrided and undilated only with 16 or more
    samples or more than one thread, and then only with groups, kernels wider than 3 in the last
    two dims, more than one sample, or samples x channels x depth x height above 20,480 (a rule
    tuned for 2D images)."""
    kernel, n = conv.kernel_size, x.shape[0]
    strided, dilated = any(s != 1 for s in conv.stride), any(d != 1 for d in conv.dilation)
    pointwise = kernel[-1] == 1 and kernel[-2] == 1
    return (strided or dilated or n >= 16 or not pointwise or torch.get_num_threads() > 1) and (
        conv.groups > 1 or min(kernel[-2:]) > 3 or n > 1 or n * x.shape[1] * x.shape[2] * x.shape[3] > 20480
    )


def takes_slow_path(conv: nn.Conv3d | nn.ConvTranspose3d, x: torch.Tensor) -> bool:
    """Whether PyTorch would run this conv on its own kernels rather than oneDNN
    (:func:`pytorch_takes_onednn`), though oneDNN can: a CPU float32 5-D map, zero padding given
    as numbers, oneDNN enabled. Only in plain eager runs (:func:`lightseg.accel.native.plain_eager`):
    traces and FLOP counts need the generic op.

    Why: there oneDNN is up to 10x faster (1x8x32^3, 8 -> 8 channels, 3x3x3: 10.4 ms against
    1.05 ms on 2 threads, docs/models.md; LightMedSeg has 14 such convs per forward), and on one
    thread every 1x1 conv of a batch under 16 is such a conv, in training too: 1x32x64^3 -> 16,
    90.6 ms against 5.7 ms (docs/models.md).
    """
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5
        and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        and not pytorch_takes_onednn(conv, x) and native.plain_eager(x)
    )


def dense_3x3x3(conv: nn.Conv3d | nn.ConvTranspose3d, stride: int) -> bool:
    """Whether ``conv`` is dense (one group), 3x3x3, padding 1, undilated, zero-padded, with
    ``stride`` on every axis: the convs the native kernels compute."""
    return (
        conv.groups == 1 and conv.kernel_size == (3, 3, 3) and conv.stride == (stride,) * 3
        and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.padding_mode == "zeros"
    )


def takes_narrow_kernel(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether :func:`lightseg.accel.native.conv3x3x3_narrow` computes this conv: dense 3x3x3, stride 1,
    padding 1, outputs in :func:`lightseg.accel.native.narrow_outputs` (4; 8 too with AVX-512), on a
    map the fused kernels take (:func:`lightseg.accel.native.applies`).

    Why: oneDNN computes output channels in blocks of one vector, 8 on AVX2 and 16 on AVX-512, so
    4 outputs cost it as much as 8 (and 8 as much as 16); the kernel fills every lane with the
    outputs of neighbouring voxels. LightMedSeg's ghost primary conv at 1x16x128^3, the largest op
    of its forward: 97 ms -> 61 ms on Zen 2; 32 -> 8 at 64^3 on an AVX-512 Xeon 24.9 -> 16.1 ms
    (docs/models.md).
    """
    return dense_3x3x3(conv, stride=1) and native.applies(x) and conv.out_channels in native.narrow_outputs()


def takes_down_kernel(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether :func:`lightseg.accel.native.down_conv_x2` computes this conv: dense 3x3x3, stride 2,
    padding 1, at most 8 inputs and 8 outputs, on a map the fused kernels take
    (:func:`lightseg.accel.native.applies`).

    Why: oneDNN computes output channels in blocks of 8 and reads a few input channels poorly;
    LightMedSeg's two stride-2 convs on the raw 1x4x128^3 input (4 -> 4 and 4 -> 8): 7.0 and 6.5 ms
    on oneDNN, 3.5 and 4.9 ms here (docs/models.md)."""
    return conv.in_channels <= 8 and conv.out_channels <= 8 and dense_3x3x3(conv, stride=2) and native.applies(x)


def takes_pointwise_kernel(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether :func:`lightseg.accel.native.pointwise_conv` computes this conv: 1x1x1, stride 1, no
    padding, dense, fewer than 8 outputs, on a map the fused kernels take
    (:func:`lightseg.accel.native.applies`).

    Why: oneDNN computes outputs in blocks of 8 and reads maps of few channels slowly. On 2
    threads: LightMedSeg's head (1x8x128^3 -> 4) 9.0-9.9 -> 5.8-7.2 ms, the LSPM's 1 -> 2 and
    8 -> 1 channel convs at 64^3 2.1-3.2 -> 0.3 ms and 0.9 -> 0.5 ms, the decoder gate 32 -> 3 at
    64^3 3.7-4.1 -> 2.3-2.8 ms; with 8 outputs both are as fast (docs/models.md)."""
    return (
        conv.out_channels < 8 and conv.groups == 1 and conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1)
        and conv.padding == (0, 0, 0) and conv.dilation == (1, 1, 1) and native.applies(x)
    )


def takes_up_kernel(conv: nn.ConvTranspose3d, x: torch.Tensor, output_padding: Sequence[int]) -> bool:
    """Whether :func:`lightseg.accel.native.up_conv_x2` computes this transposed conv: 3x3x3, stride
    2, padding 1, output padding 1 (the size exactly doubled), dense, 8 or 16 outputs, on a map the
    fused kernels take (:func:`lightseg.accel.native.applies`).

    Why: LightMedSeg's last upsampling (1x16x64^3 -> 8 channels) took oneDNN 25 ms, the kernel 13.5
    (docs/models.md); with 32 or more outputs oneDNN is as fast."""
    return (
        conv.out_channels in (8, 16) and dense_3x3x3(conv, stride=2) and tuple(output_padding) == (1, 1, 1)
        and native.applies(x)
    )


_ONE_BY_ONE = nn.Conv3d(1, 1, 1, device="meta")  # the kernel, stride, padding and groups takes_slow_path reads


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 conv of ``x`` by ``weight`` ``(C_out, C_in)`` plus ``bias``, for weights made on the fly
    (:class:`lightseg.accel.lightmedseg.FastSkipPaths`): on oneDNN where PyTorch would take its slow
    kernel, as :class:`FastConv3d` runs it (:func:`takes_slow_path`), and in ``x``'s layout."""
    weight = weight[:, :, None, None, None]
    if takes_slow_path(_ONE_BY_ONE, x):
        return torch.mkldnn_convolution(x, weight, bias, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1)
    return keep_layout(F.conv3d(x, weight, bias), x)


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose output keeps a ``channels_last_3d`` input's layout (:func:`keep_layout`)
    and that runs on oneDNN where PyTorch would take its slow kernel (:func:`takes_slow_path`), or
    on the narrow-output, halving or 1x1 kernel where one applies (:func:`takes_narrow_kernel`,
    :func:`takes_down_kernel`, :func:`takes_pointwise_kernel`)."""

    def scaled_weight(self, in_scale: torch.Tensor | None) -> torch.Tensor:
        """The weight, with ``in_scale`` folded in where given."""
        return self.weight if in_scale is None else scale_inputs(self.weight, in_scale, self.groups)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.scaled_weight(in_scale)
        if takes_narrow_kernel(self, x):
            return native.conv3x3x3_narrow(x, weight, self.bias)[0]
        if takes_down_kernel(self, x):
            return native.down_conv_x2(x, weight, self.bias)
        if takes_pointwise_kernel(self, x):
            return native.pointwise_conv(x, weight, self.bias)
        if takes_slow_path(self, x):
            return torch.mkldnn_convolution(x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
        return keep_layout(self._conv_forward(x, weight, self.bias), x)


class FastConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` whose output keeps a ``channels_last_3d`` input's layout
    (:func:`keep_layout`), on the doubling kernel where it applies (:func:`takes_up_kernel`), else
    on oneDNN where PyTorch would take its slow kernel (:func:`takes_slow_path`; without gradients
    only, through the oneDNN op PyTorch's compiler uses, as PyTorch exposes no other: 1x64x16^3 ->
    32 channels, 9.5 ms -> 3.6 ms)."""

    def scaled_weight(self, in_scale: torch.Tensor | None) -> torch.Tensor:
        """The weight, with ``in_scale`` folded in where given."""
        return self.weight if in_scale is None else scale_inputs(self.weight, in_scale, self.groups, transposed=True)

    def forward(
        self, x: torch.Tensor, output_size: list[int] | None = None, in_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = self.scaled_weight(in_scale)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 3, self.dilation)
        if takes_up_kernel(self, x, output_padding):
            return native.up_conv_x2(x, weight, self.bias)
        if takes_slow_path(self, x) and not torch.is_grad_enabled() and hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise"):
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, weight, self.bias, self.padding, output_padding, self.stride, self.dilation, self.groups, "none", [], ""
            )
        y = F.conv_transpose3d(x, weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation)
        return keep_layout(y, x)


def fits_group_kernels(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """The shapes both group kernels of :class:`GroupSumConv3d` take: 3x3x3, stride 1, padding 1, 8
    to 64 inputs, on a map the fused kernels take (its training form asks too)."""
    return (
        conv.in_channels in (8, 16, 32, 64) and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
        and conv.padding == (1, 1, 1) and native.applies(x)
    )


class GroupSumConv3d(nn.Conv3d):
    """A conv with one output per group and several inputs per group, run as a depthwise conv plus
    a sum over each group's inputs: same parameters and outputs (to float rounding).

    Why: oneDNN has fast kernels for depthwise convs but runs grouped convs with a few input
    channels per group at a fraction of that speed; LightMedSeg's whole 1x4x128^3 forward ran
    1.11-1.13x faster with its decoder branches in this form (docs/models.md). ``groups=1`` is a
    dense conv with a single output, which oneDNN computes as a block of 8 (3.2x slower at
    1x16x64^3, 12.5 vs 3.9 ms). The sum adds strided channel slices (or, for one group, reduces
    each voxel's channels), so a ``channels_last_3d`` input gives a ``channels_last_3d`` output.
    Off the CPU the plain grouped conv runs (:meth:`grouped`): the rewrite answers oneDNN, not cuDNN.
    """

    @staticmethod
    def fits(conv: nn.Conv3d) -> bool:
        """Whether ``conv`` can run in this form: one output per group, several inputs per group,
        a kernel wider than 1, stride and padding any, no dilation, zero padding."""
        return (
            conv.out_channels == conv.groups < conv.in_channels and max(conv.kernel_size) > 1
            and conv.dilation == (1, 1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        )

    def takes_pair_kernel(self, x: torch.Tensor) -> bool:
        """Whether :func:`lightseg.accel.native.grouped_pairs3` computes this conv: two inputs per
        group (:func:`fits_group_kernels`). It sums each pair in registers instead of writing the
        depthwise conv's channels and summing them in another pass (1x16x128^3 -> 8: 30.5 -> 25-26
        ms, docs/models.md)."""
        return self.in_channels == 2 * self.groups and fits_group_kernels(self, x)

    def takes_sum_kernel(self, x: torch.Tensor) -> bool:
        """Whether :func:`lightseg.accel.native.grouped_sum3` computes this conv: one group, so one
        output summed over all inputs in registers (:func:`fits_group_kernels`; LightMedSeg's LSPM
        gate, 1x16x64^3 -> 1: docs/models.md)."""
        return self.groups == 1 and fits_group_kernels(self, x)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.grouped(x, in_scale)
        weight = self.weight.reshape(self.in_channels, 1, *self.kernel_size)
        if in_scale is not None:
            weight = scale_inputs(weight, in_scale, self.in_channels)
        if self.takes_pair_kernel(x):
            return native.grouped_pairs3(x, weight, self.bias)
        if self.takes_sum_kernel(x):
            return native.grouped_sum3(x, weight, self.bias)
        per_group = self.in_channels // self.groups
        bias = None if self.bias is None else first_channel_bias(self.bias, per_group)
        depthwise = F.conv3d(x, weight, bias, self.stride, self.padding, groups=self.in_channels)
        if self.groups == 1:
            return depthwise.sum(1, keepdim=True)
        y = depthwise[:, 0::per_group]
        for i in range(1, per_group):
            y = y + depthwise[:, i::per_group]
        return y

    def grouped(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The same conv as one grouped ``F.conv3d`` (the form ``nn.Conv3d`` runs)."""
        weight = self.weight if in_scale is None else scale_inputs(self.weight, in_scale, self.groups)
        return F.conv3d(x, weight, self.bias, self.stride, self.padding, groups=self.groups)


def first_channel_bias(bias: torch.Tensor, per_group: int) -> torch.Tensor:
    """Each group's bias on its group's first depthwise channel, zero on the others, so that the
    bias rides on the depthwise conv with no extra pass over the output. A product with a one-hot
    row, not a pad: the bias's gradient is then a contiguous sum rather than a strided view of the
    depthwise bias's, which DistributedDataParallel reported on every step."""
    first = bias.new_zeros(per_group)
    first[0] = 1
    return (bias[:, None] * first).flatten()


def group_moments(total: torch.Tensor, squares: torch.Tensor, groups: int, voxels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's group means and variances ``(N, groups)`` from its per-channel sums and sums of
    squares ``(N, C)`` (float64) over ``voxels`` voxels per channel."""
    n, c = total.shape
    count = voxels * (c // groups)
    mean = total.view(n, groups, -1).sum(2) / count
    var = (squares.view(n, groups, -1).sum(2) / count - mean.square()).clamp_min(0)
    return mean, var


class AccurateGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose statistics stay accurate for ``channels_last_3d`` inputs.

    Why: PyTorch's CPU group norm sums a channels_last map in one float pass. At 1x8x128^3 its
    output is off by up to 2e-3 (the contiguous kernel: 5e-7), enough to move a trained
    LightMedSeg's logits by 2.3e-3 and flip 35 of 1.6M voxel labels against a float64 run
    (docs/models.md). Here the sums are short float32 ones totalled in float64: per channel over
    blocks of 64 voxels in the fused kernel (:mod:`lightseg.accel.native`, without gradients),
    else per pixel and channel over slabs of 8 depth slices; one pass then applies the group
    statistics. Other layouts, devices and dtypes take ``nn.GroupNorm`` itself (half-precision
    sums here would overflow).
    """

    SLAB = 8  # depth slices per float32 step

    def channel_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's channel sums and sums of squares, ``(N, C)`` float64, for a channels_last
        map: those the kernel that wrote ``x`` recorded (:func:`lightseg.accel.native.take_moments`),
        else the fused kernel's where it applies, otherwise float32 slab sums totalled in float64."""
        n, c, depth = x.shape[:3]
        recorded = native.take_moments(x)
        if recorded is not None:  # summed by the kernel that wrote x
            return recorded
        if native.applies(x):
            return native.channel_sums(x)
        rows = x.permute(0, 2, 3, 4, 1).reshape(n, depth, -1)  # the memory order: (N, D, H*W*C), a view
        total = squares = rows.new_zeros(())
        for slab in rows.split(self.SLAB, dim=1):  # per pixel and channel: D / SLAB short float sums
            total = total + slab.sum(1)
            squares = squares + slab.square().sum(1)
        return total.view(n, -1, c).double().sum(1), squares.view(n, -1, c).double().sum(1)

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's group mean and variance per channel, ``(N, C)`` float32, for a
        channels_last map (:meth:`channel_moments`)."""
        mean, var = group_moments(*self.channel_moments(x), self.num_groups, x[0, 0].numel())
        per_group = x.shape[1] // self.num_groups
        return mean.repeat_interleave(per_group, 1).float(), var.repeat_interleave(per_group, 1).float()

    def scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm as a per-channel ``x * scale + shift``, both ``(N, C)`` (channels_last maps):
        without gradients in one kernel call (:func:`lightseg.accel.native.group_scale_shift`; as
        tensor ops about 20 small operations, 23 norms per LightMedSeg forward)."""
        if native.applies(x):
            return native.group_scale_shift(*self.channel_moments(x), self.num_groups, x[0, 0].numel(), self.weight,
                                            self.bias, self.eps)
        mean, var = self.statistics(x)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (is_channels_last(x) and x.device.type == "cpu" and x.dtype == torch.float32):
            return super().forward(x)
        if x.shape[0] == 1 and not torch.is_grad_enabled():  # batch norm's pass beats addcmul's by 1.6x
            mean, var = self.statistics(x)
            return F.batch_norm(x, mean[0], var[0], self.weight, self.bias, False, 0.0, self.eps)
        scale, shift = self.scale_shift(x)
        return torch.addcmul(shift[:, :, None, None, None], x, scale[:, :, None, None, None])


def norm_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``silu(norm(x))``, overwriting ``x``: in one pass after the statistics through the fused
    kernel where it applies (statistics and pass 11.7 ms against 17.6 ms for the norm and a SiLU
    at 1x8x128^3), else PyTorch's two."""
    if isinstance(norm, AccurateGroupNorm) and is_channels_last(x) and native.applies(x):
        return native.affine_silu_(x, *norm.scale_shift(x))
    return F.silu(norm(x), inplace=True)


def gated_silu_sum(
    logits: torch.Tensor, branches: Sequence[tuple[torch.Tensor, nn.GroupNorm]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k softmax(logits, 1)[:, k] * silu(norm_k(x_k))`` for ``branches = [(x_k, norm_k)]`` (each
    ``x_k`` is overwritten), and the sum's channel means ``(B, C)``.

    Three branches go through one fused kernel where it applies: one pass after the norms'
    statistics instead of three affines, three SiLUs, a softmax, a product, two in-place sums and
    a mean (docs/models.md)."""
    maps = [x for x, _ in branches]
    fused = len(branches) == 3 and all(isinstance(norm, AccurateGroupNorm) for _, norm in branches)
    if fused and all(is_channels_last(x) for x in maps) and native.applies(logits, *maps):
        scales, shifts = zip(*(norm.scale_shift(x) for x, norm in branches))  # type: ignore[attr-defined]
        return native.gated_silu_sum3(logits, maps, scales, shifts)
    weights = torch.softmax(logits, dim=1)
    y = weights[:, 0:1] * norm_silu(*branches[0])
    for k in range(1, len(branches)):
        y.addcmul_(weights[:, k : k + 1], norm_silu(*branches[k]))
    return y, y.mean(dim=(2, 3, 4))
