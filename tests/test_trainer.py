"""Trainer: real short trainings on tiny synthetic data, callbacks, NaN stop, schedules, config."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cache_helper import make_cache

from lightseg.cli import main
from lightseg.data import make_synthetic_dataset
from lightseg.errors import TrainingError
from lightseg.training.callbacks import Callback
from lightseg.run_folder import load_checkpoint, load_run
from lightseg.training.losses import deep_supervision_weights
from lightseg.training.optim import cosine_lr, poly_lr
from lightseg.training.run import train

TINY = dict(model="lunet", model_kwargs={"width": 4, "levels": 3}, patch_size=(16, 16, 16), batch_size=2, workers=0, lr=1e-2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    raw = make_synthetic_dataset(root / "raw", num_cases=4, shape=(24, 24, 24), num_classes=3)
    return make_cache(raw, root / "cache")


def test_schedules_and_weights():
    assert poly_lr(0, 10, 1e-2) == 1e-2 and poly_lr(5, 10, 1.0) == pytest.approx(0.5**0.9)
    assert cosine_lr(0, 100, 1.0, 0.0, 5) < cosine_lr(4, 100, 1.0, 0.0, 5) < 1.0  # warm-up rises
    assert cosine_lr(5, 100, 1.0, 0.0, 5) == pytest.approx(1.0)
    assert cosine_lr(99, 100, 1.0, 0.0, 5) < 0.01
    assert cosine_lr(0, 3, 1.0, 0.0, 5) == 1.0  # warm-up capped at a tenth of a short run
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_short_training_lowers_loss_and_writes_the_run_folder(cache, tmp_path):
    run = train(cache, tmp_path / "run", epochs=4, iters_per_epoch=5, augment="none", **{k: v for k, v in TINY.items() if k != "model"}, )
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "plan.json", "dataset.json", "splits.json", "checkpoint_latest.pth", "checkpoint_best.pth",
            "checkpoint_final.pth", "training_log.txt", "progress.png", "validation"} <= names
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {"name": "lunet", "kwargs": {"width": 4, "levels": 3}}
    assert config["optim"]["optimizer"] == "adamw" and config["optim"]["schedule"] == "cosine"  # LUnet's registry recipe
    assert config["data"]["in_channels"] == 1 and config["data"]["num_classes"] == 3
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["val"]) == 1 and not set(splits["val"]) & set(splits["train"])
    history = load_checkpoint(run / "checkpoint_final.pth")["history"]
    assert len(history) == 4 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0.0 <= h["data_wait"] <= 1.0 for h in history)
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert summary["cases"][0]["case"] == splits["val"][0] and "preprocessed" in summary["space"]
    assert set(summary["mean_dice"]) == {"class1", "class2"}
    model, cfg, plan, spec = load_run(run, "best")
    assert cfg.data.patch_size == (16, 16, 16) and spec.num_classes == 3 and len(plan.patch_size) == 3
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    with pytest.raises(TrainingError, match="--resume"):
        train(cache, run, epochs=1, iters_per_epoch=1, **{k: v for k, v in TINY.items() if k != "model"})


def test_region_training_on_nested_regions(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=3, shape=(20, 20, 20), num_classes=3, regions=True)
    cache = make_cache(raw, tmp_path / "cache")
    run = train(cache, tmp_path / "run", epochs=3, iters_per_epoch=4, augment="none", region_training=True,
                **{k: v for k, v in TINY.items() if k != "model"})
    config = json.loads((run / "config.json").read_text())
    assert config["loss"]["name"] == "region" and config["data"]["num_classes"] == 2 and config["data"]["regions"] == [[1, 2], [2]]
    history = load_checkpoint(run / "checkpoint_final.pth")["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert summary["classes"] == ["region1", "region2"]
    assert summary["mean_dice"]["region1"] is not None and summary["mean_dice"]["region1"] > 0.2  # the large region is learnt


class _Probe(Callback):
    """Changes patch and batch at epoch 1, swaps the model at epoch 2, records what it saw."""

    def __init__(self):
        self.shapes, self.calls = [], []

    def on_train_start(self, trainer):
        self.calls.append("start")

    def on_epoch_start(self, trainer, epoch):
        if epoch == 1:
            trainer.sampler.set_patch_size((8, 8, 8))
            trainer.sampler.set_batch_size(3)
        if epoch == 2:
            from lightseg.models import create_model

            trainer.replace_model(create_model("lunet", 1, 3, width=2, levels=3))

    def extra_loss(self, trainer, images, target, outputs):
        self.shapes.append(tuple(images.shape))
        return None

    def on_epoch_end(self, trainer, epoch, metrics):
        metrics["num_params"] = sum(p.numel() for p in trainer.model.parameters())

    def on_train_end(self, trainer):
        self.calls.append("end")


def test_callbacks_drive_sampler_and_model(cache, tmp_path):
    probe = _Probe()
    run = train(cache, tmp_path / "run", epochs=3, iters_per_epoch=2, augment="none", callbacks=[probe],
                **{k: v for k, v in TINY.items() if k != "model"})
    assert probe.calls == ["start", "end"]
    assert probe.shapes[:2] == [(2, 1, 16, 16, 16)] * 2 and probe.shapes[2:] == [(3, 1, 8, 8, 8)] * 4
    history = load_checkpoint(run / "checkpoint_final.pth")["history"]
    assert history[2]["num_params"] < history[1]["num_params"]


class _Poison(Callback):
    def extra_loss(self, trainer, images, target, outputs):
        return torch.tensor(math.nan) if trainer.epoch == 1 else None


def test_nan_loss_stops_and_keeps_the_good_checkpoint(cache, tmp_path):
    with pytest.raises(TrainingError, match="checkpoint_latest.pth"):
        train(cache, tmp_path / "run", epochs=3, iters_per_epoch=2, augment="none", callbacks=[_Poison()],
              **{k: v for k, v in TINY.items() if k != "model"})
    state = load_checkpoint(tmp_path / "run" / "checkpoint_latest.pth")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cli_trains_with_augmentation_and_workers(cache, tmp_path):
    code = main(["train", str(cache), "-o", str(tmp_path / "run"), "--model", "lunet", "--model-kwargs", '{"width": 4, "levels": 3}',
                 "--epochs", "1", "--iters-per-epoch", "2", "--patch", "16", "16", "16", "--batch", "2", "--workers", "1",
                 "--device", "cpu", "--optimizer", "sgd", "--schedule", "poly", "--val-fraction", "0.25"])
    assert code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["optim"]["optimizer"] == "sgd" and config["optim"]["schedule"] == "poly" and config["augment"]["name"] == "default"
    assert main(["train", str(cache), "-o", str(tmp_path / "bad"), "--model", "lunet", "--model-kwargs", "{oops"]) == 1


def test_a_fresh_start_clears_the_temp_files_of_a_run_killed_before_its_first_checkpoint(cache, tmp_path):
    """Killed while writing its first checkpoint, a run has no checkpoint to resume, so the next
    training starts over in the same folder: the dead writer's half-written temp file goes too."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint_latest.pth.lightseg-dead1234.tmp").write_bytes(b"half a checkpoint")
    train(cache, run, epochs=1, iters_per_epoch=1, augment="none", **{k: v for k, v in TINY.items() if k != "model"})
    assert (run / "checkpoint_final.pth").is_file() and not list(run.glob(".*.tmp"))


