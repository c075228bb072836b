"""A faster backward for group norm on channels_last_3d maps, swapped into a model for training.

Why: PyTorch's CPU group norm backward is slow in ``channels_last_3d``: at 2x8x64^3 (2 threads)
its forward and backward took 35 ms against 13 ms in the contiguous format, and LightMedSeg's
last decoder stage runs three such norms per step (docs/training.md, "Training speed").

How (:class:`GroupNormFunction`): the forward is PyTorch's ``native_group_norm``, so what the
model computes does not change. The backward needs, per sample and channel, the sums of ``dy``
and of ``dy * x`` (one pass, ``native.c``'s ``channel_dot_sums``, totals in double); from them
and the saved group means and reciprocal deviations come, per group, the two terms of
``dx = rstd * (gamma * dy - mean(gamma * dy) - xhat * mean(gamma * dy * xhat))``, written as
``a * dy + b * x + shift`` per channel in a second pass (``channel_axpby``), and the affine
parameters' gradients (:class:`NormGradient`). Gradients agree with PyTorch's to float rounding
(tests/test_training_norms.py, tests/test_training_memory_format.py).

A norm followed by SiLU (the conv units :class:`ConvNormAct` and :class:`GhostConv3d`) runs both as
:class:`GroupNormSiLUFunction`: fewer passes over the map each way than the norm and the SiLU apart,
and no normalised map kept for the backward.

:func:`use_training_norms` swaps the class of every ``nn.GroupNorm``, :class:`ConvNormAct` and
:class:`GhostConv3d` for a subclass that takes these paths when a gradient is recorded on a CPU
float32 ``channels_last_3d`` map and the kernels are built; otherwise the module's own forward runs.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.accel import native
from lightseg.accel.training_forms import swap_classes
from lightseg.accel.layers import group_moments
from lightseg.accel.training_convs import takes_kernels
from lightseg.models.blocks import ConvNormAct, GhostConv3d


def _per_channel(t: torch.Tensor, per_group: int) -> torch.Tensor:
    """``(N, G)`` per-group values as ``(N, C)`` float64, each repeated over its group's channels."""
    return t.double().repeat_interleave(per_group, dim=1)


def _group_totals(t: torch.Tensor, per_group: int) -> torch.Tensor:
    """``(N, C)`` values summed over each group of ``per_group`` channels, repeated back to ``(N, C)``."""
    return t.reshape(t.shape[0], -1, per_group).sum(2).repeat_interleave(per_group, dim=1)


class GroupNormFunction(torch.autograd.Function):
    """``F.group_norm(x, groups, weight, bias, eps)`` with the backward of the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,  # type: ignore[override]
                groups: int, eps: float) -> torch.Tensor:
        n, c = x.shape[:2]
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, native.voxels(x), groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        dy = dy.contiguous(memory_format=torch.channels_last_3d)
        sums = torch.zeros(2, n, c, dtype=torch.float64)
        for i in range(n):
            native.call("channel_dot_sums", dy[i], x[i], c, native.voxels(x), sums[0, i], sums[1, i])
        per_group = c // ctx.groups
        terms = NormGradient(sums[0], sums[1], _per_channel(mean, per_group), _per_channel(rstd, per_group), weight,
                             per_group, native.voxels(x))
        grad_x = None
        if ctx.needs_input_grad[0]:
            a, b, offset = terms.input_terms()
            grad_x = torch.empty_like(x, memory_format=torch.channels_last_3d)
            for i in range(n):
                native.call("channel_axpby", dy[i], x[i], a[i], b[i], offset[i], c, native.voxels(x), grad_x[i])
        return (grad_x, *terms.affine_grads(x.dtype, weight is not None, ctx.needs_input_grad[1:3]), None, None)


class NormGradient:
    """A group norm's backward from per-sample channel sums of the gradient ``g`` at its output and of
    ``g * x`` (``(N, C)`` float64), the per-channel group means ``mu`` and reciprocal deviations
    ``rho`` (``(N, C)`` float64), the affine weight and the channels per group.

    ``dx = rho * (gamma * g - mean(gamma * g) - xhat * mean(gamma * g * xhat))`` over each group is
    ``a * g + b * x + offset`` per channel (:meth:`input_terms`)."""

    def __init__(self, sum_g: torch.Tensor, sum_gx: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor,
                 weight: torch.Tensor | None, per_group: int, voxels: int) -> None:
        self.sum_g, self.mu, self.rho, self.per_group = sum_g, mu, rho, per_group
        self.count = voxels * per_group
        self.gamma = torch.ones(mu.shape[1], dtype=torch.float64) if weight is None else weight.double()
        self.xhat_g = rho * (sum_gx - mu * sum_g)  # sum of g * xhat per (n, c)

    def input_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, offset)``, ``(N, C)`` float32 each."""
        mean_g = _group_totals(self.gamma * self.sum_g, self.per_group) / self.count  # mean(gamma * g)
        mean_gx = _group_totals(self.gamma * self.xhat_g, self.per_group) / self.count  # mean(gamma * g * xhat)
        rho = self.rho
        a = rho * self.gamma
        b = -rho * rho * mean_gx
        offset = rho * rho * mean_gx * self.mu - rho * mean_g
        return a.float(), b.float(), offset.float()

    def affine_grads(self, dtype: torch.dtype, affine: bool, needs: tuple[bool, bool]) -> tuple[torch.Tensor | None, ...]:
        """The weight's and the bias's gradients where ``needs`` asks and the norm is ``affine``."""
        grad_w = self.xhat_g.sum(0).to(dtype) if affine and needs[0] else None
        grad_b = self.sum_g.sum(0).to(dtype) if affine and needs[1] else None
        return grad_w, grad_b


