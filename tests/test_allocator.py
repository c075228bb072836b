"""lightseg.allocator in fresh interpreters (its malloc settings last for the whole process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lightseg.allocator import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="malloc settings are glibc's")

SCRIPT = """
import resource, sys, torch
from lightseg.allocator import release_free_memory, reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
torch.empty(2**26).fill_(1.0)  # 256 MB, freed at once
before, kept = faults(), rss_mb()
torch.empty(2**26 - 2**16).fill_(1.0)  # a little smaller: aligned allocations ask for a little more than their size
faulted = faults() - before
release_free_memory()
print(applied, faulted, kept - rss_mb())
"""


def _run(mode: str, **env: str) -> tuple[bool, int, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()  # fmt: skip
    return out[0] == "True", int(out[1]), float(out[2])


def test_freed_memory_is_reused_without_page_faults_and_can_be_released():
    _, faults_default, _ = _run("default")
    applied, faults_reused, released_mb = _run("reuse")
    assert applied
    assert faults_default > 30_000  # 256 MB of fresh 4 KiB pages
    assert faults_reused < faults_default / 20  # the freed 256 MB came back without faulting
    assert released_mb > 200  # and release_free_memory handed it to the OS


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"LIGHTSEG_REUSE_MEMORY": "0"}])
def test_a_user_malloc_setting_or_opt_out_is_left_alone(env):
    applied, faults, _ = _run("reuse", **env)
    assert not applied and faults > 30_000
