"""Process groups for ``torchrun``: DDP with gloo on CPU and NCCL on GPU.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them training runs in one
process and every helper here is a no-op, so the trainer has a single code path.

Two things DDP needs that single-process training does not:

* every parameter DDP watches must get a gradient each step. Deep supervision's lowest head has
  weight 0, and heads beyond the first are unused without deep supervision, so
  :func:`freeze_unreached` finds, once per wrapped model, the parameters no used output depends
  on and stops them requiring gradients; DDP then never waits for them. This costs one forward
  and backward at wrap time, where ``find_unused_parameters=True`` would walk the autograd graph
  every step (and ``static_graph`` would still all-reduce gradients that are always zero);
* the wait for rank 0's preprocessing (:func:`wait_for_main`) can last far longer than the
  collective timeout (30 min gloo, 10 min NCCL), so it uses its own gloo group with
  :data:`PREPROCESS_TIMEOUT`; training collectives keep the short default so a hung rank fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

PREPROCESS_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (once), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wait_for_main(work: Callable[[], Any]) -> Any:
    """Rank 0 runs ``work`` (preprocessing) while the others wait up to :data:`PREPROCESS_TIMEOUT`;
    returns ``work()`` on rank 0 and None elsewhere. Just ``work()`` in a single process."""
    if not dist.is_initialized():
        return work()
    group = dist.new_group(backend="gloo", timeout=PREPROCESS_TIMEOUT)
    try:
        result = work() if dist.get_rank() == 0 else None
    finally:  # a failing rank 0 still releases the others, which then fail on the missing cache
        dist.barrier(group=group)
        dist.destroy_process_group(group)
    return result


def freeze_unreached(model: nn.Module, used_outputs: Callable[[], Sequence[torch.Tensor]]) -> list[str]:
    """Stop ``requires_grad`` on the parameters none of ``used_outputs()`` depends on; returns their names.

    ``used_outputs`` runs the model (in training mode) and returns the outputs the loss reads with
    a non-zero weight. Only freezes, never un-freezes (masked PSP-Seg branches stay masked);
    buffers (batch-norm statistics) are restored afterwards, so the probe leaves no trace.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.enable_grad():
        outputs = list(used_outputs())
        total = sum(o.float().sum() for o in outputs)
        grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    frozen = [n for (n, p), g in zip(named, grads) if g is None]
    for (_, p), g in zip(named, grads):
        if g is None:
            p.requires_grad_(False)
    return frozen


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned); identity in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
