"""Named recipes: every one trains with a tiny override budget, and flags replace recipe values."""

from __future__ import annotations

import json

import pytest

from lightseg.cli import main
from lightseg.errors import ConfigError
from lightseg.training.config import TUNABLE, TrainConfig, _as_json
from lightseg.training.recipes import PLAN_NEEDS, RECIPES, get_recipe

REQUIRED = {"lightmedseg", "lightmedseg-acdc", "lunet", "pspseg-s", "pspseg-b", "pspseg-l", "nnunet",
            "pgps-efficiency", "pgps-performance"}

# Tiny networks and patches per model: the budget is overridden, the rest stays the recipe's.
TINY_MODEL = {
    "lightmedseg": ({}, (16, 16, 16)),
    "lunet": ({"width": 4}, (16, 16, 32)),
    "pspseg": ({"channels": [4, 8, 8, 8, 8]}, (16, 16, 32)),
    "plainunet": ({"stages": 3, "width": 4, "max_width": 8}, (16, 16, 16)),
}


def test_recipes_are_known_training_options():
    assert REQUIRED <= set(RECIPES)
    for recipe in RECIPES.values():
        assert set(recipe.options) - {"model"} <= TUNABLE, recipe.name
        assert recipe.source and recipe.summary
    assert get_recipe("pspseg-l").options["model_kwargs"] == {"size": "L"}
    assert get_recipe("pgps-efficiency").options["curriculum"] == "pgps-efficiency"
    with pytest.raises(ConfigError, match="unknown recipe 'nnUnet'.*lightmedseg"):
        get_recipe("nnUnet")


def test_lightseg_recipes_lists_each_with_its_source(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for recipe in RECIPES.values():
        assert recipe.name in out and recipe.source in out


@pytest.mark.slow
def test_every_recipe_trains_with_a_tiny_budget(synthetic_dataset, tmp_path):
    for name, recipe in RECIPES.items():
        model = recipe.options["model"]
        kwargs, patch = TINY_MODEL[model]
        if recipe.options.get("model_kwargs", {}).get("size") == "L":
            kwargs, patch = {"channels": [4, 8, 8, 8, 8, 8]}, (32, 32, 64)
        run = tmp_path / name
        data = synthetic_dataset
        if name in PLAN_NEEDS:  # a plan the recipe needs is made by preprocessing first
            data = tmp_path / f"{name}_cache"
            options = [f"--{key}={value}" for key, value in PLAN_NEEDS[name].items()]
            assert main(["preprocess", str(synthetic_dataset), "-o", str(data), "--workers", "1", *options]) == 0
        argv = ["train", str(data), "-o", str(run), "--recipe", name, "--epochs", "1", "--iters-per-epoch", "1",
                "--batch", "1", "--patch", *map(str, patch), "--model-kwargs", json.dumps(kwargs), "--device", "cpu",
                "--workers", "0"]
        assert main(argv) == 0, name
        assert json.loads((run / "config.json").read_text())["optim"]["epochs"] == 1  # the file holds the sections
        config = _as_json(TrainConfig.read(run / "config.json").to_options())  # option names, as the recipes use
        assert (config["epochs"], config["batch_size"], config["patch_size"]) == (1, 1, list(patch))  # flags win
        assert config["model"] == model
        for key in ("optimizer", "lr", "schedule", "loss", "augment", "curriculum", "pruning", "grad_clip"):
            if key in recipe.options:
                assert config[key] == recipe.options[key], (name, key)  # the rest is the recipe's
        assert {**recipe.options.get("model_kwargs", {}), **kwargs}.items() <= config["model_kwargs"].items()
        assert (run / "checkpoint_final.pth").is_file()


def test_resume_refuses_a_recipe(synthetic_dataset, tmp_path):
    from lightseg.training.run import train

    with pytest.raises(ConfigError, match="--resume"):
        train(synthetic_dataset, tmp_path / "run", recipe="nnunet", resume=True, device="cpu")


@pytest.mark.slow
def test_a_raw_data_set_is_preprocessed_as_the_recipe_needs(tmp_path):
    """No z-score cache is built first: the recipe's plan needs reach the preprocessing, into a
    cache of its own beside the shared one, and a cache planned otherwise is refused untouched."""
    from lightseg.data import make_synthetic_dataset
    from lightseg.data.plan import load_plan
    from lightseg.data.preprocess import preprocess_dataset
    from lightseg.errors import PlanError
    from lightseg.training.run import train

    raw = make_synthetic_dataset(tmp_path / "Dataset009_Tiny", num_cases=2, shape=(16, 16, 16))
    runs = tmp_path / "runs"
    tiny = ["--epochs", "1", "--iters-per-epoch", "1", "--batch", "1", "--patch", "16", "16", "16", "--device", "cpu",
            "--workers", "0"]
    assert main(["train", str(raw), "-o", str(runs / "acdc"), "--recipe", "lightmedseg-acdc", *tiny]) == 0
    cache = runs / "Dataset009_Tiny_cache-percentile"
    assert [n.scheme for n in load_plan(cache / "plan.json").normalization] == ["percentile"]
    assert sorted(p.name for p in runs.iterdir()) == ["Dataset009_Tiny_cache-percentile", "acdc"]  # no z-score cache
    assert TrainConfig.read(runs / "acdc" / "config.json").data.cache_dir == str(cache.resolve())
    assert main(["train", str(raw), "-o", str(runs / "acdc"), "--resume", "--device", "cpu", "--workers", "0"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["Dataset009_Tiny_cache-percentile", "acdc"]  # resumed on its own cache

    plain = ["--model", "lunet", "--model-kwargs", '{"width": 4, "levels": 3}']
    assert main(["train", str(raw), "-o", str(runs / "plain"), *plain, *tiny]) == 0  # the shared cache, planned as usual
    assert [n.scheme for n in load_plan(runs / "Dataset009_Tiny_cache" / "plan.json").normalization] == ["zscore"]
    assert [n.scheme for n in load_plan(cache / "plan.json").normalization] == ["percentile"]

    zscored = tmp_path / "zscored"
    preprocess_dataset(raw, zscored, workers=1, progress=False)
    before = {p: p.stat().st_mtime_ns for p in zscored.rglob("*")}
    with pytest.raises(PlanError, match=r"recipe 'lightmedseg-acdc'.*zscored/plan.json.*'zscore'.*--cache NEW_FOLDER"):
        train(raw, runs / "refused", recipe="lightmedseg-acdc", cache=zscored, device="cpu", workers=0)
    assert {p: p.stat().st_mtime_ns for p in zscored.rglob("*")} == before  # neither replanned nor redone
    assert not (runs / "refused" / "config.json").exists()
