"""SIGKILL at random moments of real ``preprocess``, ``train`` and ``predict`` processes.

For each stage: one uninterrupted reference run (its wall time ``W`` sets the kill window),
then for each seed a fresh run killed after ``uniform(0, 0.7 W)`` seconds (retried sooner if it
finished first, so every seed kills a running process). After every kill each
visible file must open completely (atomic writes: complete or absent, never half-written); then
the rerun (``--resume`` for training) must finish, keep every finished output untouched (no work
lost) and give the reference's result.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lightseg.data import make_synthetic_dataset
from lightseg.run_folder import load_checkpoint

from .helpers import assert_files_valid, cli, mtimes, subprocess_env, temp_files, write_nifti

SEEDS = (0, 1, 2)
TRAIN = ("--model", "lunet", "--model-kwargs", '{"width": 2, "levels": 2}', "--epochs", "3", "--iters-per-epoch", "1",
         "--batch", "1", "--patch", "16", "16", "16", "--workers", "0", "--device", "cpu", "--val-fraction", "0")


def _start(argv: list[object]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lightseg", *map(str, argv)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(process: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _reference(argv: list[object], marker: Path) -> float:
    """Run ``lightseg ARGV`` to the end; the seconds from ``marker``'s appearance (work started) to the exit."""
    process = _start(argv)
    _wait_for(process, marker)
    start = time.monotonic()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()[-2000:]
    return time.monotonic() - start


def _kill_during_work(argv: list[object], folder: Path, marker: Path, work_s: float, seed: int) -> None:
    """Start ``lightseg ARGV``, SIGKILL it at a random moment of its work (after ``marker`` appears).

    The moment is ``uniform(0, 0.7 W)``; a run that finishes before it (the machine was faster than
    during the reference) is wiped and retried with half the delay, so every seed injects a fault."""
    delay = random.Random(seed).uniform(0.0, 0.7 * work_s)
    for _ in range(8):
        process = _start(argv)
        _wait_for(process, marker)
        try:
            process.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            return
        shutil.rmtree(folder)
        delay /= 2
    raise AssertionError(f"lightseg {argv[0]} always finished before the kill")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("kill") / "raw", num_cases=6, num_test=6, shape=(24, 24, 24))


@pytest.mark.slow
def test_preprocess_killed_at_random_points(raw, tmp_path):
    argv = ["preprocess", raw, "-o", tmp_path / "reference", "--workers", "1", "--spacing", "0.6", "0.6", "0.6"]
    work_s = _reference(argv, tmp_path / "reference" / "plan.json")
    for seed in SEEDS:
        cache = tmp_path / f"seed{seed}"
        _kill_during_work([*argv[:3], cache, *argv[4:]], cache, cache / "plan.json", work_s, seed)
        if cache.exists():
            assert_files_valid(cache)
        done = {name: t for name, t in mtimes(cache).items() if name.startswith("cases/")} if cache.exists() else {}
        finished = {n for n in done if n.endswith(".json")}
        code, err = cli(*argv[:3], cache, *argv[4:])
        assert code == 0, err
        after = mtimes(cache)
        assert all(after[n] == done[n] for n in done if n.replace(".json", "") + ".json" in finished)  # kept, not redone
        assert not temp_files(cache)
        assert assert_files_valid(cache) == assert_files_valid(tmp_path / "reference")
        for path in (tmp_path / "reference" / "cases").glob("*.npy"):
            assert np.array_equal(np.load(path), np.load(cache / "cases" / path.name)), path.name


@pytest.mark.slow
def test_train_killed_at_random_points_resumes_to_the_same_weights(raw, tmp_path):
    cache = tmp_path / "cache"
    assert cli("preprocess", raw, "-o", cache, "--workers", "1")[0] == 0
    work_s = _reference(["train", cache, "-o", tmp_path / "reference", *TRAIN], tmp_path / "reference" / "config.json")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint_final.pth")
    for seed in SEEDS:
        run = tmp_path / f"seed{seed}"
        _kill_during_work(["train", cache, "-o", run, *TRAIN], run, run / "config.json", work_s, seed)
        latest = run / "checkpoint_latest.pth"
        epoch_before = load_checkpoint(latest)["epoch"] if latest.exists() else 0
        if run.exists():
            assert_files_valid(run)
        resume = ("--resume",) if latest.exists() else ()
        code, err = cli("train", cache, "-o", run, *TRAIN, *resume)
        assert code == 0, err
        final = load_checkpoint(run / "checkpoint_final.pth")
        assert final["epoch"] == 3 >= epoch_before and [h["epoch"] for h in final["history"]] == [0, 1, 2]
        for name, tensor in expected["model"].items():
            assert torch.allclose(tensor, final["model"][name], atol=1e-6), name
        assert not temp_files(run)
        assert_files_valid(run)


@pytest.mark.slow
def test_predict_killed_at_random_points(base, tmp_path):
    rng = np.random.default_rng(0)
    for case in range(4):  # 32^3 scans: 27 sliding-window tiles each, so the work outlasts the start-up
        for channel in range(2):
            write_nifti(tmp_path / "images" / f"scan{case}_{channel:04d}.nii.gz", rng.normal(size=(32, 32, 32)).astype(np.float32),
                        np.eye(4))
    images = tmp_path / "images"
    argv = ["predict", "-i", images, "-o", tmp_path / "reference", "-m", base["run"], "--device", "cpu", "--save-probabilities"]
    work_s = _reference(argv, tmp_path / "reference")
    for seed in SEEDS:
        out = tmp_path / f"seed{seed}"
        _kill_during_work([*argv[:4], out, *argv[5:]], out, out, work_s, seed)
        # A case is finished once its label is written (last, after the probabilities); an
        # unfinished case's probabilities may be redone.
        finished = {p.name.removesuffix(".nii.gz") for p in out.glob("*.nii.gz")} if out.exists() else set()
        done = {name: t for name, t in mtimes(out).items() if name.split(".")[0] in finished} if out.exists() else {}
        if out.exists():
            assert_files_valid(out)
        code, err = cli(*argv[:4], out, *argv[5:])
        assert code == 0, err
        after = mtimes(out)
        assert all(after[name] == t for name, t in done.items())  # finished cases are kept, not redone
        assert not temp_files(out)
        for path in (tmp_path / "reference").glob("*.nii.gz"):
            assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(out / path.name).dataobj))
        assert len(list(out.glob("*.npz"))) == 4