class GroupNormSiLUFunction(torch.autograd.Function):
    """``F.silu(F.group_norm(x, groups, weight, bias, eps))`` on a channels_last_3d map: forward, the
    statistics (float64 totals, :func:`lightseg.accel.native.channel_sums`),
    then ``silu(x * scale + shift)``; in backward the gradient at the norm's output ``g`` (recomputed
    from ``dy`` and ``x``, so no normalised map is saved) with its sums and those of ``g * x``, then
    ``dx = a * g + b * x + offset`` (:class:`NormGradient`) in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,  # type: ignore[override]
                groups: int, eps: float) -> torch.Tensor:
        n, c = x.shape[:2]
        per_group = c // groups
        mean, var = group_moments(*native.channel_sums(x), groups, native.voxels(x))
        mu, rho = _per_channel(mean, per_group), _per_channel((var + eps).rsqrt(), per_group)
        scale = rho if weight is None else rho * weight.double()
        shift = -mu * scale if bias is None else bias.double() - mu * scale
        scale, shift = scale.float(), shift.float()
        y = torch.empty_like(x, memory_format=torch.channels_last_3d)
        for i in range(n):
            native.call("affine_silu_to", x[i], scale[i], shift[i], c, native.voxels(x), y[i])
        ctx.save_for_backward(x, weight, mu, rho, scale, shift)
        ctx.per_group = per_group
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight, mu, rho, scale, shift = ctx.saved_tensors
        n, c = x.shape[:2]
        dy = dy.contiguous(memory_format=torch.channels_last_3d)
        sums = torch.zeros(2, n, c, dtype=torch.float64)
        g = torch.empty_like(x, memory_format=torch.channels_last_3d)  # the gradient at the norm's output, then dx
        for i in range(n):
            native.call("affine_silu_grad", dy[i], x[i], scale[i], shift[i], c, native.voxels(x), g[i], sums[0, i], sums[1, i])
        terms = NormGradient(sums[0], sums[1], mu, rho, weight, ctx.per_group, native.voxels(x))
        grad_x = None
        if ctx.needs_input_grad[0]:
            a, b, offset = terms.input_terms()
            for i in range(n):
                native.call("channel_axpby_", g[i], x[i], a[i], b[i], offset[i], c, native.voxels(x))
            grad_x = g
        return (grad_x, *terms.affine_grads(x.dtype, weight is not None, ctx.needs_input_grad[1:3]), None, None)


def _takes_training_path(x: torch.Tensor) -> bool:
    return takes_kernels(x) and not x.is_contiguous()  # a map in both layouts (one channel or voxel) keeps PyTorch's norm


class _TrainingGroupNorm:
    """Mixed into ``nn.GroupNorm``: the forward of :class:`GroupNormFunction` on the training path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _takes_training_path(x):
            return super().forward(x)  # type: ignore[misc]
        return GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)  # type: ignore[attr-defined]


FUSED_MIN_VOXELS = 32**3
"""Voxels per channel from which :class:`GroupNormSiLUFunction` beats the norm's training path and
PyTorch's SiLU: its fixed cost (per-sample kernel calls, float64 terms) is about 0.15 ms more per
forward and backward, which at 2x8-64 channels pays off from 32^3 (2x8x32^3: 1.77 against 2.21 ms;
2x64x16^3: 2.55 against 2.36 ms; 2 threads, AMD EPYC)."""


def norm_then_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``F.silu(norm(x))``: through :class:`GroupNormSiLUFunction` on the training path for maps of
    :data:`FUSED_MIN_VOXELS` or more, else the norm module and PyTorch's SiLU."""
    if native.voxels(x) >= FUSED_MIN_VOXELS and _takes_training_path(x):
        return GroupNormSiLUFunction.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    return F.silu(norm(x))


class _TrainingConvNormAct:
    """Mixed into :class:`ConvNormAct`: its norm and SiLU through :func:`norm_then_silu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_then_silu(self.conv(x), self.norm)  # type: ignore[attr-defined]


class _TrainingGhostConv:
    """Mixed into :class:`GhostConv3d`: its norm and SiLU through :func:`norm_then_silu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)  # type: ignore[attr-defined]
        return norm_then_silu(torch.cat([primary, self.cheap(primary)], dim=1), self.norm)  # type: ignore[attr-defined]


_MIXINS: dict[type, type] = {nn.GroupNorm: _TrainingGroupNorm, ConvNormAct: _TrainingConvNormAct,
                             GhostConv3d: _TrainingGhostConv}


def use_training_norms(model: nn.Module) -> nn.Module:
    """``model`` (in place) with each ``nn.GroupNorm`` running :class:`GroupNormFunction`, and the norm
    and SiLU of each :class:`ConvNormAct` and :class:`GhostConv3d` :class:`GroupNormSiLUFunction`, in
    training on channels_last_3d maps; same parameters, state dict and outputs (to float rounding).
    Calling it again changes nothing."""
    return swap_classes(model, _MIXINS)
