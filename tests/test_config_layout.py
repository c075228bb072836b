"""The nested configuration: one option table, old flat config.json files, the same values as before.

``data/flat_configs.json`` holds config.json files written by the flat ``TrainConfig`` (before
the sections), resolved from the inputs in :data:`CASES`; resolving the same inputs now must give
the same value under every option name, and reading the old file must give the same config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from cache_helper import make_cache

from lightseg.data.dataset import DatasetSpec
from lightseg.errors import ConfigError, TrainingError
from lightseg.models import model_entry
from lightseg.training.callbacks import Callback
from lightseg.training.config import OPTIONS, SECTIONS, TrainConfig, config_file_options, resolve_config
from lightseg.training.recipes import get_recipe

FLAT = json.loads((Path(__file__).parent / "data" / "flat_configs.json").read_text())
CLASSES = DatasetSpec(("CT",), {"background": 0, "a": 1, "b": 2}, 4)
REGIONS = DatasetSpec(("T1", "T2"), {"background": 0, "wt": (1, 2, 3), "tc": (2, 3), "et": (3,)}, 4, regions_class_order=(1, 2, 3))
CASES = {  # name: model, data set, named recipe, explicit options (as the flat files were resolved)
    "default_lunet": ("lunet", CLASSES, None, {"precision": "fp32", "cache_dir": "/data/cache"}),
    "pspseg_s": ("pspseg", CLASSES, "pspseg-s", {"precision": "fp32", "cache_dir": "/data/cache", "epochs": 4}),
    "channel_unet": ("unet", CLASSES, None, {"precision": "fp32", "channel_pruning": "stamp", "channel_pruning_target_params": 1000,
                                             "seed": 3}),
    "nnunet_regions": ("plainunet", REGIONS, "nnunet", {"precision": "bf16", "curriculum": "pgps-efficiency"}),
    "lightmedseg_regions": ("lightmedseg", REGIONS, "lightmedseg", {"precision": "fp32"}),
}


def _resolve(name: str) -> TrainConfig:
    model, spec, recipe, explicit = CASES[name]
    base = {k: v for k, v in get_recipe(recipe).options.items() if k != "model"} if recipe else {}
    return resolve_config(model, spec, (32, 32, 32), model_entry(model).recipe, explicit, base)[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_resolving_gives_the_values_the_flat_config_had(name):
    config = _resolve(name)
    options = config.to_options()
    assert options.pop("recipe") is None  # the recipe name came later than the flat files (and is not passed here)
    assert json.loads(json.dumps(options)) == FLAT[name]  # every option, same value, nothing added
    assert TrainConfig.from_json(FLAT[name]) == config  # the old file reads as the same configuration
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config  # the nested file round-trips


def test_every_field_has_one_option_name():
    fields = [(s, f.name) for s, section in SECTIONS.items() for f in dataclasses.fields(section)]
    assert sorted(OPTIONS.values()) == sorted(fields)  # one name per field, no name for two fields
    assert OPTIONS["pruning"] == ("pruning", "mode") and OPTIONS["pruning_window"] == ("pruning", "window")
    assert OPTIONS["model"] == ("model", "name") and OPTIONS["batch_size"] == ("data", "batch_size")


def test_options_become_the_config_in_one_place():
    config = TrainConfig.from_options(dict(model="pspseg", in_channels=1, num_classes=3, patch_size=[32, 32, 32],
                                           label_values=[0, 1, 2], pruning="progressive", pruning_loss_keys=["epoch"], lr=0.5))
    assert config.data.patch_size == (32, 32, 32) and config.pruning.loss_keys == ("epoch",)  # lists become tuples
    assert (config.pruning.mode, config.optim.lr, config.optim.epochs) == ("progressive", 0.5, 50)
    with pytest.raises(ConfigError, match=r"unknown training options \['lrr'\]"):
        TrainConfig.from_options(dict(model="lunet", lrr=1.0))


def test_a_wrong_nested_key_names_its_section_and_key(tmp_path):
    stored = _resolve("default_lunet").to_json()
    stored["optim"]["epochs"] = "many"
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(TrainingError, match=r"config.json.*section 'optim'.*key 'epochs' must be an integer"):
        TrainConfig.read(tmp_path / "config.json")
    flat = dict(FLAT["default_lunet"], epochz=3)
    (tmp_path / "config.json").write_text(json.dumps(flat))
    with pytest.raises(TrainingError, match=r"unknown keys \['epochz'\]"):
        TrainConfig.read(tmp_path / "config.json")


def test_a_flat_config_json_trains_again_with_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FLAT["pspseg_s"]))
    options = config_file_options(tmp_path / "config.json")
    assert options["model"] == "pspseg" and options["pruning"] == "progressive" and options["epochs"] == 4
    assert "num_classes" not in options and options["model_kwargs"] == {"size": "S"}


@pytest.mark.slow
def test_a_run_with_a_flat_config_json_resumes(tmp_path):
    """A run folder written before the sections (flat config.json) resumes, and is rewritten nested."""
    from lightseg.data import make_synthetic_dataset
    from lightseg.training.run import train

    class _Stop(Exception):
        pass

    class _StopAt1(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                raise _Stop

    cache = make_cache(make_synthetic_dataset(tmp_path / "raw", num_cases=3, shape=(16, 16, 16), num_classes=2), tmp_path / "cache")
    tiny = dict(model_kwargs={"width": 4, "levels": 3}, patch_size=(16, 16, 16), batch_size=1, workers=0, epochs=2,
                iters_per_epoch=1, augment="none", device="cpu")
    with pytest.raises(_Stop):
        train(cache, tmp_path / "run", "lunet", callbacks=[_StopAt1()], **tiny)
    flat = json.loads(json.dumps(TrainConfig.read(tmp_path / "run" / "config.json").to_options()))
    (tmp_path / "run" / "config.json").write_text(json.dumps(flat))  # as the flat TrainConfig wrote it
    shutil.rmtree(tmp_path / "raw")
    assert train(cache, tmp_path / "run", "lunet", resume=True, callbacks=[Callback()], **tiny) == tmp_path / "run"
    rewritten = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rewritten["optim"]["epochs"] == 2 and TrainConfig.from_json(rewritten) == TrainConfig.from_json(flat)
