"""benchmarks/speed.py's busy neighbour: the spinner process runs at the asked niceness and is
never left behind (an exception in the block, or the benchmark process dying)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"


def _speed():
    sys.path.insert(0, str(SPEED.parent))
    try:
        spec = importlib.util.spec_from_file_location("speed_under_test", SPEED)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SPEED.parent))


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` has exited (absent, or a zombie nobody has reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_spinner_runs_niced_and_is_killed_when_the_block_fails():
    speed = _speed()
    with speed.spinner(None) as none:
        assert none is None
    with pytest.raises(KeyboardInterrupt):
        with speed.spinner(19) as process:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            assert int(fields[16]) == 19 and fields[0] in ("R", "S")  # nice value, running
            raise KeyboardInterrupt
    assert process.poll() is not None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_spinner_stops_by_itself_when_the_benchmark_dies():
    code = (f"import os, sys; sys.path.insert(0, {str(SPEED.parent)!r}); import speed\n"
            "process = speed.spinner(0).__enter__()\nprint(process.pid, flush=True)\nos._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pid = int(done.stdout.split()[0])
    assert _gone(pid)
