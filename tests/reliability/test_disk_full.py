"""A full disk in the middle of a write: a clear error, the previous file intact, a rerun completes.

The fault is injected below lightseg, in the file object ``atomic_write`` writes to: after a
byte budget a write stores what fits and raises ``OSError(ENOSPC)``, like a full file system.
(A size-limited mount needs privileges CI does not have.)
"""

from __future__ import annotations

import errno
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from lightseg.run_folder import load_checkpoint

from lightseg.training.checkpoint import save_checkpoint

from .conftest import TINY_TRAIN
from .helpers import assert_files_valid, cli, temp_files


class _FullDisk:
    """A file object that accepts ``budget`` bytes, then fails like a full disk."""

    def __init__(self, handle, budget: list[int]) -> None:
        self._handle, self._budget = handle, budget

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        room = max(0, self._budget[0])
        self._budget[0] -= len(data)
        if len(data) > room:
            self._handle.write(data[:room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


@pytest.fixture
def disk(monkeypatch):
    """``disk.fill(pattern, budget, skip)``: after ``skip`` untouched writes, atomic writes of targets
    matching ``pattern`` get ``budget`` more bytes in all, then fail; ``disk.free()`` ends it."""
    real_fdopen = os.fdopen

    class Disk:
        pattern: str | None = None
        budget = [0]
        skip = 0
        faults = 0

        def fill(self, pattern: str, budget: int = 0, skip: int = 0) -> None:
            self.pattern, self.budget, self.skip = pattern, [budget], skip

        def free(self) -> None:
            self.pattern = None

    state = Disk()

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not (state.pattern and re.search(state.pattern, target) and target.endswith(".tmp")):
            return handle
        if state.skip:
            state.skip -= 1
            return handle
        state.faults += 1
        return _FullDisk(handle, state.budget)

    monkeypatch.setattr(os, "fdopen", fdopen)
    return state


def test_a_checkpoint_write_that_fills_the_disk_keeps_the_previous_checkpoint(tmp_path, disk):
    path = tmp_path / "checkpoint_latest.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "epoch": 1})
    before = path.read_bytes()
    disk.fill(r"checkpoint_latest", budget=1500)  # part of the new file fits
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 2})
    assert info.value.errno == errno.ENOSPC and disk.faults == 1
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert not list(tmp_path.glob(".*"))


def test_training_stops_clearly_and_resumes_after_space_is_freed(base, tmp_path, disk):
    run = tmp_path / "run"
    train = ("train", base["cache"], "-o", run, *TINY_TRAIN, "--epochs", "3")
    disk.fill(r"checkpoint_latest\.pth", budget=100, skip=1)  # epoch 1's checkpoint fits, epoch 2's does not
    code, err = cli(*train)
    assert disk.faults == 1
    assert code == 1 and "No space left on device" in err and "checkpoint_latest.pth" in err, err
    assert load_checkpoint(run / "checkpoint_latest.pth")["epoch"] == 1
    assert_files_valid(run)
    disk.free()
    code, err = cli(*train, "--resume")
    assert code == 0, err
    assert load_checkpoint(run / "checkpoint_final.pth")["epoch"] == 3 and not temp_files(run)


def test_a_prediction_write_that_fills_the_disk(base, tmp_path, disk):
    out = tmp_path / "out"
    disk.fill(r"/out/\.case_ts001", budget=20)
    code, err = cli("predict", "-i", base["images"], "-o", out, "-m", base["run"], "--device", "cpu")
    assert code == 1 and "No space left on device" in err and str(out) in err, err
    assert sorted(p.name for p in out.iterdir()) == ["case_ts000.nii.gz"]  # the finished case; no partial file
    disk.free()
    code, err = cli("predict", "-i", base["images"], "-o", out, "-m", base["run"], "--device", "cpu")
    assert code == 0, err
    assert assert_files_valid(out) == 2
    assert nib.load(out / "case_ts001.nii.gz").shape == (12, 12, 12)


def test_a_preprocessing_write_that_fills_the_disk(base, tmp_path, disk):
    cache = tmp_path / "cache"
    disk.fill(r"case_tr002_label\.npy", budget=64)
    code, err = cli("preprocess", base["raw"], "-o", cache, "--workers", "1")
    assert code == 1 and "No space left on device" in err, err
    assert not (cache / "cases" / "case_tr002.json").exists() and not temp_files(cache)
    assert_files_valid(cache)
    disk.free()
    assert cli("preprocess", base["raw"], "-o", cache, "--workers", "1")[0] == 0
    for name in ("case_tr000", "case_tr001", "case_tr002"):
        assert np.array_equal(np.load(cache / "cases" / f"{name}_label.npy"), np.load(base["cache"] / "cases" / f"{name}_label.npy"))
