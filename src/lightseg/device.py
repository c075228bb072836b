"""What the compute device decides: precision, memory format, cuDNN autotuning, blending, workers.

Every default here applies to one device type and is chosen from measurements on that type, or
left at PyTorch's own default where none were taken (docs/training.md, "GPU"):

* precision: ``fp32`` on the CPU (CPU autocast slows lightseg's 3D convs); on CUDA ``bf16``
  where the GPU supports it (fp32's range, no loss scaling), else ``fp16`` with a GradScaler
  whose overflow steps are skipped, not fatal;
* memory format: ``channels_last_3d`` was measured faster on the CPU only (a model's
  ``channels_last`` attribute), so CUDA stays contiguous unless a model declares
  ``channels_last_cuda = True`` from a CUDA measurement;
* ``cudnn.benchmark`` on CUDA: training patches and inference tiles have fixed shapes, so each
  shape is autotuned once (a PGPS curriculum adds one tuning per stage);
* sliding-window blending on the GPU when the blended volume fits in a quarter of the free GPU
  memory (one copy per scan instead of one per tile), with several tiles per network call
  (:data:`lightseg.inference.CUDA_BATCH_TILES`);
* loader workers: persistent, and on CUDA as many as the CPUs allow per process (capped at 12,
  nnU-Net's default), since 4 x 128^3 augmentation per step is the usual bottleneck.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import ContextManager, Sequence

import torch

from lightseg.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BLEND_MEMORY_SHARE = 0.25  # blend on the GPU when the output takes at most this share of its free memory
MAX_CUDA_WORKERS = 12  # nnU-Net's default number of augmentation processes per GPU


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def default_precision(device: str | torch.device) -> str:
    """``fp32`` on the CPU; ``bf16`` on a GPU that supports it, else ``fp16``."""
    if not is_cuda(device):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_precision(precision: str, device: str | torch.device) -> None:
    """Refuse a precision ``device`` cannot train or predict in (ConfigError with the fix)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision != "fp32" and not is_cuda(device):
        raise ConfigError(f"--precision {precision} needs a CUDA GPU; on the CPU lightseg runs fp32 (drop --precision)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU does not support bfloat16; use --precision fp16 (or fp32)")


def runnable_precision(stored: str, device: str | torch.device) -> tuple[str, str | None]:
    """The precision a stored run (resumed, validated or predicted) uses on ``device``, and a note
    when it differs: a GPU run on the CPU falls back to fp32, a bf16 run on a GPU without bf16 to fp16."""
    if stored == "fp32":
        return stored, None
    if not is_cuda(device):
        return "fp32", f"the run was trained in {stored} on a GPU; the CPU runs it in fp32"
    if stored == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp16", "the run was trained in bf16; this GPU does not support it, so it runs in fp16"
    return stored, None


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Mixed-precision context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on CUDA (bf16 has fp32's range and needs none). A step whose
    gradients overflow is skipped and the scale halved; the trainer does not stop for it."""
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")


def prefers_channels_last(model: torch.nn.Module, device: str | torch.device = "cpu") -> bool:
    """Whether ``model`` runs faster in ``channels_last_3d`` on ``device``.

    On the CPU: the model's ``channels_last`` attribute (default True). The layout makes
    oneDNN's depthwise and grouped 3D convs 3-4x faster (LightMedSeg's CPU forward 1.46x
    overall) but slows wide dense convs: plainunet is 1.27x slower in it, so it declares
    ``channels_last = False`` (docs/benchmarks.md, ``benchmarks/speed.py``). On CUDA: the
    model's ``channels_last_cuda`` attribute, default False, since no CUDA measurement backs it.
    """
    if is_cuda(device):
        return bool(getattr(model, "channels_last_cuda", False))
    return bool(getattr(model, "channels_last", True))


def configure_backend(device: str | torch.device) -> None:
    """Turn on cuDNN autotuning for CUDA runs (fixed patch and tile shapes); nothing on the CPU."""
    if is_cuda(device):
        torch.backends.cudnn.benchmark = True


def blend_device(device: torch.device, out_channels: int, spatial_shape: Sequence[int]) -> torch.device:
    """Where sliding-window tiles are blended: on the GPU when the blended logits and their
    weight map (float32) fit in :data:`BLEND_MEMORY_SHARE` of its free memory, else on the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    needed = 4 * (out_channels + 1) * math.prod(int(s) for s in spatial_shape)
    free, _ = torch.cuda.mem_get_info(device)
    return device if needed <= BLEND_MEMORY_SHARE * free else torch.device("cpu")


def allowed_cpus() -> set[int] | None:
    """The CPU numbers this process may run on (its affinity mask), or ``None`` where the OS does not say."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def available_cpus() -> int:
    """How many CPUs this process may run on (:func:`allowed_cpus`, else all of them)."""
    allowed = allowed_cpus()
    return len(allowed) if allowed is not None else (os.cpu_count() or 1)


def default_workers(device: str | torch.device, world_size: int = 1) -> int:
    """Loader worker processes per training process: 2 on the CPU (the network shares the cores),
    on CUDA the CPUs this process can have (one kept for it), between 2 and :data:`MAX_CUDA_WORKERS`."""
    if not is_cuda(device):
        return 2
    return max(2, min(MAX_CUDA_WORKERS, available_cpus() // max(1, world_size) - 1))
