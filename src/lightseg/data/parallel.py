"""Run one function per case over a small process pool, with a progress bar.

Data-set stages (verify, MSD conversion, demo data) are independent per case and bound by
gzip and NumPy, so processes (not threads) give the speed-up. Workers start with
``forkserver``: forking a parent that already runs torch or OpenMP threads can deadlock.

Stopping: workers ignore SIGINT, so Ctrl-C (sent to the whole process group) reaches the main
process alone and prints one line, not one traceback per worker. SIGTERM (``kill``, ``timeout``,
Slurm) is turned into the same interruption while the pool runs, so the main process stops its
workers before it exits instead of dying with the forkserver and the workers left running.
Finished cases are kept either way: every file is written atomically.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """At most 4 processes: these stages read and write big files, more mostly adds memory."""
    return max(1, min(4, os.cpu_count() or 1))


def map_progress(
    fn: Callable[[T], R], items: Iterable[T], workers: int = 1, desc: str = "", progress: bool = True
) -> list[R]:
    """``[fn(x) for x in items]`` in order, on ``workers`` processes (1: in this process).

    ``fn`` must be a module-level function (it is pickled). The first exception raised by a
    worker cancels the cases not yet started and is re-raised here.
    """
    items = list(items)
    workers = max(1, min(workers, len(items)))
    with tqdm(total=len(items), desc=desc, unit="case", disable=not progress) as bar:
        if workers == 1:
            results = []
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_ignore_interrupts)
        with _sigterm_interrupts():
            try:
                futures = [pool.submit(fn, item) for item in items]
                for future in as_completed(futures):
                    future.result()
                    bar.update()
                return [future.result() for future in futures]
            except KeyboardInterrupt:
                _stop_workers(pool)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupts() -> None:
    """In each worker: Ctrl-C is the main process's to handle (it stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` in the main thread while the block runs (so cleanup runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the workers at once: a case in flight is lost, never half-written (atomic writes)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        with contextlib.suppress(OSError):
            process.terminate()
    for process in processes:
        process.join(timeout=5)
