"""Fused CPU kernels for inference in ``channels_last_3d``, compiled from ``native.c`` on first use.

Why: eager PyTorch runs a group norm's statistics, its affine, the SiLU after it and a gate's
softmax, weighting and sum as separate passes over the map, and at LightMedSeg's 128^3 decoder
stage each pass over an 8-channel map costs 6-10 ms on 2 cores, as much as the arithmetic
(docs/models.md). The kernels here do each chain in one pass. Three more compute convs where
oneDNN leaves vector lanes empty or PyTorch needs extra passes: a dense 3x3x3 conv with four
outputs (``blocks.takes_four_output_kernel``), a ghost conv's cheap half with the concatenation,
and a grouped conv with two inputs per group.

How: plain C, built with the system C compiler (``$CC`` or ``cc``; about 1 s) with ``-march=native``
into ``~/.cache/lightseg/native`` (``$LIGHTSEG_CACHE``), keyed by the source, the flags and the
CPU's features, so a home folder shared by different machines gets one build per CPU. The build
is written to a temporary name and renamed, so concurrent processes never load a half-written
file. Loaded through ``ctypes``; the loops run on OpenMP, which resolves to the runtime PyTorch
has already loaded, so they use PyTorch's threads and thread count. (Python threads would
compete with PyTorch's OpenMP workers, which spin for a while after every parallel op: a 1.6x
slower kernel on 2 cores, measured.)

When not: without a C compiler, if the build fails (one warning), with ``LIGHTSEG_NATIVE=0``,
and for any map that is not a real float32 CPU map in ``channels_last_3d`` under ``no_grad`` /
``inference_mode`` (training, ONNX export, tracing, FLOP counting), callers take their PyTorch path, which
gives the same outputs to float rounding (tests/test_native.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch

_SOURCE = Path(__file__).with_name("native.c")
# -ffast-math's parts without -funsafe-math-optimizations (and so without reassociation): with
# -ffast-math GCC links crtfastmath.o into the library, whose constructor turns on flush-to-zero for
# the whole process on load, so NumPy and PyTorch then lost subnormal floats in the user's code too.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffinite-math-only", "-fno-signed-zeros", "-fno-trapping-math",
          "-freciprocal-math", "-fcx-limited-range", "-fopenmp", "-fPIC", "-shared"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "channel_sums": [_P, _I, _I, _P, _P],
    "affine_silu": [_P, _P, _P, _I, _I],
    "gated_silu_sum3": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _P],
    "decoder_input": [_P, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P],
    "conv3x3x3_out4": [_P, _I, _I, _I, _I, _P, _P, _P, _I, _P, _P, _P, _P],
    "ghost_expand4": [_P, _I, _I, _I, _P, _P],
    "grouped_pairs3": [_P, _I, _I, _I, _I, _P, _P, _P],
}


def _cpu_features() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True, text=True)
        os.replace(built, target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; ``None`` where they are off or cannot be built."""
    if os.environ.get("LIGHTSEG_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(), _cpu_features().encode()])
    ).hexdigest()[:16]
    target = native_cache_dir() / f"kernels-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"lightseg: fused CPU kernels unavailable, using PyTorch's ops ({detail})", RuntimeWarning)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    return lib


def native_cache_dir() -> Path:
    """``$LIGHTSEG_CACHE/native``, or ``~/.cache/lightseg/native`` when the variable is unset,
    empty or not an absolute path: a shared library is loaded from there, so it must never be
    the current folder (an empty value was) or depend on where lightseg is started (a relative
    one, which is ignored with a warning)."""
    value = os.path.expanduser(os.environ.get("LIGHTSEG_CACHE", ""))
    if value and not os.path.isabs(value):
        warnings.warn(f"lightseg: LIGHTSEG_CACHE={value!r} is not an absolute path; using ~/.cache/lightseg",
                      RuntimeWarning)
    root = Path(value) if os.path.isabs(value) else Path.home() / ".cache" / "lightseg"
    return root / "native"


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


def _voxels(x: torch.Tensor) -> int:
    return x[0, 0].numel()


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _floats(t: torch.Tensor | None) -> torch.Tensor | None:
    """A weight or bias as the kernels read it: dense float32 (no copy when it already is)."""
    return None if t is None else t.float().contiguous()


def channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, sum of squares)`` of every sample's channels, ``(N, C)`` float64 (:func:`applies` holds)."""
    n, c = x.shape[:2]
    lib = library()
    sums = torch.zeros(2, n, c, dtype=torch.float64)
    for i in range(n):
        lib.channel_sums(x[i].data_ptr(), c, _voxels(x), sums[0, i].data_ptr(), sums[1, i].data_ptr())
    return sums[0], sums[1]


