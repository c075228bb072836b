"""Pool workers that die at the worst moments, for ``test_signals``.

Imported by name in a forkserver worker, so it lives in its own small module (no pytest, no torch).
"""

from __future__ import annotations

import os
import signal
import struct
import time
from multiprocessing import connection


def case(item: tuple[int, int, str]) -> bytes:
    """Case 0 ends as ``how`` says; other cases wait to be terminated.

    ``"term-main-mid-send"``: its 1 MB result's send writes the length and half the bytes, SIGTERMs
    the main process ``item[1]`` and waits: the main process's pool reader is left inside a message.
    ``"killed-mid-send"``: the same half send, then SIGKILL, as the out-of-memory killer would.
    ``"killed"``: SIGKILL before any result is sent.
    """
    index, main_pid, how = item
    if index:
        time.sleep(600)
    if how == "killed":
        os.kill(os.getpid(), signal.SIGKILL)

    def send_half(self: connection.Connection, buf: bytes) -> None:
        data = bytes(buf)
        self._send(struct.pack("!i", len(data)) + data[: len(data) // 2])
        if how == "killed-mid-send":
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(main_pid, signal.SIGTERM)
        time.sleep(600)

    connection.Connection._send_bytes = send_half
    return b"x" * 1_000_000


def stop_main_as_a_worker_starts() -> None:
    """In the main process: SIGTERM to itself right after the forkserver made a worker, before the
    worker has its start-up data (the window a scheduler's stop can hit)."""
    from multiprocessing import forkserver

    original = forkserver.connect_to_new_process  # what the forkserver's Popen calls

    def connect_then_stop(fds: list[int]) -> tuple[int, int]:
        made = original(fds)
        os.kill(os.getpid(), signal.SIGTERM)
        return made

    forkserver.connect_to_new_process = connect_then_stop


def wait(item: int) -> int:
    time.sleep(600)
    return item
