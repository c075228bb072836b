"""Train one configuration in a fresh process and measure it: wall time, peak memory, parameters.

A fresh interpreter per training (``python -m lightseg.benchmark.runs JOB.json RESULT.json``)
makes the process's peak memory belong to that training alone, and no allocator cache, oneDNN
kernel cache or thread pool left by an earlier run colours its time; the same reason
:func:`lightseg.benchmark.profile.benchmark_models` profiles each model in its own process.

What :class:`TrainResult` holds:

* ``wall_s``: the whole :func:`lightseg.training.run.train` call (model build, loader start,
  every epoch, checkpoints). The cache is built beforehand, so no preprocessing is counted.
* ``train_loop_s``: the sum of the epochs' ``epoch_time`` from the run's history.
* ``train_s``: from the first epoch's start to the last epoch's end: epochs, per-epoch
  validation, checkpoints and PSP-Seg's pruning searches, without model build and the final
  full-case validation (the training time papers report).
* ``peak_mb`` (:mod:`lightseg.benchmark.memory`): CPU: the peak resident set size of the
  training process (``VmHWM``, reset just before training) minus its resident size at that
  moment, i.e. weights, optimizer state, activations, batches and workspace;
  ``process_peak_mb`` is the absolute peak (interpreter and torch included). DataLoader worker
  processes are not counted (``workers=0`` counts data loading too). CUDA:
  ``torch.cuda.max_memory_allocated`` above the memory allocated before.
* ``params``: of the final model, so a pruned PSP-Seg counts what survived; ``architecture``
  is its ``architecture.json`` (``None`` for unpruned models).

An interrupted training is not resumed: its folder is removed and it starts again, so every
wall time is one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from lightseg.benchmark.memory import memory_peak, memory_start
from lightseg.errors import TrainingError
from lightseg.io import write_json
from lightseg.training.callbacks import Callback
from lightseg.training.config import TrainConfig


@dataclass(frozen=True)
class TrainJob:
    """One training: its configuration, the run folder and how this process runs it.

    ``config`` is the resolved :class:`~lightseg.training.config.TrainConfig`, the object
    ``lightseg train`` writes to ``config.json`` (its cache included): make it with
    :func:`lightseg.training.run.training_config` from the cache and the option names of
    ``lightseg train`` and its recipes, so a benchmark arm is configured, and its options
    checked, as any training is, before any process starts. The job trains it as
    ``lightseg train --config`` does (``train(None, run_dir, config=config)``), so the run's
    ``config.json`` equals it. The rest is the job's own.
    """

    config: TrainConfig
    run_dir: str
    splits: str | None = None
    device: str = "cpu"
    workers: int = 2
    threads: int = 2

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "TrainJob":
        return TrainJob(**{**data, "config": TrainConfig.from_json(data["config"])})


@dataclass(frozen=True)
class TrainResult:
    """What one training cost; see the module docstring for how each figure is taken."""

    run_dir: str
    wall_s: float
    train_loop_s: float
    train_s: float
    peak_mb: float
    process_peak_mb: float
    params: int
    architecture: Mapping[str, list[int]] | None
    device: str
    threads: int
    workers: int


def prepare_cache(data: str | None, work: Path, num_cases: int = 10) -> Path:
    """A preprocessed cache for benchmark arms, built once before any arm so no arm pays for it.

    ``data`` may be a cache (has ``plan.json``: used as is), a raw data set (preprocessed into
    ``work/cache``) or ``None`` (the demo data set with ``num_cases`` cases, built in ``work/demo``).
    """
    from lightseg.data.preprocess import preprocess_dataset

    source = Path(data) if data else None
    if source is not None and (source / "plan.json").is_file():
        return source
    if source is None:
        from lightseg.data.demo import make_demo_dataset

        source = make_demo_dataset(work / "demo", num_cases=num_cases)
    cache = work / "cache"
    preprocess_dataset(source, cache, progress=False)
    return cache


def scaled_pruning_options(epochs: int, window: int | None = None, calibration_batches: int = 100) -> dict[str, int]:
    """PSP-Seg's pruning settings (spec section 1) as training options, with the convergence
    window scaled to the budget: the paper waits 10 of 1000 epochs, so a short budget waits a
    tenth of its epochs (at least 2), or ``window`` when given."""
    return {"pruning_window": window or max(2, epochs // 10), "pruning_calibration_batches": calibration_batches}


class _TrainClock(Callback):
    """A callback timing ``on_train_start`` to ``on_train_end`` (``train_s`` above)."""

    def __init__(self) -> None:
        self.start = self.seconds = 0.0

    def on_train_start(self, trainer: Any) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def train_and_measure(job: TrainJob) -> TrainResult:
    """Run ``job`` in this process and measure it (:func:`run_training` calls it in a fresh one)."""
    import torch

    from lightseg.run_folder import checkpoint_path, load_checkpoint, load_run, read_architecture
    from lightseg.training.run import train

    torch.set_num_threads(job.threads)
    run_dir = Path(job.run_dir)
    clock = _TrainClock()
    start_memory = memory_start(job.device)
    start = time.perf_counter()
    train(None, run_dir, config=job.config, splits=job.splits, device=job.device, workers=job.workers, callbacks=[clock])
    wall = time.perf_counter() - start
    peak, process_peak = memory_peak(job.device, start_memory)
    history = load_checkpoint(checkpoint_path(run_dir, "final"))["history"]
    model = load_run(run_dir, "final").model
    return TrainResult(
        run_dir=str(run_dir),
        wall_s=wall,
        train_loop_s=float(sum(h["epoch_time"] for h in history)),
        train_s=clock.seconds,
        peak_mb=peak,
        process_peak_mb=process_peak,
        params=sum(p.numel() for p in model.parameters()),
        architecture=read_architecture(run_dir),
        device=job.device,
        threads=job.threads,
        workers=job.workers,
    )


def run_training(job: TrainJob, quiet: bool = False) -> TrainResult:
    """Train ``job`` in a fresh Python process with ``job.threads`` intra-op threads.

    A run folder left by an interrupted attempt is removed first. The trainer's log lines go to
    this process's stderr unless ``quiet``. A failed training is a :class:`TrainingError`
    carrying the last lines of its output. The training ends itself if this process is killed.
    """
    run_dir = Path(job.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)}
    with tempfile.TemporaryDirectory(prefix="lightseg_run_") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        write_json(job_path, asdict(job))
        done = subprocess.run(
            [sys.executable, "-m", "lightseg.benchmark.runs", str(job_path), str(result_path)],
            stdout=subprocess.PIPE if quiet else 2, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        if done.returncode != 0 or not result_path.is_file():
            tail = "\n".join((done.stdout or "").strip().splitlines()[-15:])
            raise TrainingError(f"training {job.config.model.name} into {run_dir} failed (exit {done.returncode}); "
                                f"see {run_dir / 'training_log.txt'}{': ' + tail if tail else ''}")
        return TrainResult(**json.loads(result_path.read_text()))


def _end_with_parent(job_files: tuple[Path, Path]) -> None:
    """End this process once the one that started it is gone, removing the job's temporary folder.

    A parent killed by a signal runs no cleanup, so without this the training would go on
    unobserved and skew whatever is measured next on the machine, and the parent's temporary
    folder (the job and result files) would stay behind. Only those two files and their folder
    are removed, and the folder only when nothing else is in it.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        for path in job_files:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            job_files[0].parent.rmdir()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _main(argv: list[str]) -> int:
    _end_with_parent((Path(argv[0]), Path(argv[1])))
    job = TrainJob.from_json(json.loads(Path(argv[0]).read_text()))
    write_json(argv[1], asdict(train_and_measure(job)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
