"""Run one function per case over a small process pool, with a progress bar.

Data-set stages (verify, MSD conversion, demo data) are independent per case and bound by
gzip and NumPy, so processes (not threads) give the speed-up. Workers start with
``forkserver``: forking a parent that already runs torch or OpenMP threads can deadlock.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterable, TypeVar

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
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
        try:
            futures = [pool.submit(fn, item) for item in items]
            for future in as_completed(futures):
                future.result()
                bar.update()
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
