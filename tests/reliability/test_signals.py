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

from .conftest import TINY_MODEL
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
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "sigterm-to-all", "worker-killed"])
def test_a_stopped_preprocess_leaves_no_process_behind(big_raw, tmp_path, how):
    """``sigterm-to-all`` is how Slurm's ``scancel`` stops a job step (every process at once);
    ``worker-killed`` is the out-of-memory killer taking one worker."""
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
        process.send_signal(signal.SIGTERM)  # what kill and timeout send first
    elif how == "sigterm-to-all":
        os.killpg(process.pid, signal.SIGTERM)
    elif how == "worker-killed":
        pool_workers = next((kids for kids in map(_descendants, sorted(workers)) if kids), None)  # the forkserver's children
        assert pool_workers, f"no pool worker left to kill: {workers}"
        os.kill(max(pool_workers), signal.SIGKILL)
    else:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
    _, err = process.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], f"left running: {workers}"
    text = err.decode()
    expected = (1, "ended unexpectedly (killed by SIGKILL") if how == "worker-killed" else (
        130, "interrupted; finished work is kept")
    assert process.returncode == expected[0] and "Traceback" not in text and expected[1] in text, text
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


@pytest.mark.parametrize("how", ["term-main-mid-send", "killed-mid-send", "killed"])
def test_a_worker_lost_at_any_moment_ends_the_pool_with_a_clear_error(tmp_path, how):
    """A worker that dies while sending a result bigger than a pipe holds once hung the main process
    for good (the pool's reader waited for the rest of the message), whether the main process was
    being stopped (SIGTERM) or the worker was killed on its own (the out-of-memory killer)."""
    script = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from stalled_result import case\n"
        "from lightseg.data.parallel import map_progress\n"
        "from lightseg.errors import WorkerError\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        f"        map_progress(case, [(i, os.getpid(), {how!r}) for i in (0, 1)], workers=2, progress=False)\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted')\n"
        "    except WorkerError as exc:\n"
        "        print(exc)\n"
    )
    (tmp_path / "run.py").write_text(script)
    process = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    expected = "interrupted" if how == "term-main-mid-send" else "ended unexpectedly (killed by SIGKILL"
    assert process.returncode == 0 and expected in out, (process.returncode, out, err[-2000:])


@pytest.mark.slow
def test_a_killed_data_loading_worker_ends_training_with_a_clear_error(base, tmp_path):
    """The out-of-memory killer taking one DataLoader worker gave PyTorch's traceback."""
    process = subprocess.Popen([sys.executable, "-m", "lightseg", "train", str(base["cache"]), "-o", str(tmp_path / "run"),
                                *TINY_MODEL, "--epochs", "500", "--iters-per-epoch", "50", "--batch", "1", "--patch",
                                "16", "16", "16", "--workers", "2", "--device", "cpu"], env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline, workers = time.monotonic() + 120, set()
    while time.monotonic() < deadline and process.poll() is None and len(workers) < 2:
        time.sleep(0.05)
        workers = _descendants(process.pid)
    assert process.poll() is None, process.communicate()[1].decode()[-2000:]
    time.sleep(1)
    os.kill(min(workers), signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    text = err.decode()
    assert process.returncode == 1 and "Traceback" not in text, text
    assert "a data-loading worker process ended unexpectedly" in text and "--workers" in text, text
    assert not [pid for pid in workers if _alive(pid)]


KILL_A_LOADER_WORKER_DURING = """
import multiprocessing, os, signal, sys, time
import lightseg.training.trainer as trainer

def killing(real):
    def run(*args, **kwargs):
        workers = multiprocessing.active_children()
        if workers and not getattr(killing, "done", False):
            killing.done = True
            os.kill(workers[0].pid, signal.SIGKILL)
            time.sleep(2)  # PyTorch's SIGCHLD handler raises here
        return real(*args, **kwargs)
    return run

if sys.argv[1] == "checkpoint":
    trainer.save_checkpoint = killing(trainer.save_checkpoint)
else:
    trainer.Trainer._final_validation = killing(trainer.Trainer._final_validation)
from lightseg.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("during", ["checkpoint", "final-validation"])
def test_a_loader_worker_killed_outside_a_training_step_is_the_same_clear_error(base, tmp_path, during):
    """PyTorch reports a dead worker from its SIGCHLD handler wherever the main process is: during a
    checkpoint save it was its RuntimeError traceback (2 of 11 loaded runs of the reliability suite)."""
    (tmp_path / "kill.py").write_text(KILL_A_LOADER_WORKER_DURING)
    done = subprocess.run([sys.executable, str(tmp_path / "kill.py"), during, "train", str(base["cache"]), "-o",
                           str(tmp_path / "run"), *TINY_MODEL, "--epochs", "2", "--iters-per-epoch", "2", "--batch", "1",
                           "--patch", "16", "16", "16", "--workers", "2", "--device", "cpu"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, start_new_session=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "a data-loading worker process ended unexpectedly (killed by SIGKILL" in done.stderr, done.stderr[-3000:]


def test_a_stop_while_a_worker_starts_prints_no_traceback(tmp_path):
    """SIGTERM between the forkserver making a worker and the worker getting its start-up data left
    it reading an empty pipe: "EOFError: Ran out of input" and a traceback, under the one line."""
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from stalled_result import stop_main_as_a_worker_starts, wait\n"
        "from lightseg.data.parallel import map_progress\n"
        "if __name__ == '__main__':\n"
        "    stop_main_as_a_worker_starts()\n"
        "    try:\n"
        "        map_progress(wait, [0, 1], workers=2, progress=False)\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted')\n"
    )
    (tmp_path / "run.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py")], env=subprocess_env(), capture_output=True,
                          text=True, timeout=60, start_new_session=True)
    assert done.returncode == 0 and done.stdout.strip() == "interrupted", (done.returncode, done.stderr[-2000:])
    time.sleep(1)  # a worker's traceback is written as it exits
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
