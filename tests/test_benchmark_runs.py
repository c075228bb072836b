"""The fresh-process training runner: a training does not outlive the process that started it, nor
leaves its temporary folder behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

import lightseg
from lightseg.benchmark.runs import TrainJob
from lightseg.training.config import TrainConfig
from lightseg.training.run import training_config

PARENT = """
import json, sys
from lightseg.benchmark.runs import TrainJob, run_training
run_training(TrainJob.from_json(json.loads(sys.argv[1])))
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
def test_training_ends_when_its_parent_is_killed(tmp_path, synthetic_dataset) -> None:
    cache = tmp_path / "cache"
    lightseg.preprocess_dataset(synthetic_dataset, cache, patch_size=(16, 16, 16))
    run_dir = tmp_path / "run"
    options = dict(model="lunet", model_kwargs={"width": 2, "levels": 3}, epochs=10_000, iters_per_epoch=2, patch_size=(16, 16, 16),
                   batch_size=2)
    job = TrainJob(training_config(cache, **options), str(run_dir), workers=0)
    # the log goes where the parent's stderr goes, as for a benchmark run in a terminal; a pipe
    # would end the child on its next write anyway
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(asdict(job))], stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "training_log.txt").is_file():  # the child is training
            assert parent.poll() is None and time.monotonic() < deadline, "the training never started"
            time.sleep(0.2)
        children += _children(parent.pid)
        assert len(children) == 1
        job_folder = Path(Path(f"/proc/{children[0]}/cmdline").read_bytes().split(b"\0")[-3].decode()).parent
        assert (job_folder / "job.json").is_file()
        parent.send_signal(signal.SIGTERM)  # no cleanup runs in the parent
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _alive(children[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(children[0]), "the training outlived its parent"
        assert not job_folder.exists(), "the parent's temporary folder was left behind"
    finally:
        for pid in [parent.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_job_trains_the_configuration_lightseg_train_writes(tmp_path, synthetic_dataset) -> None:
    from lightseg.benchmark.runs import scaled_pruning_options, train_and_measure
    from lightseg.cli import main
    from lightseg.errors import ConfigError

    cache = tmp_path / "cache"
    lightseg.preprocess_dataset(synthetic_dataset, cache, patch_size=(16, 16, 16))
    kwargs = {"width": 2, "levels": 3}
    job = TrainJob(training_config(cache, "lunet", model_kwargs=kwargs, epochs=1, iters_per_epoch=1, patch_size=(16, 16, 16),
                                   batch_size=1, lr=0.02, seed=3, augment="none"), str(tmp_path / "job"), workers=0, threads=1)
    flags = ["--model", "lunet", "--model-kwargs", json.dumps(kwargs), "--epochs", "1", "--iters-per-epoch", "1",
             "--patch", "16", "16", "16", "--batch", "1", "--lr", "0.02", "--seed", "3", "--augment", "none"]
    assert main(["train", str(cache), "-o", str(tmp_path / "cli"), *flags, "--device", "cpu", "--workers", "0"]) == 0
    assert TrainConfig.read(tmp_path / "cli" / "config.json") == job.config  # the same object, field for field
    assert TrainJob.from_json(json.loads(json.dumps(asdict(job)))) == job  # as the fresh process reads it
    train_and_measure(job)
    assert TrainConfig.read(tmp_path / "job" / "config.json") == job.config  # and the job trains exactly that

    pruned = training_config(cache, "pspseg", patch_size=(16, 16, 32), pruning="progressive",
                             **scaled_pruning_options(20, calibration_batches=5))
    assert (pruned.pruning.mode, pruned.pruning.window, pruned.pruning.calibration_batches) == ("progressive", 2, 5)
    with pytest.raises(ConfigError, match=r"unknown training options \['pruning_windows'\]"):
        training_config(cache, "pspseg", patch_size=(16, 16, 32), pruning_windows=3)
