"""A real training process killed with SIGKILL mid-epoch resumes and finishes with loadable checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cache_helper import make_cache

from lightseg.data import make_synthetic_dataset
from lightseg.run_folder import load_checkpoint, load_run
from lightseg.training.run import train


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=3, shape=(20, 20, 20), num_classes=3)
    cache = make_cache(raw, tmp_path / "cache")
    run = tmp_path / "run"
    args = dict(model="lunet", model_kwargs={"width": 4, "levels": 3}, epochs=4, iters_per_epoch=6,
                patch_size=(16, 16, 16), batch_size=2, workers=1, augment="light")
    code = (
        "import sys, torch; torch.set_num_threads(1); from lightseg.training.run import train; "
        f"train({str(cache)!r}, {str(run)!r}, **{args!r})"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run / "checkpoint_latest.pth"
    deadline = time.monotonic() + 240
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    time.sleep(0.3)  # into the next epoch's steps
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    interrupted = load_checkpoint(latest)
    assert 1 <= interrupted["epoch"] < 4

    train(cache, run, resume=True, **args)
    final = load_checkpoint(run / "checkpoint_final.pth")
    assert final["epoch"] == 4 and [h["epoch"] for h in final["history"]] == [0, 1, 2, 3]
    model, _, _, _ = load_run(run, "best")
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    assert not list(run.glob(".*.tmp"))  # temp files of the killed writer are cleaned on resume
