"""What lightseg writes, and what it leaves alone: cache freshness, run-folder ownership, temp-file
cleanup, planted links (docs/reliability.md, "Files and folders").

Each test is a case of the second outside review: before the fix it lost data, hung or wrote
outside the output folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightseg.data.sampling import cached_cases
from lightseg.io import folder_lock, remove_stale_temps

from .conftest import TINY_TRAIN
from .helpers import cli, subprocess_env, write_nifti

LABEL = "labelsTr/case_tr001.nii.gz"


def _label(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# ----- 1. the cache follows the raw data -----------------------------------------------------------
def test_an_edited_label_map_is_preprocessed_again(raw_copy, tmp_path):
    cache = tmp_path / "cache"
    assert cli("preprocess", raw_copy, "-o", cache, "--workers", "1")[0] == 0
    before = np.load(cache / "cases" / "case_tr001_label.npy")
    other = (cache / "cases" / "case_tr002.json").stat().st_mtime_ns
    fixed = _label(raw_copy / LABEL).copy()
    fixed[fixed == 2] = 1  # the label map is corrected
    write_nifti(raw_copy / LABEL, fixed, nib.load(raw_copy / LABEL).affine)
    assert cli("preprocess", raw_copy, "-o", cache, "--workers", "1")[0] == 0
    after = np.load(cache / "cases" / "case_tr001_label.npy")
    assert 2 in before and 2 not in after  # the new label, not the old one
    assert (cache / "cases" / "case_tr002.json").stat().st_mtime_ns == other  # unchanged cases are kept


def test_a_case_removed_from_the_data_set_is_not_trained_on(raw_copy, tmp_path):
    cache = tmp_path / "cache"
    assert cli("preprocess", raw_copy, "-o", cache, "--workers", "1")[0] == 0
    assert "case_tr001" in cached_cases(cache)
    for path in (raw_copy / "imagesTr").glob("case_tr001_*"):
        path.unlink()
    (raw_copy / LABEL).unlink()
    code, err = cli("train", raw_copy, "-o", tmp_path / "run", "--cache", cache, *TINY_TRAIN)
    assert code == 0, err
    assert "case_tr001" not in cached_cases(cache)
    split = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert "case_tr001" not in split["train"] + split["val"]


def test_training_on_a_cache_whose_raw_data_changed_is_refused(raw_copy, tmp_path):
    cache = tmp_path / "cache"
    assert cli("preprocess", raw_copy, "-o", cache, "--workers", "1")[0] == 0
    write_nifti(raw_copy / LABEL, np.zeros_like(_label(raw_copy / LABEL)), nib.load(raw_copy / LABEL).affine)
    code, err = cli("train", cache, "-o", tmp_path / "run", *TINY_TRAIN)
    assert code == 1 and "raw data set changed since preprocessing" in err and "case_tr001" in err, err
    assert cli("preprocess", raw_copy, "-o", cache, "--workers", "1")[0] == 0  # the advice works
    code, err = cli("train", cache, "-o", tmp_path / "run", *TINY_TRAIN)
    assert code == 0, err


# ----- 2. one process owns a run folder --------------------------------------------------------------
def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until killed."""
    code = f"from lightseg.io import folder_lock\nwith folder_lock({str(folder)!r}):\n    print('held', flush=True)\n" \
           "    import time; time.sleep(600)"
    process = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"held"
    return process


