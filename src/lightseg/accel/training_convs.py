"""Faster backwards for depthwise, grouped and few-output 3D convs on the CPU, swapped into a model for training.

Why: PyTorch's CPU backward of a depthwise 3D conv is far slower than its forward. In a
LightMedSeg training step at 2x1x64^3 (channels_last_3d, 2 threads) the 16-channel 3x3x3
depthwise conv at 64^3 took 284 ms in backward against 18 ms forward (docs/training.md).

How (:class:`DepthwiseConv3dFunction`): the forward is PyTorch's conv. The input gradient is
again a depthwise conv, of the output gradient with the kernel flipped (stride 1, odd kernel,
padding k / 2), so it runs on the same fast forward kernel. The weight gradient, one sum per
kernel tap and channel over every voxel, comes from a C kernel over channels_last_3d maps
(``native.c``'s ``dw_weight_grad``: per output row short float sums vectorised over the channels, totalled
in double), or where that kernel is not built from a pure PyTorch sum per tap. The bias
gradient is the output gradient's channel sums.

:func:`use_training_convs` swaps the class of every depthwise conv in a model (and of each
grouped conv with one output per group, run as a depthwise conv and a sum over each group as
:class:`lightseg.accel.layers.GroupSumConv3d` runs it in inference) for a subclass that takes this
path when a gradient is recorded on a CPU float32 map, and of every dense conv with few outputs for
:class:`DenseConv3dFunction` (the weight gradient from a C kernel). Otherwise, and for any other
conv, the module's own forward runs. The parameters,
the state dict and what the model computes stay the same; the gradients agree to float rounding
(tests/test_training_convs.py, tests/test_training_memory_format.py).

The C kernels (``dw_weight_grad``, ``conv_weight_grad``, ``repeat_channels``) are in
:mod:`lightseg.accel.native` (built and loaded with the other kernels); wherever those are unavailable or off (``LIGHTSEG_NATIVE=0``, ``LIGHTSEG_ACCEL=0``)
the PyTorch sum runs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.accel import native
from lightseg.accel.layers import GroupSumConv3d, first_channel_bias, takes_slow_path
from lightseg.accel.training_forms import training_class


def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: int) -> torch.Tensor:
    """``(C, 1, k, k, k)``: the sum over batch and voxels of ``grad_out * x`` shifted by each tap
    (stride 1, padding ``k // 2``), through the C kernel for float32 where it is built, else per tap
    in PyTorch (float64 sums)."""
    n, c, d, h, w = x.shape
    if x.dtype == torch.float32 and native.library() is not None:
        layout = torch.channels_last_3d
        x, grad_out = x.contiguous(memory_format=layout), grad_out.contiguous(memory_format=layout)
        out = torch.empty((kernel**3, c), dtype=torch.float64)
        native.call("dw_weight_grad", x, grad_out, n, d, h, w, c, kernel, out)
        return out.t().reshape(c, 1, kernel, kernel, kernel).to(x.dtype)
    pad = kernel // 2
    padded = F.pad(x, (pad,) * 6)
    taps = [
        (grad_out * padded[:, :, a : a + d, b : b + h, e : e + w]).sum(dim=(0, 2, 3, 4), dtype=torch.float64)
        for a in range(kernel) for b in range(kernel) for e in range(kernel)
    ]
    return torch.stack(taps, 1).reshape(c, 1, kernel, kernel, kernel).to(x.dtype)


class DepthwiseConv3dFunction(torch.autograd.Function):
    """``F.conv3d(x, weight, bias, padding=k // 2, groups=C)`` (stride 1, odd cubic kernel) with the
    backward of the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, 1, weight.shape[-1] // 2, 1, x.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x, grad_w = depthwise_backward(x, weight, grad_out, ctx.needs_input_grad[:2])
        grad_b = grad_out.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def depthwise_backward(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor,
                       needs: Sequence[bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The input and weight gradients of a depthwise conv (stride 1, odd cubic kernel, 'same'
    padding) where ``needs`` asks for them: the flipped-kernel conv and :func:`depthwise_weight_grad`."""
    kernel = weight.shape[-1]
    grad_x = F.conv3d(grad_out, weight.flip(2, 3, 4), None, 1, kernel // 2, 1, x.shape[1]) if needs[0] else None
    grad_w = depthwise_weight_grad(x, grad_out, kernel) if needs[1] else None
    return grad_x, grad_w


class GroupedPairsFunction(torch.autograd.Function):
    """A grouped 3x3x3 conv with two inputs per group (8 to 64 inputs, stride 1, padding 1), from its
    depthwise weight ``(C, 1, 3, 3, 3)`` and per-group bias: the forward is the fused inference
    kernel (``grouped_pairs3``: each pair summed in registers, no depthwise map written), the
    backward the depthwise one on the output gradient repeated over each pair."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return native.grouped_pairs3(x, weight, bias, moments=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x, grad_w = depthwise_backward(x, weight, repeat_channels(grad_out, 2), ctx.needs_input_grad[:2])
        grad_b = grad_out.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def repeat_channels(grad: torch.Tensor, times: int) -> torch.Tensor:
    """Each channel of ``grad`` repeated ``times`` times in a row, in one pass, ``channels_last_3d``
    (the C kernel for float32 where it is built: 2.6x faster than PyTorch's copy of the expanded view)."""
    n, channels, *size = grad.shape
    if grad.dtype == torch.float32 and native.library() is not None:
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        out = torch.empty(n, channels * times, *size, memory_format=torch.channels_last_3d)
        for i in range(n):
            native.call("repeat_channels", grad[i], channels, times, grad[0, 0].numel(), out[i])
        return out
    repeated = grad.permute(0, 2, 3, 4, 1)[..., None].expand(n, *size, channels, times)
    return repeated.reshape(n, *size, channels * times).permute(0, 4, 1, 2, 3)


def dense_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: int) -> torch.Tensor:
    """``(Cout, Cin, k, k, k)``: a dense conv's weight gradient (stride 1, padding ``k // 2``) from the
    C kernel (channels_last_3d float32 maps, Cin a multiple of 8, Cout of 4: :func:`dense_fits`)."""
    n, cin, d, h, w = x.shape
    cout = grad_out.shape[1]
    if cin % 8 or cout % 4:  # the kernel's register blocks would run past the maps
        raise ValueError(f"dense_weight_grad: {cin} -> {cout} channels; the kernel takes Cin a multiple of 8, Cout of 4")
    layout = torch.channels_last_3d
    x, grad_out = x.contiguous(memory_format=layout), grad_out.contiguous(memory_format=layout)
    out = torch.empty((kernel**3, cout, cin), dtype=torch.float64)
    native.call("conv_weight_grad", x, grad_out, n, d, h, w, cin, cout, kernel, out)
    return out.permute(1, 2, 0).reshape(cout, cin, kernel, kernel, kernel).to(x.dtype)


class DenseConv3dFunction(torch.autograd.Function):
    """``F.conv3d(x, weight, bias, padding=k // 2)`` (stride 1, odd cubic kernel, one group) whose
    weight gradient comes from the C kernel: oneDNN's is slow for few output channels (a ghost
    conv's dense half, 16 -> 4 at 2x16x64^3: 93 ms against 33 ms for the forward, docs/training.md).
    The input gradient is PyTorch's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if weight.shape[-1] == 3 and native.applies(x) and weight.shape[0] in native.narrow_outputs():  # the inference kernel's case
            return native.conv3x3x3_narrow(x, weight, bias)[0]
        return F.conv3d(x, weight, bias, 1, weight.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        kernel = weight.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            pad = [kernel // 2] * 3
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1] * 3, pad, [1] * 3, False, [0] * 3, 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = dense_weight_grad(x, grad_out, kernel)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b


class GroupSumFunction(torch.autograd.Function):
    """The sum over each run of ``per_group`` consecutive channels, in the input's layout. Its
    backward repeats each output gradient channel ``per_group`` times in one pass, where autograd's
    backward of the slices' sum writes a zero map and a copy per slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, per_group: int) -> torch.Tensor:  # type: ignore[override]
        ctx.per_group = per_group
        if per_group == x.shape[1]:
            return x.sum(1, keepdim=True)
        return sum(x[:, i::per_group] for i in range(per_group))  # strided slices: a channels_last map stays one

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        return repeat_channels(grad_out, ctx.per_group), None


def records_cpu_gradient(x: torch.Tensor) -> bool:
    """Whether a gradient is being recorded on ``x``, a real 5-D CPU float32 map: the training kernels' case."""
    return (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5
            and native.plain_eager(x))


def takes_kernels(*maps: torch.Tensor) -> bool:
    """Whether the training kernels take these maps: a gradient recorded on each (:func:`records_cpu_gradient`),
    each in ``channels_last_3d``, and the kernels built."""
    return (all(records_cpu_gradient(m) and m.is_contiguous(memory_format=torch.channels_last_3d) for m in maps)
            and native.library() is not None)


def _fits(conv: nn.Conv3d) -> bool:
    """Stride 1, an odd cubic kernel, 'same' zero padding: the shapes the flipped-kernel input gradient holds for."""
    k = conv.kernel_size
    return (
        k[0] == k[1] == k[2] and k[0] % 2 == 1 and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1)
        and conv.padding == (k[0] // 2,) * 3 and conv.padding_mode == "zeros"
    )


def dense_fits(conv: nn.Conv3d) -> bool:
    """A dense conv the weight-gradient kernel takes: one group, Cin a multiple of 8, Cout 4 or 8 and a
    kernel of 3 or more (where oneDNN's weight gradient was measured slow; for 1x1 convs it is as
    fast as the kernel), stride 1, 'same' padding."""
    return conv.groups == 1 and _dense_shape_fits(conv.weight) and conv.kernel_size[0] >= 3 and _fits(conv)


def _dense_shape_fits(weight: torch.Tensor) -> bool:
    """The weight's own shape, not the module's channel attributes, which channel pruning's surgery
    may leave behind: Cout 4 or 8, Cin a multiple of 8."""
    return weight.shape[0] in (4, 8) and weight.shape[1] % 8 == 0


class _TrainingDense:
    """Mixed into a dense conv's class: the forward of :class:`DenseConv3dFunction` on channels_last_3d
    maps while the kernels are built."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (takes_kernels(x) and _dense_shape_fits(self.weight) and self.groups == 1):  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        return DenseConv3dFunction.apply(x, self.weight, self.bias)  # type: ignore[attr-defined]


class _TrainingDepthwise:
    """Mixed into a depthwise conv's class: the forward of :class:`DepthwiseConv3dFunction`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not records_cpu_gradient(x):  # the conv's own path
            return super().forward(x)  # type: ignore[misc]
        return DepthwiseConv3dFunction.apply(x, self.weight, self.bias)  # type: ignore[attr-defined]


class _TrainingGroupSum:
    """Mixed into a grouped conv with one output per group (:meth:`GroupSumConv3d.fits`): with two
    inputs per group where the fused kernel takes the map, :class:`GroupedPairsFunction`; otherwise
    a depthwise conv through :class:`DepthwiseConv3dFunction`, then the sum over each group's
    consecutive channels, in the layout of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not records_cpu_gradient(x):
            return super().forward(x)  # type: ignore[misc]
        c, groups = self.in_channels, self.groups  # type: ignore[attr-defined]
        per_group = c // groups
        # One group: the same view as a transpose, whose gradient comes back in the weight's own
        # strides (a reshape's gives its unit dim another stride, which DDP copies every step).
        weight = self.weight.transpose(0, 1) if groups == 1 else self.weight.reshape(c, 1, *self.kernel_size)  # type: ignore[attr-defined]
        with torch.no_grad():  # the inference layer's rule, which asks for no recorded gradient
            pairs = GroupSumConv3d.takes_pair_kernel(self, x)  # type: ignore[arg-type]
        if pairs:
            return GroupedPairsFunction.apply(x, weight, self.bias)  # type: ignore[attr-defined]
        bias = None if self.bias is None else first_channel_bias(self.bias, per_group)  # type: ignore[attr-defined]
        depthwise = DepthwiseConv3dFunction.apply(x, weight, bias)
        return GroupSumFunction.apply(depthwise, per_group)


class _TrainingOnednn:
    """Mixed into every other conv: oneDNN (whose gradients PyTorch has) where PyTorch would run
    its own kernel (:func:`lightseg.accel.layers.takes_slow_path`): on one thread every 1x1 conv of
    a batch under 16, 1.3x faster forward and backward at 2x32x32^3 -> 16 channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if records_cpu_gradient(x) and takes_slow_path(self, x):  # type: ignore[arg-type]
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,  # type: ignore[attr-defined]
                                            self.dilation, self.groups)  # type: ignore[attr-defined]
        return super().forward(x)  # type: ignore[misc]


_FORMS = (_TrainingDepthwise, _TrainingGroupSum, _TrainingDense, _TrainingOnednn)


def use_training_convs(model: nn.Module) -> nn.Module:
    """``model`` (in place) with each depthwise conv (stride 1, odd cubic kernel, 'same' padding) and
    each grouped conv with one output per group (:meth:`GroupSumConv3d.fits`) of that shape running
    :class:`DepthwiseConv3dFunction` in training, each dense conv :func:`dense_fits` takes
    :class:`DenseConv3dFunction`, and every other conv on oneDNN where PyTorch would not take it
    (:class:`_TrainingOnednn`); same parameters, state dict and outputs. Calling it again changes nothing."""
    for module in model.modules():
        base = type(module)
        if issubclass(base, _FORMS) or not isinstance(module, nn.Conv3d):
            continue
        if dense_fits(module):
            module.__class__ = training_class(base, _TrainingDense)
        elif GroupSumConv3d.fits(module) and _fits(module):
            module.__class__ = training_class(base, _TrainingGroupSum)
        elif module.groups == module.in_channels == module.out_channels and _fits(module):
            module.__class__ = training_class(base, _TrainingDepthwise)
        elif base.forward is nn.Conv3d.forward:  # a subclass with its own forward computes something else
            module.__class__ = training_class(base, _TrainingOnednn)
    return model
