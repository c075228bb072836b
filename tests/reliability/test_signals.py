"""SIGTERM and Ctrl-C during a multi-process ``preprocess``: every process it started is gone
within seconds, one line is printed (no traceback per worker), finished cases are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightseg.data import make_synthetic_dataset

from .helpers import assert_files_valid, subprocess_env


def _descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def big_raw(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("signals") / "raw", num_cases=12, shape=(48, 48, 48))


def _interruptible() -> None:
    """In the child: Ctrl-C as a terminal delivers it. A test run started in the background
    (``cmd &`` in a script) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_a_stopped_preprocess_leaves_no_process_behind(big_raw, tmp_path, how):
    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-m", "lightseg", "preprocess", str(big_raw), "-o", str(cache),
                                "--workers", "2"], env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_interruptible)
    deadline, workers = time.monotonic() + 120, set()
    while time.monotonic() < deadline and process.poll() is None and len(workers) < 3:  # forkserver + 2 workers
        time.sleep(0.05)
        workers = _descendants(process.pid)
    assert process.poll() is None, process.communicate()[1].decode()[-2000:]
    time.sleep(0.5)
    workers |= _descendants(process.pid)
    if how == "sigterm":
        process.send_signal(signal.SIGTERM)  # what kill, timeout and Slurm send first
    else:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    _, err = process.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], f"left running: {workers}"
    text = err.decode()
    assert process.returncode == 130 and "Traceback" not in text and "interrupted; finished work is kept" in text, text
    assert_files_valid(cache)


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_reader_that_stops_early_ends_the_command_quietly(closed):
    """``lightseg ... | head``: with the pipe's reader gone, exit 141 as SIGPIPE would, no traceback and
    no advice about writable folders (the old OSError message) on the stream that is still open."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already gone: the first write fails
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, closed: write_end}
    # `recipes` prints its table on stdout; `info` of a missing file prints its error on stderr
    argv = ["recipes"] if closed == "stdout" else ["info", "/no/such/file.nii.gz"]
    done = subprocess.run([sys.executable, "-m", "lightseg", *argv], env=subprocess_env(), timeout=120, text=True,
                          **streams)
    os.close(write_end)
    other = done.stderr if closed == "stdout" else done.stdout
    assert done.returncode == 141 and "Traceback" not in other and "writable folder" not in other, (done.returncode, other)
