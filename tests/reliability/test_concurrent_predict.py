"""Two ``predict`` processes writing into one output folder (say, one per GPU): no corrupted output.

Both may predict the same case; each output is replaced atomically, so the last complete file
wins. The danger is the start-up cleanup of a killed run's temp files: it must never delete a
temp file another live process is still writing (``lightseg.io.remove_stale_temps``).
"""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lightseg.io import atomic_write, remove_stale_temps

from .helpers import assert_files_valid, cli, subprocess_env, temp_files, write_nifti


def test_cleanup_never_takes_a_live_writers_temp_file(tmp_path):
    (tmp_path / ".dead.npy.lightseg-abc.tmp").write_bytes(b"left by a killed writer")
    with atomic_write(tmp_path / "live.bin") as handle:
        handle.write(b"first half ")
        remove_stale_temps(tmp_path)  # another process starting now
        handle.write(b"second half")
    assert (tmp_path / "live.bin").read_bytes() == b"first half second half"
    assert not list(tmp_path.glob(".*"))


@pytest.mark.slow
def test_two_predict_processes_share_an_output_folder(base, tmp_path):
    rng = np.random.default_rng(1)
    for case in range(6):
        for channel in range(2):
            write_nifti(tmp_path / "in" / f"scan{case}_{channel:04d}.nii.gz",
                        rng.normal(size=(20, 20, 20)).astype(np.float32), np.eye(4))
    assert cli("predict", "-i", tmp_path / "in", "-o", tmp_path / "reference", "-m", base["run"], "--device", "cpu")[0] == 0
    argv = [sys.executable, "-m", "lightseg", "predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "shared"),
            "-m", str(base["run"]), "--device", "cpu", "--save-probabilities"]
    processes = [subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
    assert assert_files_valid(tmp_path / "shared") == 12 and not temp_files(tmp_path / "shared")
    for path in (tmp_path / "reference").glob("*.nii.gz"):
        assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(tmp_path / "shared" / path.name).dataobj))
