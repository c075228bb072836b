"""``train --resume``: options given explicitly must match the run's stored config.json."""

from __future__ import annotations

import json

import pytest
from cache_helper import make_cache

from lightseg.cli import main
from lightseg.data import make_synthetic_dataset
from lightseg.errors import ConfigError
from lightseg.training.callbacks import Callback
from lightseg.training.config import TrainConfig, resume_conflicts
from lightseg.training.run import train

TINY = dict(model_kwargs={"width": 4, "levels": 3}, patch_size=(16, 16, 16), batch_size=1, workers=0, epochs=2,
            iters_per_epoch=1, augment="none", device="cpu")


class _StopAfterFirstEpoch(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run folder holding config.json and checkpoint_latest.pth after epoch 1 of 2."""
    class _Stop(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                raise _StopAfterFirstEpoch

    root = tmp_path_factory.mktemp("resume_config")
    raw = make_synthetic_dataset(root / "raw", num_cases=3, shape=(16, 16, 16), num_classes=2)
    cache = make_cache(raw, root / "cache")
    with pytest.raises(_StopAfterFirstEpoch):
        train(cache, root / "run", "lunet", callbacks=[_Stop()], **TINY)
    return cache, root / "run"


def _stored(run) -> TrainConfig:
    return TrainConfig.read(run / "config.json")


def test_conflicts_name_each_differing_option_and_its_stored_value(interrupted):
    _, run = interrupted
    stored = _stored(run)
    same = dict(model="lunet", epochs=2, patch_size=[16, 16, 16], model_kwargs={"levels": 3, "width": 4}, lr=None)
    assert resume_conflicts(stored, same) == []  # None = not given; lists and tuples alike
    conflicts = resume_conflicts(stored, dict(epochs=50, model="pspseg", lr=stored.optim.lr, seed=None))
    assert conflicts == ["epochs=50 (stored: 2)", "model='pspseg' (stored: 'lunet')"]
    with pytest.raises(ConfigError, match="unknown training options"):
        resume_conflicts(stored, {"epochz": 3})


def test_cli_resume_with_a_different_option_is_an_error_and_changes_nothing(interrupted, capsys):
    cache, run = interrupted
    before = (run / "config.json").read_text()
    code = main(["train", str(cache), "-o", str(run), "--resume", "--epochs", "50", "--batch", "2", "--workers", "0",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert "epochs=50 (stored: 2)" in err and "batch_size=2 (stored: 1)" in err and "--resume" in err
    assert "--model" not in err and "model=" not in err  # defaults the user did not pass do not count
    assert (run / "config.json").read_text() == before


def test_api_resume_with_a_different_model_or_splits_is_an_error(interrupted, tmp_path):
    cache, run = interrupted
    with pytest.raises(ConfigError, match=r"model='pspseg' \(stored: 'lunet'\)"):
        train(cache, run, "pspseg", resume=True, workers=0, device="cpu")
    stored = json.loads((run / "splits.json").read_text())
    swapped = tmp_path / "splits.json"
    swapped.write_text(json.dumps({"train": stored["train"][1:] + stored["val"], "val": stored["train"][:1]}))
    with pytest.raises(ConfigError, match="--splits"):
        train(cache, run, resume=True, splits=swapped, workers=0, device="cpu")


def test_resume_with_the_same_options_finishes(interrupted):
    cache, run = interrupted
    assert train(cache, run, "lunet", resume=True, callbacks=[Callback()], **TINY) == run  # one callback, as saved
    assert (run / "checkpoint_final.pth").is_file()


@pytest.mark.parametrize("saved", [2, None])
def test_resuming_on_another_process_count_says_how_the_batch_changed(interrupted, tmp_path, saved):
    """A torchrun run resumed in one process goes on with fewer patches a step; the log says so
    (the checkpoint records its process count; older checkpoints, without it, resume silently)."""
    import shutil

    import torch

    cache, run = interrupted
    copy = shutil.copytree(run, tmp_path / "run")
    state = torch.load(copy / "checkpoint_latest.pth", weights_only=True)
    assert state["world_size"] == 1
    if saved is None:
        del state["world_size"]
    else:
        state["world_size"] = saved
    torch.save(state, copy / "checkpoint_latest.pth")
    train(cache, copy, "lunet", resume=True, callbacks=[Callback()], **TINY)
    log = (copy / "training_log.txt").read_text()
    note = "the run trained on 2 process(es) and now goes on with 1: each step now takes 1 patches instead of 2"
    assert (note in log) == (saved == 2), log[-800:]
