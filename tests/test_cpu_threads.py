"""Prediction's thread count from the CPUs other processes leave free (lightseg.inference.cpu_threads)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from lightseg.inference import cpu_threads
from lightseg.inference.cpu_threads import CpuTimes, FreeCpuMeter, free_cpus, read_cpu_times
from lightseg.inference.sliding import TorchExecutor, WindowSettings, sliding_window

STAT = "cpu  {user} {nice} {system} {idle} {iowait} 0 0 0 0 0\ncpu0 1 2 3 4 5 0 0 0 0 0\nintr 1 2 3\n"


def _times(user: int, nice: int, idle: int, own: float = 0.0, system: int = 0, iowait: int = 0) -> CpuTimes:
    return read_cpu_times(STAT.format(user=user, nice=nice, system=system, idle=idle, iowait=iowait), own)


def test_reading_takes_idle_waiting_and_niced_time_as_free():
    times = _times(user=7, nice=5, idle=11, system=3, iowait=2)
    assert times == CpuTimes(total=28, free=18, own_seconds=0.0)


@pytest.mark.parametrize(
    "spent, free",
    [
        ({"idle": 200}, 2),  # a quiet machine
        ({"user": 100, "idle": 100}, 1),  # another process keeps one core busy
        ({"nice": 100, "idle": 100}, 2),  # ... at a lower priority: it yields its core
        ({"user": 200, "own": 2.0}, 2),  # this process itself used both cores
        ({"user": 200}, 1),  # both cores busy with others: still one thread
        ({"user": 140, "own": 1.33, "idle": 60}, 2),  # two threads of ours beside a light load
        ({"user": 200, "own": 1.33}, 1),  # two of ours beside one busy process: 4/3 of 2 cores
    ],
)
def test_free_cpus_between_two_readings(spent, free):
    before = _times(user=1000, nice=0, idle=1000)
    after = _times(user=1000 + spent.get("user", 0), nice=spent.get("nice", 0), idle=1000 + spent.get("idle", 0),
                   own=spent.get("own", 0.0))
    assert free_cpus(before, after, cpus=2, ticks_per_second=100) == free


def test_only_the_cpus_this_process_may_run_on_count():
    """A cluster job pinned to 2 CPUs of a node whose other CPUs are busy: those CPUs' lines alone."""
    node = "cpu  {a} 0 0 {b} 0 0 0 0 0 0\ncpu0 {a} 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 {h} 0 0 0 0 0 0\ncpu2 0 0 0 {h} 0 0 0 0 0 0\n"
    before = read_cpu_times(node.format(a=0, b=0, h=0), 0.0, cpus={1, 2})
    after = read_cpu_times(node.format(a=100, b=200, h=100), 0.0, cpus={1, 2})
    assert (after.total, after.free) == (200, 200)
    assert free_cpus(before, after, cpus=2, ticks_per_second=100) == 2
    whole = [read_cpu_times(node.format(a=a, b=b, h=h), 0.0) for a, b, h in ((0, 0, 0), (100, 200, 100))]
    assert (whole[1].total, whole[1].free) == (300, 200)  # the aggregate line counts the busy CPU too


def test_too_short_an_interval_says_nothing():
    before = _times(user=0, nice=0, idle=0)
    assert free_cpus(before, _times(user=0, nice=0, idle=3), cpus=2, ticks_per_second=100) is None


def test_the_meter_reads_this_machine(monkeypatch):
    meter = FreeCpuMeter()
    monkeypatch.setattr(cpu_threads, "MIN_TICKS_PER_CPU", 0)
    found = meter()
    assert found is None or 1 <= found <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu_threads, "STAT", cpu_threads.Path("/nonexistent/stat"))
    assert FreeCpuMeter()() is None  # no /proc/stat (not Linux): the count is left alone


def test_the_executor_sets_the_threads_per_image_and_never_above_its_start():
    net = nn.Conv3d(1, 2, 1).eval()
    settings = WindowSettings((8, 8, 8), 0.5)
    threads = torch.get_num_threads()
    seen = []

    class Meter:
        def __init__(self, answers):
            self.answers = list(answers)

        def __call__(self):
            return self.answers.pop(0)

    class Recording(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return net(x)

    try:
        torch.set_num_threads(2)
        executor = TorchExecutor(Recording(), settings, free_cpus=Meter([1, None, 64]))
        image = np.zeros((1, 8, 8, 8), np.float32)
        for _ in range(3):
            sliding_window(executor, settings, image)
        assert seen == [1, 1, 2]  # one free CPU; no reading: unchanged; capped at the start's 2
        assert torch.get_num_threads() == 2  # the caller's count outside the network calls
    finally:
        torch.set_num_threads(threads)


def test_omp_num_threads_keeps_the_users_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not cpu_threads.adapts_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads.adapts_threads()
