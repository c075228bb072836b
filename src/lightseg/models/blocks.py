"""Building blocks shared by the models: conv-GroupNorm-SiLU, GhostConv3d, squeeze-excitation,
and the layers under them that keep CPU inference fast and exact in ``channels_last_3d``.

The LightMedSeg spec (``specs/lightmedseg.md`` section 3) defines the blocks; other models may
reuse them. Every GroupNorm has at most 4 groups ("GN4", spec 3), reduced to a divisor of the
channel count so that any width works. :class:`Conv3d` and :class:`ConvTranspose3d` keep a
channels_last input's layout, :class:`GroupNorm` keeps its statistics accurate in that layout,
and :func:`instance_norm` is the faster form of ``nn.InstanceNorm3d`` (docs/models.md).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.models import native

ConvBlock = Callable[[int, int, int], nn.Module]
"""``block(in_channels, out_channels, stride)``: a 3x3x3 conv unit (ghost or standard)."""


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
    (``in_scale`` of the convs here) instead of multiplied into ``x``: for a batch of one, outside
    ONNX export (whose graph has a dynamic batch axis).

    Why: multiplying a 16x128^3 map by its squeeze-excitation scale is a full pass over 128 MB
    (about 25 ms on 2 cores); scaling the next conv's few hundred weights costs nothing, and the
    outputs are the same to float rounding (docs/models.md).
    """
    return x.shape[0] == 1 and not torch.onnx.is_in_onnx_export()


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


def takes_slow_path(conv: nn.Conv3d | nn.ConvTranspose3d, x: torch.Tensor) -> bool:
    """Whether PyTorch would run this conv on its own vol2col kernel rather than oneDNN, though
    oneDNN can: an ungrouped CPU float32 conv of a batch of one, kernel at most 3, and channels x
    depth x height at most 20,480 (PyTorch's rule, tuned for 2D). Only in plain eager runs
    (:func:`lightseg.models.native.plain_eager`): traces, exports and FLOP counts need the generic op.

    Why: on such maps oneDNN is up to 10x faster (1x8x32^3, 8 -> 8 channels, 3x3x3: 10.4 ms
    against 1.05 ms on 2 cores, docs/models.md), and LightMedSeg has 14 such convs per forward.
    """
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5 and x.shape[0] == 1
        and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        and min(conv.kernel_size[-2:]) <= 3 and x.shape[1] * x.shape[2] * x.shape[3] <= 20480
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and native.plain_eager(x)
    )


