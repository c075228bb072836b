"""LightMedSeg's CPU training forms: its decoder input, gate and squeeze-excitation with one-pass backwards.

Why: at LightMedSeg's full-resolution decoder stage (2x16x64^3 maps in a 2x1x64^3 training step)
eager PyTorch builds a K-channel anchor offset map and a 1x1 conv over it for the position bias,
upsamples and concatenates the skip (its trilinear backward first copies the gradient to the
contiguous layout), runs the gate's weighted sum of three branches as three products and two sums
and their backward as three more products, three products with sums and a softmax backward; each
squeeze-excitation's backward is two products, a sum and the mean's gradient added to the input's.
Each of those passes over a 2-16 MB map costs 2-8 ms on 2 cores (docs/training.md, "Training
speed on the CPU").

How: the position bias is the inference form's ``offset + slope * g``
(:func:`lightseg.accel.lightmedseg.position_terms`), with autograd through the small terms;
:class:`DecoderInputFunction` runs the inference kernel forward and one pass back;
:class:`SoftmaxWeightedSumFunction` does Eqs. (17)-(18) in one pass each way;
:class:`SqueezeExciteFunction` does Eq. (10)'s backward in two passes (the sums of ``dy * x``, then
``dx = dy * s + dpooled / voxels``), the small MLP's backward by autograd on the pooled means.
:func:`use_training_blocks` swaps the classes of LightMedSeg's decoder stages and
squeeze-excitations for forms that take these paths when a gradient is recorded on CPU float32
``channels_last_3d`` maps and the kernels are built; otherwise PyTorch's ops run. Parameters,
state dict and outputs stay the same, gradients agree to float rounding
(tests/test_training_lightmedseg.py, tests/test_training_memory_format.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from lightseg.accel import native
from lightseg.accel.lightmedseg import position_terms
from lightseg.accel.training_convs import takes_kernels
from lightseg.accel.training_forms import swap_classes
from lightseg.models.blocks import SqueezeExcite
from lightseg.models.lightmedseg import DecoderStage, position_ramp, resize, weighted_sum

LAYOUT = torch.channels_last_3d


class SoftmaxWeightedSumFunction(torch.autograd.Function):
    """``weighted_sum(softmax(logits, 1), maps)`` (LightMedSeg's Eqs. 17-18) in one pass each way."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, *maps: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, *maps)
        return native.softmax_weighted_sum(logits, maps)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        logits, *maps = ctx.saved_tensors
        n, c = maps[0].shape[:2]
        dy = dy.contiguous(memory_format=LAYOUT)
        grad_maps = [torch.empty_like(m, memory_format=LAYOUT) for m in maps]
        grad_logits = torch.empty_like(logits, memory_format=LAYOUT)
        for i in range(n):
            native.call("softmax_weighted_sum_grad", logits[i], native.pointers([m[i] for m in maps]), len(maps), c,
                        native.voxels(dy), dy[i], native.pointers([g[i] for g in grad_maps]), grad_logits[i])
        return (grad_logits, *grad_maps)


def softmax_weighted_sum(logits: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``weighted_sum(softmax(logits, 1), maps)``: through :class:`SoftmaxWeightedSumFunction` where
    the kernel takes the maps (at most :data:`lightseg.accel.native.MAX_MAPS` of them, channels a multiple of 8), else
    PyTorch's ops."""
    if len(maps) <= native.MAX_MAPS and maps[0].shape[1] % 8 == 0 and takes_kernels(logits, *maps):
        return SoftmaxWeightedSumFunction.apply(logits, *maps)
    return weighted_sum(torch.softmax(logits, dim=1), maps)


class DecoderInputFunction(torch.autograd.Function):
    """Eqs. (14)-(16)'s input ``cat([u + offset + slope * g, skip resized to u], 1)`` (``g`` the
    position ramp, ``skip`` at ``u``'s size or half of it; ``offset`` ``(N, Cu)`` and ``slope``
    ``(Cu,)``, or both ``None``): the inference kernel forward, one pass back (``decoder_input_grad``:
    ``u``'s gradient, the offset's and slope's sums, and the upsampling's adjoint)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, skip: torch.Tensor, offset: torch.Tensor | None,  # type: ignore[override]
                slope: torch.Tensor | None) -> torch.Tensor:
        ctx.half = tuple(skip.shape[2:]) != tuple(u.shape[2:])
        ctx.cu, ctx.skip_shape, ctx.position = u.shape[1], skip.shape, offset is not None
        return native.decoder_input(u, skip, offset, slope)[0]

    @staticmethod
    def backward(ctx, grad_f: torch.Tensor):  # type: ignore[override]
        grad_f = grad_f.contiguous(memory_format=LAYOUT)
        n, c, depth, height, width = grad_f.shape
        grad_u = torch.empty(n, ctx.cu, depth, height, width, memory_format=LAYOUT)
        grad_skip = torch.empty(ctx.skip_shape, memory_format=LAYOUT)
        sums = torch.zeros(2, n, ctx.cu, dtype=torch.float64)
        for i in range(n):
            native.call("decoder_input_grad", grad_f[i], ctx.cu, c - ctx.cu, int(ctx.half), depth, height, width,
                        grad_u[i], grad_skip[i], sums[0, i], sums[1, i])
        if not ctx.position:
            return grad_u, grad_skip, None, None
        return grad_u, grad_skip, sums[0].float(), sums[1].sum(0).float()


def decoder_input(u: torch.Tensor, skip: torch.Tensor, position: nn.Conv3d | None,
                  anchors: torch.Tensor | None) -> torch.Tensor:
    """Eqs. (14)-(16)'s input ``cat([u + P, skip resized to u], 1)``, the position bias ``P`` as
    :func:`lightseg.accel.lightmedseg.position_terms` (no ``K x D x H x W`` offsets, no 1x1 conv over
    them: the inference form's algebra, here with autograd through the small terms); through
    :class:`DecoderInputFunction` where the kernels take the maps, else PyTorch's ops."""
    size, skip_size = tuple(u.shape[2:]), tuple(skip.shape[2:])
    terms = position_terms(position, anchors) if position is not None and anchors is not None else None
    if (skip_size == size or size == tuple(2 * s for s in skip_size)) and takes_kernels(u, skip):
        return DecoderInputFunction.apply(u, skip, *(terms or (None, None)))
    if terms is not None:
        offset, slope = terms
        u = torch.addcmul(u + offset[:, :, None, None, None], slope[None, :, None, None, None], position_ramp(size, u))
    return torch.cat([u, resize(skip, size)], dim=1)


class SqueezeExciteFunction(torch.autograd.Function):
    """``se(x)`` for a :class:`SqueezeExcite` ``se`` whose parameters are ``params``: the forward is
    the module's (channel means in float64 totals), the backward of the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, se: SqueezeExcite, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total, _ = native.channel_sums(x)
        pooled = (total / native.voxels(x)).float()
        scale = se.scale(pooled)
        ctx.se = se
        ctx.save_for_backward(x, pooled, scale)
        return x * scale[:, :, None, None, None]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, pooled, scale = ctx.saved_tensors
        n, c = x.shape[:2]
        dy = dy.contiguous(memory_format=LAYOUT)
        sums = torch.zeros(2, n, c, dtype=torch.float64)
        for i in range(n):
            native.call("channel_dot_sums", dy[i], x[i], c, native.voxels(x), sums[0, i], sums[1, i])
        params = list(ctx.se.parameters())
        with torch.enable_grad():
            pooled = pooled.detach().requires_grad_()
            grad_pooled, *grad_params = torch.autograd.grad(ctx.se.scale(pooled), [pooled, *params], sums[1].float())
        grad_x = torch.empty_like(x, memory_format=LAYOUT)
        zeros, offset = torch.zeros(c), (grad_pooled / native.voxels(x)).contiguous()
        for i in range(n):  # dy * scale + 0 * dy + dpooled / voxels: dy in x's place, so no second map is read
            native.call("channel_axpby", dy[i], dy[i], scale[i].contiguous(), zeros, offset[i], c, native.voxels(x), grad_x[i])
        return (grad_x, None, *grad_params)


SE_MIN_VALUES = 2**19
"""Values per sample (channels x voxels) from which :class:`SqueezeExciteFunction` beats autograd's
SE: its backward's fixed cost (the MLP's gradient by ``autograd.grad``, per-sample kernel calls) is
about 0.5 ms (2x16x32^3: 2.39 against 3.41 ms; 2x8x32^3: 1.61 against 1.38 ms; 2 threads, AMD EPYC)."""


class _TrainingSqueezeExcite:
    """Mixed into :class:`SqueezeExcite`: :class:`SqueezeExciteFunction` on the training path for maps
    of :data:`SE_MIN_VALUES` values per sample or more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() < SE_MIN_VALUES or not takes_kernels(x):
            return super().forward(x)  # type: ignore[misc]
        return SqueezeExciteFunction.apply(x, self, *self.parameters())  # type: ignore[attr-defined]


class _TrainingDecoderStage:
    """Mixed into :class:`DecoderStage`: its forward with the decoder input through
    :func:`decoder_input` and the gate through :func:`softmax_weighted_sum`."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor, anchors: torch.Tensor | None) -> torch.Tensor:
        u = self.up(x)  # type: ignore[attr-defined]
        f = self.se_in(decoder_input(u, skip, self.position, anchors))  # type: ignore[attr-defined]  # (14)-(16)
        branches = (self.grouped(f), self.conv(f), self.pointwise(f))  # type: ignore[attr-defined]  # (19)-(21)
        return self.se_out(softmax_weighted_sum(self.gate(f), branches))  # type: ignore[attr-defined]  # (17)-(18)


_MIXINS: dict[type, type] = {SqueezeExcite: _TrainingSqueezeExcite, DecoderStage: _TrainingDecoderStage}


def use_training_blocks(model: nn.Module) -> nn.Module:
    """``model`` (in place) with LightMedSeg's decoder stages and squeeze-excitations in their training
    forms; same parameters, state dict and outputs (to float rounding). Calling it again changes nothing."""
    return swap_classes(model, _MIXINS)