def test_a_second_training_into_a_run_folder_is_refused_naming_the_holder(base, tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        for extra in ((), ("--resume",)):
            code, err = cli("train", base["cache"], "-o", run, *TINY_TRAIN, *extra)
            assert code == 1 and f"process {holder.pid} on host" in err and "is using this run folder" in err, err
        assert not (run / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    code, err = cli("train", base["cache"], "-o", run, *TINY_TRAIN)  # a dead holder's lock never blocks
    assert code == 0, err


@pytest.mark.slow
def test_two_real_trainings_into_one_run_folder(base, tmp_path):
    """A real ``train`` holds its run folder for its whole length: a second one started meanwhile
    exits 1 naming it and changes nothing there."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "lightseg", "train", str(base["cache"]), "-o", str(run), *TINY_TRAIN]
    argv[argv.index("--epochs") + 1] = "10000"  # still running when the second one starts; killed below
    first = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint_latest.pth").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the run files are all written before the first checkpoint
        before = {p.name: p.stat().st_mtime_ns for p in run.glob("*.json")}
        argv[argv.index("--epochs") + 1] = "1"
        second = subprocess.run(argv, env=subprocess_env(), capture_output=True, timeout=300)
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert second.returncode == 1 and f"process {first.pid} on host" in second.stderr.decode(), second.stderr.decode()
        assert len(before) == 4 and {p.name: p.stat().st_mtime_ns for p in run.glob("*.json")} == before
    finally:
        first.kill()
        first.wait()


def test_the_lock_is_taken_again_after_its_holder_is_killed(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with folder_lock(tmp_path) as folder:
        assert (folder / ".lightseg.lock").read_text().split()[0] == str(os.getpid())


def test_a_forked_worker_outliving_its_killed_parent_does_not_keep_the_lock(tmp_path):
    """Data-loader workers are forked and live on a few seconds after a SIGKILL of the trainer;
    the lock must go with the trainer, or the --resume that follows is refused."""
    script = (
        "import os, sys, time\n"
        "from lightseg.io import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n"
        "    worker = os.fork()\n"
        "    if worker == 0:\n"
        "        open(sys.argv[2], 'w').close(); time.sleep(30); os._exit(0)\n"
        "    print(worker, flush=True); time.sleep(60)\n"
    )
    started = tmp_path.parent / f"{tmp_path.name}.worker"  # the worker runs, past the fork
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(started)], stdout=subprocess.PIPE,
                              env=subprocess_env())
    worker = int(holder.stdout.readline())
    while not started.exists():
        time.sleep(0.01)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    try:
        with folder_lock(tmp_path) as folder:  # the worker is still asleep, holding a copy of the descriptor
            assert (folder / ".lightseg.lock").read_text().split()[0] == str(os.getpid())
    finally:
        os.kill(worker, signal.SIGKILL)


# ----- 3. start-up cleanup touches only lightseg's own temp files ------------------------------------------
def test_cleanup_never_opens_a_fifo_or_deletes_foreign_files(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / ".x.tmp")
    os.mkfifo(out / ".case_ts000.nii.gz.lightseg-abc.tmp")  # a lightseg name, but not a regular file
    (out / ".notes.tmp").write_text("the user's")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    os.symlink(outside, out / ".link.nii.gz.lightseg-abc.tmp")
    argv = [sys.executable, "-m", "lightseg", "predict", "-i", str(base["images"]), "-o", str(out), "-m",
            str(base["run"]), "--device", "cpu"]
    done = subprocess.run(argv, env=subprocess_env(), capture_output=True, timeout=300)  # hung forever before
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert (out / ".notes.tmp").read_text() == "the user's" and outside.read_text() == "keep"
    assert (out / ".x.tmp").exists() and (out / ".link.nii.gz.lightseg-abc.tmp").is_symlink()
    remove_stale_temps(out)  # the same, in process, for preprocess and train
    assert (out / ".notes.tmp").exists() and (out / ".x.tmp").exists()


# ----- 4. no write reaches through a planted link ------------------------------------------------------------
def test_a_link_planted_under_a_temp_name_is_never_followed(base, tmp_path):
    run, target = tmp_path / "run", tmp_path / "elsewhere" / "planted.json"
    run.mkdir()
    target.parent.mkdir()
    for name in ("plan.json", "dataset.json", "config.json", "splits.json"):
        os.symlink(target, run / f".{name}.tmp")
    code, err = cli("train", base["cache"], "-o", run, *TINY_TRAIN)
    assert code == 0, err
    assert not target.exists()
    for name in ("plan.json", "dataset.json", "config.json", "splits.json"):
        assert not (run / name).is_symlink() and json.loads((run / name).read_text())


def test_a_link_planted_at_an_output_file_is_refused(base, tmp_path):
    run, target = tmp_path / "run", tmp_path / "victim.json"
    run.mkdir()
    target.write_text('"do not touch"')
    os.symlink(target, run / "config.json")
    code, err = cli("train", base["cache"], "-o", run, *TINY_TRAIN)
    assert code == 1 and f"{run / 'config.json'}: is a symbolic link" in err, err
    assert target.read_text() == '"do not touch"' and (run / "config.json").is_symlink()


def test_without_flock_a_dead_holders_pid_does_not_block(tmp_path, monkeypatch):
    """Network mounts without ``flock``: the recorded pid decides; a live one blocks, a dead one not."""
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / ".lightseg.lock").write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        with pytest.raises(Exception, match=f"process {sleeper.pid} on host"):
            with folder_lock(tmp_path):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with folder_lock(tmp_path):  # its pid is gone: stale
        assert (tmp_path / ".lightseg.lock").read_text().split()[0] == str(os.getpid())
    assert (tmp_path / ".lightseg.lock").read_text() == ""  # released on exit
