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
parameters' gradients. Gradients agree with PyTorch's to float rounding
(tests/test_training_norms.py, tests/test_training_memory_format.py).

:func:`use_training_norms` swaps the class of every ``nn.GroupNorm`` for a subclass that takes
this path when a gradient is recorded on a CPU float32 ``channels_last_3d`` map and the kernels
are built; otherwise the module's own forward runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from lightseg.accel import native
from lightseg.accel.training_convs import records_cpu_gradient


def _voxels(x: torch.Tensor) -> int:
    return x[0, 0].numel()


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
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, _voxels(x), groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        voxels, per_group = _voxels(x), c // ctx.groups
        dy = dy.contiguous(memory_format=torch.channels_last_3d)
        sums = torch.zeros(2, n, c, dtype=torch.float64)
        for i in range(n):
            native.call("channel_dot_sums", dy[i], x[i], c, voxels, sums[0, i], sums[1, i])
        sum_dy, sum_dyx = sums[0], sums[1]
        mu, rho = _per_channel(mean, per_group), _per_channel(rstd, per_group)
        gamma = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
        count = voxels * per_group
        xhat_dy = rho * (sum_dyx - mu * sum_dy)  # sum of dy * xhat per (n, c)
        mean_g = _group_totals(gamma * sum_dy, per_group) / count  # mean(gamma * dy) over the group
        mean_gx = _group_totals(gamma * xhat_dy, per_group) / count  # mean(gamma * dy * xhat)
        grad_x = None
        if ctx.needs_input_grad[0]:
            a = (rho * gamma).float()
            b = (-rho * rho * mean_gx).float()
            shift = (rho * rho * mean_gx * mu - rho * mean_g).float()
            grad_x = torch.empty_like(x, memory_format=torch.channels_last_3d)
            for i in range(n):
                native.call("channel_axpby", dy[i], x[i], a[i], b[i], shift[i], c, voxels, grad_x[i])
        grad_w = xhat_dy.sum(0).to(x.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.sum(0).to(x.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def _takes_training_path(x: torch.Tensor) -> bool:
    return (records_cpu_gradient(x) and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
            and native.library() is not None)


class _TrainingGroupNorm:
    """Mixed into ``nn.GroupNorm``: the forward of :class:`GroupNormFunction` on the training path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _takes_training_path(x):
            return super().forward(x)  # type: ignore[misc]
        return GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)  # type: ignore[attr-defined]


@functools.cache
def _training_class(base: type) -> type:
    return type(f"Training{base.__name__}", (_TrainingGroupNorm, base), {"__doc__": base.__doc__})


def use_training_norms(model: nn.Module) -> nn.Module:
    """``model`` (in place) with each ``nn.GroupNorm`` running :class:`GroupNormFunction` in training on
    channels_last_3d maps; same parameters, state dict and outputs. Calling it again changes nothing."""
    for module in model.modules():
        if isinstance(module, nn.GroupNorm) and not isinstance(module, _TrainingGroupNorm):
            module.__class__ = _training_class(type(module))
    return model
