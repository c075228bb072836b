"""A run folder's config.json alone reproduces the run, pruned PSP-Seg runs included."""

from __future__ import annotations

import json

import pytest
import torch

from lightseg.errors import ConfigError
from lightseg.training.config import TrainConfig, config_file_options, layer_options

# Thresholds lowered for a 4-epoch run: the epoch index as the watched "loss" makes every window
# converge and nothing is ever judged over-pruned (the decisions are tested in test_pruning.py).
PRUNED = dict(
    model_kwargs={"channels": [4, 8, 8, 8, 8]}, epochs=4, iters_per_epoch=2, patch_size=(32, 32, 32), batch_size=1,
    val_fraction=0.25, augment="none", pruning="progressive", pruning_window=1, pruning_tolerance=1e9,
    pruning_deadline=1.0, pruning_calibration_batches=2, pruning_loss_keys=["epoch"],
)


def _weights(run):
    return torch.load(run / "checkpoint_final.pth", weights_only=True)["model"]


@pytest.mark.slow
def test_a_pruned_run_is_reproduced_from_its_config_json_alone(synthetic_dataset, tmp_path):
    from lightseg.cli import main
    from lightseg.training.run import train

    first = tmp_path / "first"
    train(synthetic_dataset, first, "pspseg", device="cpu", workers=0, **PRUNED)
    stored = json.loads((first / "config.json").read_text())
    assert stored["pruning"]["mode"] == "progressive" and stored["pruning"]["window"] == 1
    assert not (first / "pruning.json").exists()
    architecture = json.loads((first / "architecture.json").read_text())
    assert all(len(ids) < 4 for ids in architecture.values())  # branches were really removed

    second = tmp_path / "second"
    assert main(["train", "--config", str(first / "config.json"), "-o", str(second), "--device", "cpu", "--workers", "0"]) == 0
    assert json.loads((second / "architecture.json").read_text()) == architecture
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "config.json").read_text()) == stored


def test_layers_recipe_then_file_then_explicit():
    merged = layer_options({"lr": 1.0, "epochs": 5}, {"lr": 2.0, "seed": 3}, {"lr": None, "seed": 4})
    assert merged == {"lr": 2.0, "epochs": 5, "seed": 4}


def test_old_pruning_json_is_folded_into_the_config(tmp_path):
    config = TrainConfig.from_options(dict(model="pspseg", in_channels=1, num_classes=3, patch_size=(32, 32, 32), label_values=(0, 1, 2)))
    old = {k: v for k, v in config.to_options().items() if not k.startswith("pruning")}  # a flat file of that time
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "pruning.json").write_text(json.dumps({"mode": "progressive", "config": {
        "step": 2, "window": 7, "tolerance": 1e-3, "deadline": 0.4, "calibration_batches": 5, "min_branches": 1,
        "loss_keys": ["train_loss", "fd_enc", "fd_dec"]}}))
    read = TrainConfig.read(tmp_path / "config.json")
    assert (read.pruning.mode, read.pruning.window, read.pruning.calibration_batches) == ("progressive", 7, 5)
    assert read.pruning.loss_keys == ("train_loss", "fd_enc", "fd_dec")
    options = config_file_options(tmp_path / "config.json")
    assert options["model"] == "pspseg" and "num_classes" not in options


def test_pruning_needs_pspseg_and_a_known_mode(synthetic_dataset, tmp_path):
    from lightseg.training.run import train

    with pytest.raises(ConfigError, match="PSP-Seg"):
        train(synthetic_dataset, tmp_path / "a", "lunet", pruning="progressive", device="cpu", workers=0)
    with pytest.raises(ConfigError, match="unknown pruning"):
        train(synthetic_dataset, tmp_path / "b", "pspseg", pruning="prune", device="cpu", workers=0)
    with pytest.raises(ConfigError, match="no data"):
        train(None, tmp_path / "c", "pspseg", device="cpu", workers=0)


def test_a_bad_patch_is_refused_before_the_run_folder_is_written(synthetic_dataset, tmp_path):
    from lightseg.errors import ModelError
    from lightseg.training.run import train

    run = tmp_path / "run"
    with pytest.raises(ModelError, match="not a multiple of"):
        train(synthetic_dataset, run, "lunet", model_kwargs={"width": 4, "levels": 3}, patch_size=(18, 16, 16),
              device="cpu", workers=0)
    assert not (run / "config.json").exists()


@pytest.mark.slow
def test_config_json_records_the_recipe_and_a_rerun_rechecks_its_plan(tmp_path, capsys):
    from lightseg.cli import main
    from lightseg.data import make_synthetic_dataset
    from lightseg.data.preprocess import preprocess_dataset
    from lightseg.training.run import _base_options, train

    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=2, shape=(16, 16, 16))
    percentile, zscored = tmp_path / "cache-percentile", tmp_path / "cache"
    preprocess_dataset(raw, percentile, workers=1, progress=False, normalization="percentile")
    preprocess_dataset(raw, zscored, workers=1, progress=False)
    tiny = dict(epochs=1, iters_per_epoch=1, batch_size=1, patch_size=(16, 16, 16), device="cpu", workers=0)
    first = train(percentile, tmp_path / "first", recipe="lightmedseg-acdc", **tiny)
    assert json.loads((first / "config.json").read_text())["recipe"] == {"name": "lightmedseg-acdc"}

    again = train(None, tmp_path / "again", config=first / "config.json", device="cpu", workers=0)  # its own cache
    assert TrainConfig.read(again / "config.json").recipe.name == "lightmedseg-acdc"
    argv = ["train", str(zscored), "--config", str(first / "config.json"), "-o", str(tmp_path / "zscored"),
            "--device", "cpu", "--workers", "0"]
    assert main(argv) == 1  # the same refusal as `--recipe lightmedseg-acdc` on that cache
    err = capsys.readouterr().err
    assert "recipe 'lightmedseg-acdc'" in err and f"{zscored}/plan.json" in err and "--normalization percentile" in err
    assert not (tmp_path / "zscored" / "config.json").exists()
    # the file holds every value, so its recipe name (here none) is recorded, not --recipe's
    plain = train(zscored, tmp_path / "plain", "lunet", model_kwargs={"width": 4, "levels": 3}, **tiny)
    assert _base_options("lightmedseg-acdc", plain / "config.json")["recipe"] is None
    assert TrainConfig.read(plain / "config.json").recipe.name is None


def test_a_config_json_without_the_recipe_still_loads(tmp_path):
    config = TrainConfig.from_options(dict(model="lunet", in_channels=1, num_classes=3, patch_size=(32, 32, 32), label_values=(0, 1, 2)))
    old = config.to_json()
    del old["recipe"]  # written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert TrainConfig.read(tmp_path / "config.json") == config and config.recipe.name is None
    assert config_file_options(tmp_path / "config.json")["recipe"] is None
