"""Ensembles of runs (mean of probabilities), --part, and their CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cache_helper import make_cache

from lightseg.cli import main
from lightseg.data import make_synthetic_dataset
from lightseg.errors import PredictionError
from lightseg.inference.pipeline import ensemble, parse_part
from lightseg.inference.predictor import load_predictor, predict
from lightseg.training.run import train

TINY = dict(model="lunet", model_kwargs={"width": 4, "levels": 2}, epochs=1, iters_per_epoch=2, patch_size=(16, 16, 16),
            batch_size=1, workers=0, device="cpu", augment="none")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    raw = make_synthetic_dataset(root / "raw", num_cases=2, shape=(20, 20, 20), num_classes=3, num_test=3)
    cache = make_cache(raw, root / "cache")
    return raw, [train(cache, root / f"run{seed}", seed=seed, val_fraction=0.0, **TINY) for seed in (0, 1)]


@pytest.mark.parametrize("tta", [False, True])
def test_an_ensemble_predicts_the_mean_of_its_members_probabilities(runs, tmp_path, tta):
    raw, (a, b) = runs
    probs = {}
    for name, models in (("a", a), ("b", b), ("ab", [a, b])):
        predict(raw / "imagesTs", tmp_path / name, models, tta=tta, save_probabilities=True, progress=False)
        probs[name] = np.load(tmp_path / name / "case_ts000.npz")["probabilities"].astype(np.float32)
    assert probs["ab"] == pytest.approx((probs["a"] + probs["b"]) / 2, abs=2e-3)  # float16 files
    assert not np.allclose(probs["a"], probs["b"], atol=1e-2)  # two different models, so the test can fail


def test_ensemble_refuses_models_that_preprocess_differently(runs):
    _, (a, b) = runs
    first, second = load_predictor(a), load_predictor(b)
    other = dataclasses.replace(second, plan=dataclasses.replace(second.plan, target_spacing=(2.0, 2.0, 2.0)))
    with pytest.raises(PredictionError, match="preprocesses differently.*target_spacing"):
        ensemble([first, other], ["a", "b"])


def test_parts_cover_the_folder_once(runs, tmp_path, capsys):
    raw, (a, b) = runs
    out = tmp_path / "out"
    written = [predict(raw / "imagesTs", out, a, part=(i, 2), progress=False) for i in (0, 1)]
    assert [[p.name for p in w] for w in written] == [["case_ts000.nii.gz", "case_ts002.nii.gz"], ["case_ts001.nii.gz"]]
    assert predict(raw / "imagesTs", out, a, part=(0, 2), progress=False) == []  # done: nothing redone
    assert main(["predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "cli"), "-m", str(a), str(b),
                 "--part", "2/3", "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.nii.gz")) == ["case_ts002.nii.gz"]
    assert parse_part("3/4") == (3, 4)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(PredictionError, match="I/N"):
            parse_part(bad)
    assert main(["predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "x"), "-m", str(a), "--part", "2/2"]) == 1
    assert "--part" in capsys.readouterr().err
    assert main(["predict", "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "x"), "-m", "model.onnx", str(a)]) == 1
    assert "mixes .onnx files and run folders" in capsys.readouterr().err


def test_a_model_named_twice_is_refused(runs, tmp_path):
    """``-m f0 f0`` (or ``f0 ./f0``) averaged a model with itself without a word."""
    raw, members = runs
    again = members[0].parent / "." / members[0].name
    with pytest.raises(PredictionError, match="given more than once"):
        predict(raw / "imagesTs", tmp_path / "out", [members[0], again], progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))
