"""Real 2-process torchrun runs (gloo on CPU): every registered model trains under DDP, deep
supervision and PSP-Seg pruning included, only rank 0 writes, and the checkpoint predicts.

The runs share one tiny data set and last seconds each (32^3 patches, 2 epochs of 2 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from cache_helper import make_cache

from lightseg.data import make_synthetic_dataset
from lightseg.models import list_models
from lightseg.run_folder import load_checkpoint, load_run
from lightseg.training.distributed import DistInfo, all_gather_objects, all_reduce_sum, init_distributed, wait_for_main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lightseg"]

# Tiny arguments per registered model (every one must appear: a new model joins the DDP test).
# plainunet trains with its deep-supervision heads; pspseg is the command as a user types it;
# unet's batch norm meets a 1-voxel bottleneck (patch = its size divisor), legal at batch 2 only.
FAMILIES: dict[str, list[str]] = {
    "lightmedseg": ["--patch", "32", "32", "32"],
    "lunet": ["--model-kwargs", '{"width": 4, "levels": 3}', "--patch", "32", "32", "32"],
    "unet": ["--model-kwargs", '{"width": 2}', "--patch", "16", "16", "16", "--batch", "2"],
    "plainunet": ["--model-kwargs", '{"width": 4, "max_width": 16, "stages": 4, "deep_supervision": true}', "--patch", "32", "32", "32"],
    "pspseg": ["--patch", "32", "32", "32", "--batch", "1"],
    "monai_unet": ["--model-kwargs", '{"channels": [4, 8, 16, 32, 64]}', "--patch", "32", "32", "32"],
    "segresnet": ["--model-kwargs", '{"init_filters": 8}', "--patch", "32", "32", "32"],
    "unetr": ["--model-kwargs", '{"img_size": 32, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}',
              "--patch", "32", "32", "32"],
    "swinunetr": ["--model-kwargs", '{"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}',
                  "--patch", "32", "32", "64", "--batch", "1"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One raw data set and its cache for every run here."""
    root = tmp_path_factory.mktemp("ddp")
    raw = make_synthetic_dataset(root / "raw", num_cases=4, shape=(32, 32, 32), num_classes=3)
    return raw, make_cache(raw, root / "cache")


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="torchrun-") as tmp:  # torchrun leaves an empty log folder in TMPDIR
        done = subprocess.run([*TORCHRUN, *args], env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=tmp), capture_output=True,
                              text=True, timeout=timeout)
    # a string, not a tuple: pytest shortens a tuple's repr, and a rare rank abort needs its whole report
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-6000:]}"
    return done


def _predicts(run, raw, out) -> None:
    """The torchrun checkpoint predicts (on the CPU, in one process)."""
    from lightseg.inference.predictor import predict

    written = predict(raw / "imagesTr", out, run, progress=False, device="cpu")
    assert len(written) == 4 and all(p.is_file() for p in written)


def test_single_process_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == DistInfo() and DistInfo().is_main and not DistInfo().enabled
    assert all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert wait_for_main(lambda: 5) == 5


def test_every_registered_model_has_a_ddp_run():
    assert sorted(FAMILIES) == list_models()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_model_trains_under_torchrun_and_predicts(name, data, tmp_path):
    raw, cache = data
    run = tmp_path / "run"
    if name == "pspseg":  # the command of the report, as a user types it (default augmentation and workers)
        extra = [str(cache)]
    elif name == "lunet":  # from the raw data set: rank 0 preprocesses while rank 1 waits (wait_for_main)
        extra = [str(raw), "--cache", str(tmp_path / "cache"), "--val-fraction", "0.5", "--workers", "0", "--augment", "none"]
    else:  # the rest as cheap as possible: no validation, no workers, no augmentation
        extra = [str(cache), "--val-fraction", "0", "--workers", "0", "--augment", "none"]
    _torchrun("train", extra[0], "-o", str(run), "--model", name, *FAMILIES[name], *extra[1:],
              "--epochs", "2", "--iters-per-epoch", "2", "--device", "cpu")
    log = (run / "training_log.txt").read_text()
    assert "2 process(es)" in log and log.count("epoch 2/2") == 1  # one writer: rank 0
    assert not list(run.glob(".*.tmp"))
    if name in ("pspseg", "plainunet"):
        assert "DDP: 2 parameter tensor(s) no used output depends on are frozen (heads." in log
    state = load_checkpoint(run / "checkpoint_final.pth")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    if name == "lunet":
        summary = json.loads((run / "validation" / "summary.json").read_text())
        assert len(summary["cases"]) == 2  # both validation cases, one per rank, gathered on rank 0
    _predicts(run, raw, tmp_path / "pred")


@pytest.mark.slow
def test_pspseg_pruning_under_torchrun(data, tmp_path):
    """Masks, removals and rebuilt DDP wrappers on both ranks at once; the pruned checkpoint predicts."""
    from lightseg.io import write_json
    from lightseg.models.pspseg import PSPSeg
    from lightseg.training.config import TrainConfig

    raw, cache = data
    run = tmp_path / "run"
    # The forced schedule of test_pruning's run (the epoch index as the watched "loss": every window
    # converges, nothing is over-pruned), given as a config.json for `--config` (pruning lives there).
    forced = TrainConfig.from_options(dict(
        model="pspseg", in_channels=1, num_classes=2, patch_size=(32, 32, 32), label_values=(0, 1),
        model_kwargs={"channels": [4, 8, 8, 8, 8]}, epochs=5, iters_per_epoch=2, batch_size=1, augment="none",
        val_fraction=0.25, cache_dir=str(cache), pruning="progressive", pruning_step=2, pruning_window=1,
        pruning_tolerance=1e9, pruning_deadline=1.0, pruning_calibration_batches=2, pruning_loss_keys=("epoch",),
    ))  # fmt: skip
    write_json(tmp_path / "forced.json", forced.to_json())
    _torchrun("train", "--config", str(tmp_path / "forced.json"), "-o", str(run), "--device", "cpu", "--workers", "0")
    log = (run / "training_log.txt").read_text()
    assert "masked" in log and "removed" in log and log.count("epoch 5/5") == 1
    architecture = json.loads((run / "architecture.json").read_text())
    assert all(len(ids) == 1 for ids in architecture.values())
    model, *_ = load_run(run, "final")
    assert isinstance(model, PSPSeg) and model.architecture() == architecture
    _predicts(run, raw, tmp_path / "pred")


