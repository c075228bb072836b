"""Fused CPU kernels for inference in ``channels_last_3d``, compiled from ``native.c`` on first use.

Why: eager PyTorch runs a group norm's statistics, its affine, the SiLU after it and a gate's
softmax, weighting and sum as separate passes over the map, and at LightMedSeg's 128^3 decoder
stage each pass over an 8-channel map costs 6-10 ms on 2 cores, as much as the arithmetic
(docs/models.md). The kernels here do each chain in one pass. Three more compute convs where
oneDNN leaves vector lanes empty or PyTorch needs extra passes: a dense 3x3x3 conv with four
(or eight, with AVX-512) outputs (``accel.layers.takes_narrow_kernel``), a ghost conv's cheap half with the concatenation,
and a grouped conv with two inputs per group. Training has its own: depthwise and dense convs'
weight gradients (:mod:`lightseg.accel.training_convs`), group norm with SiLU forward and backward
(:mod:`lightseg.accel.training_norms`), the gate's softmax-weighted sum and its backward
(:mod:`lightseg.accel.training_lightmedseg`).

How: plain C built on first use and called through checked ``ctypes`` bindings
(:mod:`lightseg.accel.native_library`: the build, its cache and :data:`KERNELS`); the functions
here take and return tensors.

When not: without a C compiler, if the build fails, on a CPU without the
:data:`~lightseg.accel.native_library.REQUIRED_FEATURES`
(each one warning), with ``LIGHTSEG_NATIVE=0`` or ``LIGHTSEG_ACCEL=0``,
and for any map that is not a real float32 CPU map in ``channels_last_3d`` under ``no_grad`` /
``inference_mode`` (training, ONNX export, tracing, FLOP counting), callers take their PyTorch path, which
gives the same outputs to float rounding (tests/test_native.py). Part of :mod:`lightseg.accel`.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Sequence

import torch

from lightseg.accel.native_library import call, library


def plain_eager(*maps: torch.Tensor) -> bool:
    """Whether ``maps`` are real tensors run eagerly: no tracing, ONNX export, or dispatch mode
    (FLOP counting, fake tensors), all of which need to see PyTorch's own ops."""
    return (
        all(type(m) is torch.Tensor for m in maps)
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def applies(*maps: torch.Tensor) -> bool:
    """Whether the kernels can stand in for PyTorch on these maps (see the module docstring)."""
    if torch.is_grad_enabled() or not plain_eager(*maps):
        return False
    if not all(
        m.device.type == "cpu" and m.dtype == torch.float32 and m.dim() == 5
        and m.is_contiguous(memory_format=torch.channels_last_3d)
        for m in maps
    ):
        return False
    return library() is not None


def voxels(x: torch.Tensor) -> int:
    """Voxels per channel of a ``(N, C, D, H, W)`` map: the length the kernels' loops run over."""
    return x[0, 0].numel()


def _floats(t: torch.Tensor | None) -> torch.Tensor | None:
    """A weight or bias as the kernels read it: dense float32 (no copy when it already is)."""
    return None if t is None else t.float().contiguous()


_MOMENTS = "_lightseg_moments"


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def record_moments(x: torch.Tensor, moments: torch.Tensor) -> None:
    """Attach ``x``'s channel sums and sums of squares, ``moments`` ``(N, 2, C)`` float64, which a
    kernel added up as it wrote ``x`` (:func:`take_moments` hands them to the norm that reads ``x``).

    Why: the decoder's branch maps go straight into group norms, whose statistics were one more
    pass over each map (three passes over 64 MB at 1x8x128^3); the kernel sums each row it has
    just written while it is still in cache."""
    setattr(x, _MOMENTS, (_version(x), moments[:, 0], moments[:, 1]))


def take_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(sums, squares)`` (``(N, C)`` float64 each) recorded for ``x`` by :func:`record_moments`,
    removed from it, or ``None``: none recorded, or ``x`` changed in place since (seen where ``x``
    keeps a version counter; within ``inference_mode`` callers take them before any such change)."""
    recorded = x.__dict__.pop(_MOMENTS, None)
    if recorded is None or recorded[0] != _version(x):
        return None
    return recorded[1], recorded[2]


def _per_sample(out: torch.Tensor, moments: bool, run: Callable[[int, torch.Tensor | None], object]) -> None:
    """``run(i, slot)`` for every sample ``i`` of ``out``, ``slot`` the sample's ``(2, C)`` float64
    moments for the kernel to add to (``None`` unless ``moments``), then those moments recorded for
    ``out`` (:func:`record_moments`)."""
    found = torch.zeros(out.shape[0], 2, out.shape[1], dtype=torch.float64) if moments else None
    for i in range(out.shape[0]):
        run(i, None if found is None else found[i])
    if found is not None:
        record_moments(out, found)


def channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, sum of squares)`` of every sample's channels, ``(N, C)`` float64 (:func:`applies` holds)."""
    n, c = x.shape[:2]
    sums = torch.zeros(2, n, c, dtype=torch.float64)
    for i in range(n):
        call("channel_dot_sums", x[i], x[i], c, voxels(x), sums[0, i], sums[1, i])
    return sums[0], sums[1]


def group_scale_shift(
    total: torch.Tensor, squares: torch.Tensor, groups: int, voxels: int, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A group norm as ``x * scale + shift`` per channel, both ``(N, C)`` float32, from the channels'
    float64 sums and sums of squares ``(N, C)`` over ``voxels`` voxels (no gradients)."""
    n, c = total.shape
    scale, shift = torch.empty(2, n, c)
    total, squares = total.contiguous(), squares.contiguous()
    call("group_scale_shift", total, squares, n, c, groups, voxels, _floats(weight), _floats(bias), eps, scale, shift)
    return scale, shift


def texture_blend(smooth: torch.Tensor, detail: torch.Tensor, texture: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``smooth + texture * (detail - smooth)`` (``texture`` one channel, the others ``C``) and its
    channel means ``(N, C)``, in one pass (:func:`applies` holds for the three maps)."""
    n, c = smooth.shape[:2]
    z = torch.empty_like(smooth, memory_format=torch.channels_last_3d)
    sums = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        call("texture_blend", smooth[i], detail[i], texture[i], c, voxels(z), z[i], sums[i])
    return z, (sums / voxels(z)).float()


def affine_silu_(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x = silu(x * scale + shift)`` in place, ``scale`` and ``shift`` ``(N, C)`` (:func:`applies` holds)."""
    n, c = x.shape[:2]
    scale, shift = _floats(scale), _floats(shift)
    for i in range(n):
        call("affine_silu", x[i], scale[i], shift[i], c, voxels(x))
    return x


def gated_silu_sum3(
    logits: torch.Tensor, branches: Sequence[torch.Tensor], scales: Sequence[torch.Tensor], shifts: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k softmax(logits, 1)[:, k] * silu(branches[k] * scales[k] + shifts[k])`` and its channel
    means ``(N, C)``, in one pass; ``scales`` and ``shifts`` ``(N, C)`` each (:func:`applies` holds
    for the logits and branches)."""
    n, c = branches[0].shape[:2]
    y = torch.empty_like(branches[0], memory_format=torch.channels_last_3d)
    scale = torch.stack(list(scales), 1).float().contiguous()  # (N, 3, C)
    shift = torch.stack(list(shifts), 1).float().contiguous()
    sums = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        call("gated_silu_sum3", logits[i], *(m[i] for m in branches), scale[i], shift[i], y[i], c, voxels(y), sums[i])
    return y, (sums / voxels(y)).float()


def decoder_input(
    u: torch.Tensor, skip: torch.Tensor, offset: torch.Tensor | None, slope: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat([u + offset + slope * ramp, skip resized to u], 1)`` and its channel means ``(N, C)``
    in one pass (LightMedSeg's Eqs. (14)-(16); ``ramp`` as ``lightmedseg.position_ramp``).
    ``skip`` is at ``u``'s size or half of it; ``offset`` ``(N, Cu)`` and ``slope`` ``(Cu,)``, or
    both ``None`` for no position bias (:func:`applies` holds for ``u`` and ``skip``)."""
    def run(i: int, skip_i: torch.Tensor, cs: int, half: int, *rest: torch.Tensor | None) -> None:
        call("decoder_input", u[i], u.shape[1], skip_i, cs, half, *u.shape[2:], *rest)

    return _decoder_input(u.shape[:2], u.shape[2:], skip, offset, slope, run)


def up_decoder_input(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, skip: torch.Tensor,
    offset: torch.Tensor | None, slope: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decoder_input` of ``u = up_conv_x2(x, weight, bias)``, with ``u`` written straight into
    the concatenation instead of a map of its own (:func:`applies` holds for ``x`` and ``skip``)."""
    n, c, depth, height, width = x.shape
    co = weight.shape[1]
    if co % 8 or tuple(weight.shape) != (c, co, 3, 3, 3):
        raise ValueError(f"up_decoder_input: weight {tuple(weight.shape)}; the kernel takes ({c}, 8k, 3, 3, 3)")
    weight, bias = _floats(weight), _floats(bias)
    return _decoder_input((n, co), (2 * depth, 2 * height, 2 * width), skip, offset, slope,
                          lambda i, *rest: call("up_decoder_input", x[i], c, depth, height, width, weight, bias, co, *rest))


def _decoder_input(
    u_shape: Sequence[int], size: Sequence[int], skip: torch.Tensor, offset: torch.Tensor | None,
    slope: torch.Tensor | None, run: Callable[..., object],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenation and its channel means for :func:`decoder_input` and :func:`up_decoder_input`:
    ``run(i, skip, cs, half, offset, slope, f, sums)``, with sample ``i``'s rows of ``skip``,
    ``offset``, ``f`` and ``sums``, fills sample ``i``."""
    (n, cu), (depth, height, width) = u_shape, size
    cs = skip.shape[1]
    half = tuple(skip.shape[2:]) != tuple(size)
    if half and [2 * s for s in skip.shape[2:]] != [depth, height, width]:
        raise ValueError(f"decoder_input: skip {tuple(skip.shape[2:])} is neither u's size nor half of {tuple(size)}")
    f = torch.empty(n, cu + cs, depth, height, width, memory_format=torch.channels_last_3d)
    sums = torch.zeros(n, cu + cs, dtype=torch.float64)
    offset, slope = _floats(offset), _floats(slope)
    for i in range(n):
        run(i, skip[i], cs, int(half), None if offset is None else offset[i], slope, f[i], sums[i])
    return f, (sums / (depth * height * width)).float()


@functools.cache
def narrow_outputs() -> tuple[int, ...]:
    """The output counts :func:`conv3x3x3_narrow` computes faster than oneDNN: those that fill a
    vector with whole voxels where oneDNN leaves half its output block empty. 4 with 8-float vectors
    (AVX2); 4 and 8 with 16-float ones (AVX-512), where oneDNN's blocks are 16 outputs wide
    (docs/models.md). None without the kernels."""
    if library() is None:
        return ()
    return (4, 8) if call("narrow_floats") == 16 else (4,)


def conv3x3x3_narrow(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sides: Sequence[tuple[torch.Tensor, torch.Tensor | None]] = (),
    moments: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``conv3d(x, weight, bias, padding=1)`` for ``weight`` ``(K, C, 3, 3, 3)``, K 4 or 8, and the 1x1 convs
    ``sides`` (``(weight (R, C, 1, 1, 1), bias)`` each) of the same ``x``, which ride along on the
    input the kernel has already rearranged; all in ``channels_last_3d`` (:func:`applies` holds for
    ``x``). Returns the conv and the sides' outputs, the first side with its moments recorded where
    ``moments`` (:func:`record_moments`; the side a norm reads next, put it first)."""
    n, c, depth, height, width = x.shape
    k = weight.shape[0]
    if k not in (4, 8):
        raise ValueError(f"conv3x3x3_narrow computes 4 or 8 outputs, not {k}")
    y = torch.empty(n, k, depth, height, width, memory_format=torch.channels_last_3d)
    outs = [torch.empty(n, w.shape[0], depth, height, width, memory_format=torch.channels_last_3d) for w, _ in sides]
    weight, bias, side_weight, side_bias = _floats(weight), _floats(bias), None, None
    if sides:
        side_weight = _floats(torch.cat([w.reshape(len(w), c) for w, _ in sides]))
        side_bias = _floats(torch.cat([w.new_zeros(len(w)) if b is None else b for w, b in sides]))
    channels = (ctypes.c_int64 * max(len(outs), 1))(*(o.shape[1] for o in outs))

    def run(i: int, slot: torch.Tensor | None) -> None:
        targets = (ctypes.c_void_p * max(len(outs), 1))(*(o[i].data_ptr() for o in outs))
        call("conv3x3x3_narrow", x[i], c, depth, height, width, k, weight, bias, y[i], len(outs), channels, side_weight,
             side_bias, targets, slot)

    _per_sample(outs[0] if outs else y, moments and bool(outs), run)
    return y, outs


GHOST_CHANNELS = (4, 8, 16, 32)
"""The primary-half widths :func:`ghost_expand` takes."""


def ghost_expand(p: torch.Tensor, weight: torch.Tensor, moments: bool = True) -> torch.Tensor:
    """``cat([p, conv3d(p, weight, padding=1, groups=C)], 1)`` for ``p`` of ``C`` channels in
    :data:`GHOST_CHANNELS` and a depthwise ``weight`` ``(C, 1, 3, 3, 3)`` without bias: a ghost conv's
    two halves (:func:`applies` holds for ``p``), with its moments recorded where ``moments``
    (:func:`record_moments`)."""
    n, c, depth, height, width = p.shape
    if c not in GHOST_CHANNELS:
        raise ValueError(f"ghost_expand: {c} channels; the kernel takes {GHOST_CHANNELS}")
    g = torch.empty(n, 2 * c, depth, height, width, memory_format=torch.channels_last_3d)
    weight = _floats(weight)
    _per_sample(g, moments, lambda i, slot: call("ghost_expand", p[i], c, depth, height, width, weight, g[i], slot))
    return g


def grouped_pairs3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, moments: bool = True) -> torch.Tensor:
    """The grouped conv with two input channels per group, from its depthwise ``weight``
    ``(C, 1, 3, 3, 3)`` and per-group ``bias`` ``(C / 2,)``; ``C`` is 8, 16, 32 or 64 (:func:`applies`
    holds for ``x``); its moments recorded where ``moments`` (:func:`record_moments`)."""
    n, c, depth, height, width = x.shape
    if c not in (8, 16, 32, 64):
        raise ValueError(f"grouped_pairs3: {c} input channels; the kernel takes 8, 16, 32 or 64")
    y = torch.empty(n, c // 2, depth, height, width, memory_format=torch.channels_last_3d)
    weight, bias = _floats(weight), _floats(bias)
    _per_sample(y, moments, lambda i, slot: call("grouped_pairs3", x[i], c, depth, height, width, weight, bias, y[i], slot))
    return y


def grouped_sum3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The dense 3x3x3 conv with one output (padding 1), from its depthwise form ``weight``
    ``(C, 1, 3, 3, 3)`` and ``bias`` ``(1,)``; ``C`` is 8, 16, 32 or 64 (:func:`applies` holds for ``x``)."""
    n, c, depth, height, width = x.shape
    if c not in (8, 16, 32, 64):
        raise ValueError(f"grouped_sum3: {c} input channels; the kernel takes 8, 16, 32 or 64")
    y = torch.empty(n, 1, depth, height, width, memory_format=torch.channels_last_3d)
    weight, bias = _floats(weight), _floats(bias)
    for i in range(n):
        call("grouped_sum3", x[i], c, depth, height, width, weight, bias, y[i])
    return y


def up_conv_x2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv_transpose3d(x, weight, bias, stride=2, padding=1, output_padding=1)`` for ``weight``
    ``(C, C_out, 3, 3, 3)`` with ``C_out`` a multiple of 8: the map at twice its size in
    ``channels_last_3d`` (:func:`applies` holds for ``x``)."""
    n, c, depth, height, width = x.shape
    co = weight.shape[1]
    if co % 8 or tuple(weight.shape) != (c, co, 3, 3, 3):
        raise ValueError(f"up_conv_x2: weight {tuple(weight.shape)}; the kernel takes ({c}, 8k, 3, 3, 3)")
    y = torch.empty(n, co, 2 * depth, 2 * height, 2 * width, memory_format=torch.channels_last_3d)
    weight, bias = _floats(weight), _floats(bias)
    for i in range(n):
        call("up_conv_x2", x[i], c, depth, height, width, weight, bias, co, y[i])
    return y


def down_conv_x2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3d(x, weight, bias, stride=2, padding=1)`` for ``weight`` ``(C_out, C, 3, 3, 3)`` with
    ``C_out`` at most 8: the map at half its size (rounded up) in ``channels_last_3d``
    (:func:`applies` holds for ``x``)."""
    n, c, depth, height, width = x.shape
    co = weight.shape[0]
    if not 1 <= co <= 8 or tuple(weight.shape) != (co, c, 3, 3, 3):
        raise ValueError(f"down_conv_x2: weight {tuple(weight.shape)}; the kernel takes (1..8, {c}, 3, 3, 3)")
    y = torch.empty(n, co, (depth + 1) // 2, (height + 1) // 2, (width + 1) // 2, memory_format=torch.channels_last_3d)
    weight, bias = _floats(weight), _floats(bias)
    for i in range(n):
        call("down_conv_x2", x[i], c, depth, height, width, weight, bias, co, y[i])
    return y


MAX_MAPS = 8
"""The most maps :func:`softmax_weighted_sum` mixes (native.c's MAX_MAPS)."""


def softmax_weighted_sum(logits: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k softmax(logits, 1)[:, k] * maps[k]`` in one pass, for at most :data:`MAX_MAPS` maps
    of the same shape with a multiple of 8 channels, all in ``channels_last_3d``."""
    n, c = maps[0].shape[:2]
    if len(maps) > MAX_MAPS or c % 8:
        raise ValueError(f"softmax_weighted_sum: {len(maps)} maps of {c} channels; the kernel takes up to {MAX_MAPS} of 8k")
    y = torch.empty_like(maps[0], memory_format=torch.channels_last_3d)
    for i in range(n):
        call("softmax_weighted_sum", logits[i], pointers([m[i] for m in maps]), len(maps), c, voxels(y), y[i])
    return y


def pointers(maps: Sequence[torch.Tensor]) -> ctypes.Array:
    """The maps' data addresses as a C array (an :data:`ARRAY` argument)."""
    return (ctypes.c_void_p * len(maps))(*(m.data_ptr() for m in maps))


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 conv of ``x`` by ``weight`` ``(C_out, C, 1, 1, 1)`` (``C_out`` at most 8) plus ``bias``,
    in ``channels_last_3d`` (:func:`applies` holds for ``x``)."""
    n, c = x.shape[:2]
    co = weight.shape[0]
    if not 1 <= co <= 8 or tuple(weight.shape) != (co, c, 1, 1, 1):
        raise ValueError(f"pointwise_conv: weight {tuple(weight.shape)}; the kernel takes (1..8, {c}, 1, 1, 1)")
    y = torch.empty(n, co, *x.shape[2:], memory_format=torch.channels_last_3d)
    weight, bias = _floats(weight), _floats(bias)
    for i in range(n):
        call("pointwise_conv", x[i], c, voxels(x), weight, bias, co, y[i])
    return y
