"""A real 2-process torchrun (gloo on CPU): trains, only rank 0 writes, the checkpoint loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from cache_helper import make_cache

from lightseg.data import make_synthetic_dataset
from lightseg.training.checkpoint import load_checkpoint, load_run
from lightseg.training.distributed import DistInfo, all_gather_objects, all_reduce_sum, init_distributed


def test_single_process_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == DistInfo() and DistInfo().is_main and not DistInfo().enabled
    assert all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    assert all_gather_objects({"a": 1}) == [{"a": 1}]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=4, shape=(20, 20, 20), num_classes=3)
    cache = make_cache(raw, tmp_path / "cache")
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lightseg", "train",
        str(cache), "-o", str(run), "--model", "lunet", "--model-kwargs", '{"width": 4, "levels": 3}', "--epochs", "2",
        "--iters-per-epoch", "2", "--patch", "16", "16", "16", "--batch", "2", "--workers", "0", "--device", "cpu",
        "--augment", "none", "--val-fraction", "0.5",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run / "training_log.txt").read_text()
    assert "2 process(es)" in log and log.count("epoch 2/2") == 1  # one writer: rank 0
    assert not list(run.glob(".*.tmp"))
    state = load_checkpoint(run / "checkpoint_final.pth")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    model, config, _, _ = load_run(run, "final")
    assert config.model == "lunet"
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert len(summary["cases"]) == 2  # both validation cases, one per rank, gathered on rank 0