def takes_four_output_kernel(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether :func:`lightseg.models.native.conv3x3x3_out4` computes this conv: dense 3x3x3, stride 1,
    padding 1, four outputs, on a map the fused kernels take (:func:`lightseg.models.native.applies`).

    Why: oneDNN computes output channels in blocks of one vector, 8 on AVX2, so 4 outputs cost it
    as much as 8; the kernel fills every lane with 4 outputs of 2 voxels. LightMedSeg's ghost
    primary conv at 1x16x128^3, the largest op of its forward: 97 ms -> 61 ms (docs/models.md).
    """
    return (
        conv.out_channels == 4 and conv.groups == 1 and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
        and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.padding_mode == "zeros"
        and native.applies(x)
    )


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` whose output keeps a ``channels_last_3d`` input's layout (:func:`keep_layout`)
    and that runs on oneDNN where PyTorch would take its slow kernel (:func:`takes_slow_path`), or
    on the fused four-output kernel where it applies (:func:`takes_four_output_kernel`); same
    parameters and outputs. ``in_scale`` (``(1, C_in)``) gives the conv of ``x * in_scale``
    through scaled weights (:func:`folds_scales`)."""

    def scaled_weight(self, in_scale: torch.Tensor | None) -> torch.Tensor:
        """The weight, with ``in_scale`` folded in where given."""
        return self.weight if in_scale is None else scale_inputs(self.weight, in_scale, self.groups)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.scaled_weight(in_scale)
        if takes_four_output_kernel(self, x):
            return native.conv3x3x3_out4(x, weight, self.bias)[0]
        if takes_slow_path(self, x):
            return torch.mkldnn_convolution(x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
        return keep_layout(self._conv_forward(x, weight, self.bias), x)


class ConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` whose output keeps a ``channels_last_3d`` input's layout
    (:func:`keep_layout`) and that runs on oneDNN where PyTorch would take its slow kernel
    (:func:`takes_slow_path`; inference only, through the oneDNN op PyTorch's compiler uses, as
    PyTorch exposes no other: 1x64x16^3 -> 32 channels, 9.5 ms -> 3.6 ms); same parameters and
    outputs. ``in_scale`` as in :class:`Conv3d`."""

    def forward(
        self, x: torch.Tensor, output_size: list[int] | None = None, in_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = self.weight if in_scale is None else scale_inputs(self.weight, in_scale, self.groups, transposed=True)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 3, self.dilation)
        if takes_slow_path(self, x) and not torch.is_grad_enabled() and hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise"):
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, weight, self.bias, self.padding, output_padding, self.stride, self.dilation, self.groups, "none", [], ""
            )
        y = F.conv_transpose3d(
            x, weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )
        return keep_layout(y, x)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose statistics stay accurate for ``channels_last_3d`` inputs.

    Why: PyTorch's CPU group norm sums a channels_last map in one float pass. At 1x8x128^3 its
    output is off by up to 2e-3 (the contiguous kernel: 5e-7), enough to move a trained
    LightMedSeg's logits by 2.3e-3 and flip 35 of 1.6M voxel labels against a float64 run
    (docs/models.md). Here the sums are short float32 ones totalled in float64: per channel over
    blocks of 64 voxels in the fused kernel (:mod:`lightseg.models.native`, inference), else per
    pixel and channel over slabs of 8 depth slices; one pass then applies the group statistics.
    Same parameters, state dict and function; other layouts, devices and dtypes take
    ``nn.GroupNorm`` itself (half-precision sums here would overflow).
    """

    SLAB = 8  # depth slices per float32 step

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's group mean and variance per channel, ``(N, C)`` float32, for a
        channels_last map: from the fused kernel's float64 channel sums where it applies
        (:mod:`lightseg.models.native`), otherwise from float32 slab sums totalled in float64."""
        n, c, depth = x.shape[:3]
        if native.applies(x):
            total, squares = native.channel_sums(x)
        else:
            rows = x.permute(0, 2, 3, 4, 1).reshape(n, depth, -1)  # the memory order: (N, D, H*W*C), a view
            total = squares = rows.new_zeros(())
            for slab in rows.split(self.SLAB, dim=1):  # per pixel and channel: D / SLAB short float sums
                total = total + slab.sum(1)
                squares = squares + slab.square().sum(1)
            total, squares = total.view(n, -1, c).double().sum(1), squares.view(n, -1, c).double().sum(1)
        per_group = c // self.num_groups
        count = x[0].numel() / self.num_groups
        mean = total.view(n, self.num_groups, per_group).sum(2) / count
        var = (squares.view(n, self.num_groups, per_group).sum(2) / count - mean.square()).clamp_min(0)
        return mean.repeat_interleave(per_group, 1).float(), var.repeat_interleave(per_group, 1).float()

    def scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm as a per-channel ``x * scale + shift``, both ``(N, C)`` (channels_last maps)."""
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


def norm_silu(x: torch.Tensor, norm: GroupNorm) -> torch.Tensor:
    """``silu(norm(x))``, overwriting ``x``: in one pass after the statistics through the fused
    kernel where it applies (:mod:`lightseg.models.native`; statistics and pass 11.7 ms against
    17.6 ms for the norm and a SiLU at 1x8x128^3), else PyTorch's two."""
    if is_channels_last(x) and native.applies(x):
        return native.affine_silu_(x, *norm.scale_shift(x))
    return F.silu(norm(x), inplace=True)


def with_accurate_group_norms(module: nn.Module) -> nn.Module:
    """``module`` with every plain ``nn.GroupNorm`` inside it swapped for :class:`GroupNorm`:
    same parameters and state dict, accurate in ``channels_last_3d``. ``create_model`` applies
    it to every registered model, so networks built by others (MONAI's SegResNet) get it too."""
    for name, child in module.named_children():
        if type(child) is nn.GroupNorm:
            accurate = GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            accurate.load_state_dict(child.state_dict())
            setattr(module, name, accurate)
        else:
            with_accurate_group_norms(child)
    return module


def instance_norm(channels: int, affine: bool = False) -> GroupNorm:
    """Instance norm built as ``GroupNorm(channels, channels)``: the same function (eps 1e-5) and
    parameters as ``nn.InstanceNorm3d`` without running statistics, so state dicts load either way.

    Why: on CPU ``nn.InstanceNorm3d`` runs through batch norm over a reshaped input, 2.9x slower
    than group norm at 1x16x128^3 (52 vs 18 ms, 2 threads), 4.8x in ``channels_last_3d``, whose
    layout it also drops; its forward and backward together are 2.1x slower (docs/models.md).
    """
    return GroupNorm(channels, channels, eps=1e-5, affine=affine)


def group_norm(channels: int, groups: int = 4) -> GroupNorm:
    """GroupNorm with ``gcd(groups, channels)`` groups: GN4 for every width that 4 divides."""
    return GroupNorm(math.gcd(groups, channels), channels)


def channel_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the channels (dim 1), exported to ONNX as max, exp and sum.

    Why: ONNX Runtime runs ``Softmax`` on axis 1 of a 5-D map through a transpose; in
    LightMedSeg's exported graph at 1x4x128^3 its 7 softmaxes took 369 ms of a 1.56 s forward.
    PyTorch keeps its own fused softmax.
    """
    if torch.onnx.is_in_onnx_export():
        e = torch.exp(x - x.amax(dim=1, keepdim=True))
        return e / e.sum(dim=1, keepdim=True)
    return torch.softmax(x, dim=1)


def gated_silu_sum(
    logits: torch.Tensor, branches: Sequence[tuple[torch.Tensor, GroupNorm]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k softmax(logits, 1)[:, k] * silu(norm_k(x_k))`` for ``branches = [(x_k, norm_k)]`` (each
    ``x_k`` is overwritten), and the sum's channel means ``(B, C)``.

    Three branches go through one fused kernel where it applies (:mod:`lightseg.models.native`):
    one pass after the norms' statistics instead of three affines, three SiLUs, a softmax, a
    product, two in-place sums and a mean (docs/models.md)."""
    maps = [x for x, _ in branches]
    if len(branches) == 3 and all(is_channels_last(x) for x in maps) and native.applies(logits, *maps):
        scales, shifts = zip(*(norm.scale_shift(x) for x, norm in branches))
        return native.gated_silu_sum3(logits, maps, scales, shifts)
    weights = channel_softmax(logits)
    y = weights[:, 0:1] * norm_silu(*branches[0])
    for k in range(1, len(branches)):
        y.addcmul_(weights[:, k : k + 1], norm_silu(*branches[k]))
    return y, y.mean(dim=(2, 3, 4))


class GroupSumConv3d(nn.Conv3d):
    """A grouped conv with one output per group, run as a depthwise conv plus a sum over each
    group's inputs: the same parameters and outputs (to float rounding) as ``nn.Conv3d``.

    Why: oneDNN has fast kernels for depthwise convs but runs grouped convs with a few input
    channels per group at a fraction of that speed; LightMedSeg's whole 1x4x128^3 forward ran
    1.11-1.13x faster with its decoder branches in this form (docs/models.md). ``groups=1`` is a
    dense conv with a single output, which oneDNN computes as a block of 8 (3.2x slower at
    1x16x64^3, 12.5 vs 3.9 ms). The sum adds strided channel slices (or, for one group, reduces
    each voxel's channels), so a ``channels_last_3d`` input gives a ``channels_last_3d`` output.
    """

    def __init__(self, in_channels: int, groups: int, kernel_size: int, stride: int = 1, bias: bool = True) -> None:
        if in_channels % groups:
            raise ValueError(f"GroupSumConv3d: in_channels {in_channels} is not a multiple of groups {groups}")
        super().__init__(in_channels, groups, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=bias)

    def takes_pair_kernel(self, x: torch.Tensor) -> bool:
        """Whether :func:`lightseg.models.native.grouped_pairs3` computes this conv: two inputs per
        group, 3x3x3, stride 1, 8 to 64 inputs, on a map the fused kernels take. It sums each pair
        in registers instead of writing the depthwise conv's channels and summing them in another
        pass (1x16x128^3 -> 8: 30.5 -> 25-26 ms, docs/models.md)."""
        return (
            self.in_channels == 2 * self.groups and self.in_channels in (8, 16, 32, 64)
            and self.kernel_size == (3, 3, 3) and self.stride == (1, 1, 1) and native.applies(x)
        )

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``in_scale`` as in :class:`Conv3d`. Off the CPU the plain grouped conv runs
        (:meth:`grouped`): the rewrite answers oneDNN's kernels, not cuDNN's."""
        if x.device.type != "cpu":
            return self.grouped(x, in_scale)
        weight = self.weight.reshape(self.in_channels, 1, *self.kernel_size)
        if in_scale is not None:
            weight = scale_inputs(weight, in_scale, self.in_channels)
        if self.takes_pair_kernel(x):
            return native.grouped_pairs3(x, weight, self.bias)
        per_group = self.in_channels // self.groups
        # The bias rides on each group's first depthwise channel: no extra pass over the output.
        bias = None if self.bias is None else F.pad(self.bias[:, None], (0, per_group - 1)).flatten()
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


class ConvNormAct(nn.Module):
    """``SiLU(GN4(Conv3d(x)))`` with 'same' padding; the plain conv unit of spec section 3.

    A grouped conv with one output and several inputs per group (LightMedSeg's decoder branch)
    is built as :class:`GroupSumConv3d`: same parameters, faster on CPU.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if 1 < groups == out_channels < in_channels:
            self.conv: nn.Conv3d = GroupSumConv3d(in_channels, groups, kernel_size, stride=stride, bias=bias)
        else:
            self.conv = Conv3d(
                in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=bias
            )
        self.norm = group_norm(out_channels)

    def pre_norm(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The conv's output, before ``norm`` and SiLU (for :func:`gated_silu_sum`)."""
        return self.conv(x, in_scale)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``in_scale`` as in :class:`Conv3d`."""
        return norm_silu(self.pre_norm(x, in_scale), self.norm)


class GhostConv3d(nn.Module):
    """GhostConv3D with ghost ratio 2 (spec 3.0).

    Half of the output channels come from a dense 3x3x3 conv (``primary``), the other half from
    a depthwise 3x3x3 conv of that half (``cheap``); both without bias [G]. GN4 and SiLU [G]
    follow the concatenation. ``out_channels`` must be even.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"GhostConv3d needs an even out_channels, got {out_channels}")
        half = out_channels // 2
        self.primary = Conv3d(in_channels, half, 3, stride=stride, padding=1, bias=False)
        self.cheap = nn.Conv3d(half, half, 3, padding=1, groups=half, bias=False)
        self.norm = group_norm(out_channels)

    def pre_norm(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Both halves, before ``norm`` and SiLU (for :func:`gated_silu_sum`)."""
        return self.ghosts(self.primary(x, in_scale))

    def ghosts(self, primary: torch.Tensor) -> torch.Tensor:
        """The primary half and the cheap half made from it, before ``norm`` and SiLU: for a half
        of 4 channels in one pass through the fused kernel where it applies
        (:func:`lightseg.models.native.ghost_expand4`; 7.1 ms against 16.3 ms for oneDNN's
        depthwise conv and the concatenation at 1x4x128^3), else PyTorch's conv and concatenation."""
        if primary.shape[1] == 4 and native.applies(primary):
            return native.ghost_expand4(primary, self.cheap.weight)
        return torch.cat([primary, self.cheap(primary)], dim=1)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``in_scale`` as in :class:`Conv3d`."""
        return norm_silu(self.pre_norm(x, in_scale), self.norm)


def standard_conv3d(in_channels: int, out_channels: int, stride: int = 1) -> ConvNormAct:
    """The standard-conv replacement of GhostConv3d (spec 3.0): one dense 3x3x3 conv, no bias."""
    return ConvNormAct(in_channels, out_channels, 3, stride=stride, bias=False)


class SqueezeExcite(nn.Module):
    """Channel recalibration ``x * sigmoid(W2 SiLU(W1 GAP(x)))`` (spec Eq. 10).

    The bottleneck width is ``max(min_hidden, channels // divisor)`` [I: divisor 8, floor 4];
    both linear layers have a bias (the spec's totals need them).
    """

    def __init__(self, channels: int, divisor: int = 8, min_hidden: int = 4) -> None:
        super().__init__()
        hidden = max(min_hidden, channels // divisor)
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, channels)

    def scale(self, pooled: torch.Tensor) -> torch.Tensor:
        """The ``(B, C)`` channel scale from the channel means ``pooled``; callers that can fold it
        into the next conv (:func:`folds_scales`) take it instead of :meth:`forward`."""
        return torch.sigmoid(self.expand(F.silu(self.reduce(pooled))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x.mean(dim=(2, 3, 4)))[:, :, None, None, None]
