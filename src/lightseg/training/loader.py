"""One training loader for the whole run, with persistent workers.

Rebuilding a ``DataLoader`` every epoch restarts its worker processes (seconds each, per epoch).
With persistent workers the workers keep their own copy of the :class:`PatchSampler`, so changes
made in the main process (the epoch, a curriculum's patch and batch size) would never reach
them. Here the main process sends each step's full description, ``(epoch, index, patch, batch)``,
as the sample key; a worker copies it into its sampler and draws batch ``index``. A batch stays a
function of ``(seed, rank, epoch, index)`` and the sizes, whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightseg.data.parallel import how_it_ended
from lightseg.data.sampling import PatchSampler
from lightseg.errors import WorkerError

Key = tuple[int, int, tuple[int, int, int], int]


class _StepKeys(Sampler[Key]):
    """Main process: the keys of the current epoch, read from the live sampler at ``iter()``."""

    def __init__(self, sampler: PatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[Key]:
        s = self.sampler
        return iter([(s.epoch, i, s.patch_size, s.batch_size) for i in range(s.iters_per_epoch)])

    def __len__(self) -> int:
        return self.sampler.iters_per_epoch


class _KeyedBatches(Dataset):
    """Worker: the batch a key describes, drawn by this worker's copy of the sampler."""

    def __init__(self, sampler: PatchSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index, patch, batch = key
        self.sampler.set_epoch(epoch)
        self.sampler.set_patch_size(patch)
        self.sampler.set_batch_size(batch)
        return self.sampler.batch(index)


def patch_loader(sampler: PatchSampler, workers: int, pin_memory: bool) -> DataLoader:
    """A loader over ``sampler``'s batches; iterate it once per epoch, after the epoch's changes."""
    return DataLoader(
        _KeyedBatches(sampler),
        batch_size=None,
        sampler=_StepKeys(sampler),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
    )


@contextlib.contextmanager
def loader_workers_checked(loader: DataLoader) -> Iterator[None]:
    """A loader worker that died while the block runs (most often by the out-of-memory killer) is a
    :class:`~lightseg.errors.WorkerError` with advice, whatever form its death takes in the main
    process: PyTorch's "DataLoader worker (pid N) is killed by signal" (raised from its SIGCHLD
    handler, anywhere in the block) or a connection reset while a batch was being handed over.
    Other errors (a full disk while saving, a bug) pass unchanged and at once."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as exc:
        if isinstance(exc, RuntimeError) and not str(exc).startswith("DataLoader worker (pid"):
            raise
        cause: BaseException = exc
        workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []  # PyTorch's private names
        dead: list[int] = []
        for _ in range(40):  # a killed worker closes its sockets before it can be reaped: give it 2 s
            try:
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead or not workers:
                    break
                time.sleep(0.05)
            except RuntimeError as late:  # PyTorch's SIGCHLD handler, saying it while we wait
                cause = late
                break
        if not dead and not str(cause).startswith("DataLoader worker (pid"):
            raise
        how = how_it_ended(dead[0]) if dead else str(cause).strip()
        raise WorkerError(
            f"a data-loading worker process ended unexpectedly ({how}), most often the system's out-of-memory "
            "killer; rerun with fewer --workers (0 loads in the training process) or a smaller --batch or --patch, "
            "and add --resume to continue from the last checkpoint") from cause

