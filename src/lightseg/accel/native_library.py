"""Building, loading and calling the fused CPU kernels of ``native.c`` (:mod:`lightseg.accel.native`
wraps each kernel for tensors).

How: plain C, built with the system C compiler (``$CC``, which may carry a launcher or flags, or
``cc``; about 1 s) with ``-march=native``
into ``~/.cache/lightseg/native`` (``$LIGHTSEG_CACHE``), keyed by the source, the flags and the
CPU's features, so a home folder shared by different machines gets one build per CPU. The build
is written to a temporary name and renamed, so concurrent processes never load a half-written
file. Loaded through ``ctypes``; the loops run on OpenMP, which resolves to the runtime PyTorch
has already loaded, so they use PyTorch's threads and thread count. (Python threads would
compete with PyTorch's OpenMP workers, which spin for a while after every parallel op: a 1.6x
slower kernel on 2 cores, measured.)

Bindings: :data:`KERNELS` declares every C function's argument kinds and return type once;
:func:`call` checks each argument against it (dtype, device, arity) before the call.

Fails safe: without a C compiler, if the build fails or on a CPU without
:data:`REQUIRED_FEATURES`, :func:`library` warns once and returns ``None``; with
``LIGHTSEG_NATIVE=0`` or ``LIGHTSEG_ACCEL=0`` (or ``off``; :mod:`lightseg.environment`) it
returns ``None`` silently.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from lightseg.environment import switch

_SOURCE = Path(__file__).with_name("native.c")
# -ffast-math's parts without -funsafe-math-optimizations (and so without reassociation): with
# -ffast-math GCC links crtfastmath.o into the library, whose constructor turns on flush-to-zero for
# the whole process on load, so NumPy and PyTorch then lost subnormal floats in the user's code too.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffinite-math-only", "-fno-signed-zeros", "-fno-trapping-math",
          "-freciprocal-math", "-fcx-limited-range", "-fopenmp", "-fPIC", "-shared"]
# The x86 vector extensions the kernels were written and measured for (8-float vectors, fused
# multiply-add); without them GCC would split every vector op in two and the kernels lose to oneDNN.
REQUIRED_FEATURES = ("avx2", "fma")

# Argument kinds of the C functions: a float32 / float64 tensor's data (``None`` allowed where the C
# side takes NULL), an int64, a double, or a ctypes array built by the caller.
F32, F32_OR_NULL, F64, F64_OR_NULL, I64, REAL, ARRAY = "f32", "f32?", "f64", "f64?", "i64", "real", "array"
_CTYPES = {F32: ctypes.c_void_p, F32_OR_NULL: ctypes.c_void_p, F64: ctypes.c_void_p, F64_OR_NULL: ctypes.c_void_p,
           I64: ctypes.c_int64, REAL: ctypes.c_double, ARRAY: ctypes.c_void_p}
_DTYPES = {F32: torch.float32, F32_OR_NULL: torch.float32, F64: torch.float64, F64_OR_NULL: torch.float64}
_NULLABLE = (F32_OR_NULL, F64_OR_NULL)
STATUS = ctypes.c_int  # 0, or -1 when the kernel could not allocate its scratch memory
KERNELS: dict[str, tuple[type | None, tuple[str, ...]]] = {
    # name: (restype, argument kinds in the C signature's order; see native.c)
    "channel_dot_sums": (None, (F32, F32, I64, I64, F64, F64)),
    "affine_silu": (None, (F32, F32, F32, I64, I64)),
    "texture_blend": (None, (F32, F32, F32, I64, I64, F32, F64)),
    "group_scale_shift": (None, (F64, F64, I64, I64, I64, I64, F32_OR_NULL, F32_OR_NULL, REAL, F32, F32)),
    "gated_silu_sum3": (None, (F32, F32, F32, F32, F32, F32, F32, I64, I64, F64)),
    "decoder_input": (None, (F32, I64, F32, I64, I64, I64, I64, I64, F32_OR_NULL, F32_OR_NULL, F32, F64)),
    "narrow_floats": (ctypes.c_int64, ()),
    "conv3x3x3_narrow": (STATUS, (F32, I64, I64, I64, I64, I64, F32, F32_OR_NULL, F32, I64, ARRAY, F32_OR_NULL,
                                  F32_OR_NULL, ARRAY, F64_OR_NULL)),
    "ghost_expand": (STATUS, (F32, I64, I64, I64, I64, F32, F32, F64_OR_NULL)),
    "grouped_pairs3": (STATUS, (F32, I64, I64, I64, I64, F32, F32_OR_NULL, F32, F64_OR_NULL)),
    "grouped_sum3": (STATUS, (F32, I64, I64, I64, I64, F32, F32_OR_NULL, F32)),
    "up_conv_x2": (STATUS, (F32, I64, I64, I64, I64, F32, F32_OR_NULL, I64, F32)),
    "up_decoder_input": (STATUS, (F32, I64, I64, I64, I64, F32, F32_OR_NULL, I64, F32, I64, I64, F32_OR_NULL,
                                  F32_OR_NULL, F32, F64)),
    "down_conv_x2": (STATUS, (F32, I64, I64, I64, I64, F32, F32_OR_NULL, I64, F32)),
    "pointwise_conv": (STATUS, (F32, I64, I64, F32, F32_OR_NULL, I64, F32)),
    # training: accel.training_convs and accel.training_norms
    "dw_weight_grad": (STATUS, (F32, F32, I64, I64, I64, I64, I64, I64, F64)),
    "conv_weight_grad": (STATUS, (F32, F32, I64, I64, I64, I64, I64, I64, I64, F64)),
    "channel_axpby": (None, (F32, F32, F32, F32, F32, I64, I64, F32)),
    "affine_silu_to": (None, (F32, F32, F32, I64, I64, F32)),
    "affine_silu_grad": (None, (F32, F32, F32, F32, I64, I64, F32, F64, F64)),
    "channel_axpby_": (None, (F32, F32, F32, F32, F32, I64, I64)),
    "repeat_channels": (None, (F32, I64, I64, I64, F32)),
    "softmax_weighted_sum": (None, (F32, ARRAY, I64, I64, I64, F32)),
    "decoder_input_grad": (None, (F32, I64, I64, I64, I64, I64, I64, F32, F32, F64, F64)),
    "softmax_weighted_sum_grad": (None, (F32, ARRAY, I64, I64, I64, F32, ARRAY, F32)),
}


def _cpu_features() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def missing_features(features: str) -> list[str]:
    """The :data:`REQUIRED_FEATURES` absent from a ``/proc/cpuinfo`` flags line (all of them off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return list(REQUIRED_FEATURES)
    present = set(features.replace(":", " ").split())
    return [flag for flag in REQUIRED_FEATURES if flag not in present]


def _cc() -> str:
    return os.environ.get("CC") or "cc"


def compiler_command() -> list[str] | None:
    """``$CC`` (default ``cc``) split as a shell splits it, so ``CC="ccache gcc"`` or ``CC="gcc -m64"`` work,
    with its program resolved on ``PATH``; ``None`` when there is no such program (or CC does not parse)."""
    try:
        words = shlex.split(_cc())
    except ValueError:  # an unclosed quote
        return None
    program = shutil.which(words[0]) if words else None
    return [program, *words[1:]] if program else None


def _build(compiler: list[str], target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([*compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, target)


def _unavailable(reason: str) -> None:
    warnings.warn(f"lightseg: fused CPU kernels unavailable, using PyTorch's ops ({reason})", RuntimeWarning)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; ``None`` where they are off or cannot be built.

    Fails safe: no compiler, a failed build or load, or a CPU without :data:`REQUIRED_FEATURES`
    gives one warning per process and ``None`` (callers then take PyTorch's ops); only
    ``LIGHTSEG_NATIVE=0`` (or ``LIGHTSEG_ACCEL=0``) turns them off silently."""
    if not (switch("LIGHTSEG_NATIVE") and switch("LIGHTSEG_ACCEL")):
        return None
    features = _cpu_features()
    missing = missing_features(features)
    if missing:
        _unavailable(f"this {platform.machine()} CPU lacks {', '.join(missing)}")
        return None
    command = compiler_command()
    if command is None:
        _unavailable(f"no C compiler {_cc()!r} on PATH; set CC to one")
        return None
    compiler = " ".join(command)
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(), features.encode()])
    ).hexdigest()[:16]
    target = native_cache_dir() / f"kernels-{key}.so"
    built = target.exists()  # then the cache is only read: no folder to make, no write access needed
    try:
        if not built:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(target.parent, os.W_OK | os.X_OK):
                raise PermissionError(f"{target.parent} is not writable")
    except OSError as error:
        _unavailable(f"cannot write the kernel cache {target.parent} ({error.strerror or error}); "
                     "set LIGHTSEG_CACHE to a writable folder")
        return None
    try:
        if not built:
            _build(command, target)
        lib = ctypes.CDLL(str(target))
        for kernel, (restype, kinds) in KERNELS.items():
            function = getattr(lib, kernel)
            function.restype, function.argtypes = restype, [_CTYPES[kind] for kind in kinds]
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        reason = str(getattr(error, "stderr", "") or error).strip() or type(error).__name__
        if isinstance(error, subprocess.CalledProcessError) and not (error.stderr or "").strip():
            reason = f"{compiler} exited with status {error.returncode} and printed nothing"
        if "__kmpc_" in reason:  # clang's -fopenmp: calls into LLVM's libomp, which this process does not load
            reason = (f"{compiler} built them for LLVM's OpenMP runtime, but the kernels run on the GNU OpenMP "
                      f"threads PyTorch has loaded; set CC=gcc ({reason})")
        _unavailable(reason)
        return None
    return lib


def call(kernel: str, *args: torch.Tensor | int | ctypes.Array | None) -> int | None:
    """Run ``kernel`` of :data:`KERNELS` on ``args``, each checked against its declared kind: a
    tensor of the declared dtype (its data pointer is passed), ``None`` only where the C side takes
    NULL, a Python int or float, or a ctypes array. A kernel returning a status raises :class:`MemoryError`
    on failure."""
    restype, kinds = KERNELS[kernel]
    if len(args) != len(kinds):
        raise TypeError(f"{kernel}: {len(kinds)} arguments expected, got {len(args)}")
    values: list[int | ctypes.Array | None] = []
    for i, (kind, arg) in enumerate(zip(kinds, args)):
        if kind in _DTYPES:
            if arg is None and kind in _NULLABLE:
                values.append(None)
                continue
            if not isinstance(arg, torch.Tensor) or arg.dtype != _DTYPES[kind] or arg.device.type != "cpu":
                raise TypeError(f"{kernel}: argument {i} must be a CPU {_DTYPES[kind]} tensor, got {arg!r:.80}")
            values.append(arg.data_ptr())
        elif kind == I64:
            values.append(int(arg))  # type: ignore[arg-type]
        elif kind == REAL:
            values.append(float(arg))  # type: ignore[arg-type]
        elif isinstance(arg, ctypes.Array):
            values.append(arg)
        else:
            raise TypeError(f"{kernel}: argument {i} must be a ctypes array, got {type(arg).__name__}")
    result = getattr(library(), kernel)(*values)
    if restype is STATUS and result != 0:
        raise MemoryError(f"{kernel}: no memory for its scratch buffers")
    return result


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