def affine_silu_(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x = silu(x * scale + shift)`` in place, ``scale`` and ``shift`` ``(N, C)`` (:func:`applies` holds)."""
    n, c = x.shape[:2]
    scale, shift = scale.float().contiguous(), shift.float().contiguous()
    lib = library()
    for i in range(n):
        lib.affine_silu(x[i].data_ptr(), scale[i].data_ptr(), shift[i].data_ptr(), c, _voxels(x))
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
    lib = library()
    for i in range(n):
        maps = (m[i].data_ptr() for m in (logits, *branches))
        lib.gated_silu_sum3(*maps, scale[i].data_ptr(), shift[i].data_ptr(), y[i].data_ptr(), c, _voxels(y), sums[i].data_ptr())
    return y, (sums / _voxels(y)).float()


def decoder_input(
    u: torch.Tensor, skip: torch.Tensor, offset: torch.Tensor | None, slope: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat([u + offset + slope * ramp, skip resized to u], 1)`` and its channel means ``(N, C)``
    in one pass (LightMedSeg's Eqs. (14)-(16); ``ramp`` as ``lightmedseg.position_ramp``).
    ``skip`` is at ``u``'s size or half of it; ``offset`` ``(N, Cu)`` and ``slope`` ``(Cu,)``, or
    both ``None`` for no position bias (:func:`applies` holds for ``u`` and ``skip``)."""
    n, cu, depth, height, width = u.shape
    cs = skip.shape[1]
    half = tuple(skip.shape[2:]) != tuple(u.shape[2:])
    if half and [2 * s for s in skip.shape[2:]] != [depth, height, width]:
        raise ValueError(f"decoder_input: skip {tuple(skip.shape[2:])} is neither u's size nor half of {tuple(u.shape[2:])}")
    f = torch.empty(n, cu + cs, depth, height, width, memory_format=torch.channels_last_3d)
    sums = torch.zeros(n, cu + cs, dtype=torch.float64)
    if offset is not None:
        offset, slope = offset.float().contiguous(), slope.float().contiguous()
    lib = library()
    for i in range(n):
        terms = (None, None) if offset is None else (offset[i].data_ptr(), slope.data_ptr())
        lib.decoder_input(
            u[i].data_ptr(), cu, skip[i].data_ptr(), cs, int(half), depth, height, width, *terms, f[i].data_ptr(),
            sums[i].data_ptr(),
        )
    return f, (sums / (depth * height * width)).float()


def conv3x3x3_out4(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sides: Sequence[tuple[torch.Tensor, torch.Tensor | None]] = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``conv3d(x, weight, bias, padding=1)`` for ``weight`` ``(4, C, 3, 3, 3)``, and the 1x1 convs
    ``sides`` (``(weight (R, C, 1, 1, 1), bias)`` each) of the same ``x``, which ride along on the
    input the kernel has already rearranged; all in ``channels_last_3d`` (:func:`applies` holds for
    ``x``). Returns the conv and the sides' outputs."""
    n, c, depth, height, width = x.shape
    y = torch.empty(n, 4, depth, height, width, memory_format=torch.channels_last_3d)
    outs = [torch.empty(n, w.shape[0], depth, height, width, memory_format=torch.channels_last_3d) for w, _ in sides]
    weight, bias, side_weight, side_bias = _floats(weight), _floats(bias), None, None
    if sides:
        side_weight = _floats(torch.cat([w.reshape(len(w), c) for w, _ in sides]))
        side_bias = _floats(torch.cat([w.new_zeros(len(w)) if b is None else b for w, b in sides]))
    channels = (ctypes.c_int64 * max(len(outs), 1))(*(o.shape[1] for o in outs))
    lib = library()
    for i in range(n):
        targets = (ctypes.c_void_p * max(len(outs), 1))(*(o[i].data_ptr() for o in outs))
        failed = lib.conv3x3x3_out4(
            x[i].data_ptr(), c, depth, height, width, *(_pointer(t) for t in (weight, bias)), y[i].data_ptr(),
            len(outs), channels, *(_pointer(t) for t in (side_weight, side_bias)), targets,
        )
        if failed:
            raise MemoryError(f"conv3x3x3_out4: no memory for the input planes of a {tuple(x.shape)} map")
    return y, outs


def ghost_expand4(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cat([p, conv3d(p, weight, padding=1, groups=4)], 1)`` for a 4-channel ``p`` and a depthwise
    ``weight`` ``(4, 1, 3, 3, 3)`` without bias: a ghost conv's two halves (:func:`applies` holds for ``p``)."""
    n, _, depth, height, width = p.shape
    g = torch.empty(n, 8, depth, height, width, memory_format=torch.channels_last_3d)
    weight = _floats(weight)
    lib = library()
    for i in range(n):
        if lib.ghost_expand4(p[i].data_ptr(), depth, height, width, weight.data_ptr(), g[i].data_ptr()):
            raise MemoryError(f"ghost_expand4: out of memory for a {tuple(p.shape)} map")
    return g


def grouped_pairs3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The grouped conv with two input channels per group, from its depthwise ``weight``
    ``(C, 1, 3, 3, 3)`` and per-group ``bias`` ``(C / 2,)``; ``C`` is 8, 16, 32 or 64 (:func:`applies`
    holds for ``x``)."""
    n, c, depth, height, width = x.shape
    if c not in (8, 16, 32, 64):
        raise ValueError(f"grouped_pairs3: {c} input channels; the kernel takes 8, 16, 32 or 64")
    y = torch.empty(n, c // 2, depth, height, width, memory_format=torch.channels_last_3d)
    weight, bias = _floats(weight), _floats(bias)
    lib = library()
    for i in range(n):
        if lib.grouped_pairs3(x[i].data_ptr(), c, depth, height, width, weight.data_ptr(), _pointer(bias), y[i].data_ptr()):
            raise MemoryError(f"grouped_pairs3: out of memory for a {tuple(x.shape)} map")
    return y