def test_the_trainer_runs_the_parts_built_from_the_config(cache, tmp_path):
    """build_parts is the one place the parts come from; one seed gives one set of initial weights."""
    from lightseg.data.dataset import read_dataset_json
    from lightseg.data.sampling import cached_cases
    from lightseg.training.config import resolve_config
    from lightseg.training.distributed import DistInfo
    from lightseg.training.parts import build_parts
    from lightseg.training.trainer import Trainer

    spec = read_dataset_json(cache / "dataset.json")
    options = dict(model_kwargs=TINY["model_kwargs"], cache_dir=str(cache), batch_size=1, curriculum="pgps-efficiency", seed=7)
    config, _ = resolve_config("lunet", spec, (16, 16, 16), {}, options)
    cases = cached_cases(cache)
    splits = {"train": cases[:2], "val": cases[2:3]}
    mine = Callback()
    first, second = (build_parts(config, tmp_path, splits, torch.device("cpu"), DistInfo(), 0, [mine]) for _ in range(2))
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.callbacks[0] is mine and type(first.callbacks[1]).__name__ == "PGPSCallback"
    assert first.sampler.patch_size == (16, 16, 16) and len(first.val_patches) == config.data.val_patches_per_case
    trainer = Trainer(config, tmp_path, first, splits["val"], ["class1", "class2"], torch.device("cpu"), DistInfo(), 0)
    assert trainer.model is first.model and trainer.loss is first.loss and trainer.callbacks is first.callbacks
    assert trainer.sampler is first.sampler and trainer.optimizer is first.optimizer
