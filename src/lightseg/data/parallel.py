"""Run one function per case over a small process pool, with a progress bar.

Data-set stages (verify, MSD conversion, demo data) are independent per case and bound by
gzip and NumPy, so processes (not threads) give the speed-up. Workers start with
``forkserver``: forking a parent that already runs torch or OpenMP threads can deadlock.

Stopping: workers ignore SIGINT, so Ctrl-C (sent to the whole process group) reaches the main
process alone and prints one line, not one traceback per worker. SIGTERM (``kill``, ``timeout``,
Slurm) is turned into the same interruption while the pool runs, so the main process stops its
workers before it exits instead of dying with the forkserver and the workers left running.
A worker killed on its own (the out-of-memory killer) ends the stage with a ``WorkerError``
saying so; the main process checks its workers itself, as the pool may wait for good for a
result that worker was halfway through sending. Finished cases are kept in every case: every
file is written atomically.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

from lightseg.errors import WorkerError

T = TypeVar("T")
R = TypeVar("R")

WATCH_S = 0.5  # how often the main process checks that every worker is still alive


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
        started: dict[int, multiprocessing.process.BaseProcess] = {}  # every worker the pool made
        # SIGTERM raises KeyboardInterrupt in the main thread, so the cleanup below runs
        with _signal_handlers({signal.SIGTERM: _raise_interrupt}):
            try:
                with _signals_deferred():  # a worker cut off while it starts prints a traceback of its own
                    futures = [pool.submit(fn, item) for item in items]
                pending = set(futures)
                while pending:
                    started.update(_workers_of(pool))
                    done, pending = wait(pending, timeout=WATCH_S, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                        bar.update()
                    _raise_if_a_worker_died(started.values(), desc)
                return [future.result() for future in futures]
            except (KeyboardInterrupt, WorkerError, BrokenProcessPool) as exc:
                started.update(_workers_of(pool))
                _stop_workers(pool, started.values())
                if isinstance(exc, BrokenProcessPool):
                    _raise_if_a_worker_died(started.values(), desc)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)


def _workers_of(pool: ProcessPoolExecutor) -> dict[int, multiprocessing.process.BaseProcess]:
    """The pool's worker processes by pid (CPython's private ``_processes``; empty if it changes)."""
    return dict(getattr(pool, "_processes", None) or {})


def _ignore_interrupts() -> None:
    """In each worker: Ctrl-C is the main process's to handle (it stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signal_handlers(handlers: dict[signal.Signals, Callable | signal.Handlers]) -> Iterator[None]:
    """``handlers`` installed while the block runs (in the main thread; elsewhere, where Python
    allows no handlers, the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT or SIGTERM arriving while the block runs raises ``KeyboardInterrupt`` once it is done
    (the submits start the workers: a stop in between left a forkserver child without its start-up
    data, and it printed "EOFError: Ran out of input" with a traceback)."""
    received: list[int] = []
    with _signal_handlers({signum: lambda signum, frame: received.append(signum)
                           for signum in (signal.SIGINT, signal.SIGTERM)}):
        yield
    if received:
        raise KeyboardInterrupt(f"signal {received[0]}")


def _raise_if_a_worker_died(workers: Iterable[multiprocessing.process.BaseProcess], desc: str) -> None:
    """A worker ends only when the pool shuts down, so one that has ended was killed, most often by
    the system's out-of-memory killer. The pool may never notice: it waits for good for the rest of
    a result that worker was sending. A worker stopped by SIGTERM or SIGINT (a job scheduler
    stopping every process of the job) is an interruption, as it is for the main process."""
    codes = [worker.exitcode for worker in workers if worker.exitcode is not None]
    killed = [code for code in codes if code not in (-signal.SIGTERM, -signal.SIGINT)]
    if killed:
        code = min(killed)  # a signal first: a worker's exit status can be the echo of another's death
        how = how_it_ended(code)
        likely = ", most often the system's out-of-memory killer" if code == -signal.SIGKILL else ""
        raise WorkerError(
            f"a worker process of '{desc or 'the pool'}' ended unexpectedly ({how}{likely}) with cases still to "
            "do; rerun with fewer workers (--workers 1 needs the least memory) or on a machine with more memory; "
            "finished cases are kept")
    if codes:
        raise KeyboardInterrupt(f"a worker was stopped by {_signal_name(-codes[0])}")


def how_it_ended(exitcode: int) -> str:
    """A dead process's exit code in words: "killed by SIGKILL" or "exit status 1"."""
    return f"killed by {_signal_name(-exitcode)}" if exitcode < 0 else f"exit status {exitcode}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal, which has no name of its own
        return f"signal {signum}"


def _stop_workers(pool: ProcessPoolExecutor, workers: Iterable[multiprocessing.process.BaseProcess]) -> None:
    """Terminate the workers at once: a case in flight is lost, never half-written (atomic writes).

    Ctrl-C pressed again, or a second SIGTERM, is ignored until this is done: cut short, it could
    leave the pool's reader below waiting for good."""
    with _signal_handlers({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}):
        workers = list(workers)
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.terminate()
        for worker in workers:
            worker.join(timeout=5)
        # A worker killed while sending a result leaves part of a message in the result pipe, and
        # the pool's manager thread waits in that read for bytes no one will send (it would hang
        # ``shutdown`` and the interpreter's exit). Our copy of the pipe's write end is the last
        # one open now: closing it ends that read with EOF, which the pool treats as broken.
        writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)  # CPython 3.10-3.13's names
        if writer is not None:
            writer.close()

