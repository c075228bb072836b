"""The ``percentile`` normalisation (LightMedSeg's ACDC setting): plan.json, the function itself,
the same arrays in the training cache and at prediction, and the lightmedseg-acdc recipe's check."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import lightseg
import lightseg.data.preprocess as preprocess_module
from lightseg.cli import main
from lightseg.data import make_synthetic_dataset
from lightseg.data.intensity import percentile_scale, sorted_percentiles
from lightseg.data.plan import load_plan, override, parse_plan, save_plan
from lightseg.data.preprocess import normalize, preprocess_dataset, preprocess_image
from lightseg.errors import PlanError
from lightseg.training.recipes import check_recipe_plan


def _plan(norms, channels=("MR",), **extra):
    return parse_plan({"dataset_name": "t", "channel_names": list(channels), "label_values": [0, 1],
                       "target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16], "normalization": norms, **extra},
                      "test")


def _image(seed=0, shape=(2, 12, 10, 8)):
    """Positive intensities with a few outliers beyond the 0.5/99.5 percentiles."""
    rng = np.random.default_rng(seed)
    image = rng.gamma(2.0, 150.0, shape).astype(np.float32) + 1
    image[:, 0, 0, :2] = [[5000.0, 9000.0]] * shape[0]
    return image


def test_the_function_clips_to_the_percentiles_and_scales_to_0_1():
    channel = _image()[0]
    low, high = np.percentile(channel, (0.5, 99.5))
    out = channel.copy()
    percentile_scale(out, np.ones(channel.shape, bool))
    np.testing.assert_allclose(out, np.clip((channel - low) / (high - low), 0, 1), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out == 1.0) == pytest.approx(0.005, abs=0.003)  # the top 0.5 % clipped, outliers included
    constant = np.full((4, 4, 4), 7.0, np.float32)
    percentile_scale(constant, np.ones(constant.shape, bool))
    assert np.all(constant == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 7, 1000, 100_003])
def test_percentiles_from_the_sorted_copy_equal_numpys(size, dtype):
    rng = np.random.default_rng(size)
    values = (rng.normal(size=size) * 300 + 20).astype(dtype)
    values[: size // 3] = np.round(values[: size // 3])  # ties
    for q in [(0, 0.5, 5, 25, 50, 75, 95, 99.5, 100), tuple(rng.uniform(0, 100, 7).round(3)), (50,)]:
        assert sorted_percentiles(values, q) == [float(v) for v in np.percentile(values, q)]
    assert sorted_percentiles(values.reshape(-1, 1), (50,)) == [float(np.percentile(values, 50))]
    for bad_values, q in [(values, (50, 101)), (values, (-1,)), (values[:0], (50,))]:
        with pytest.raises((ValueError, IndexError)):  # IndexError for no values
            np.percentile(bad_values, q)
        with pytest.raises(ValueError, match="0 <= q <= 100"):
            sorted_percentiles(bad_values, q)


@pytest.mark.parametrize(("a", "b"), [(3.0, 7.0), (0.01, -40.0), (250.0, 1e4)])
def test_a_case_and_its_intensity_rescaled_copy_normalise_alike(a, b):
    plan = _plan([{"scheme": "percentile"}] * 2, channels=("MR", "T2"))
    image = _image()
    rescaled = image * np.float32(a) + np.float32(b)
    np.testing.assert_allclose(normalize(rescaled.copy(), plan, None), normalize(image.copy(), plan, None), atol=2e-5)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(preprocess_image(rescaled, plan, affine)[0], preprocess_image(image, plan, affine)[0],
                               atol=2e-5)
    zscore = _plan([{"scheme": "zscore"}] * 2, channels=("MR", "T2"))
    assert not np.allclose(normalize(image.copy(), zscore, None), normalize(image.copy(), plan, None), atol=0.1)


def test_the_scheme_round_trips_through_plan_json(tmp_path):
    plan = _plan([{"scheme": "percentile"}, {"scheme": "percentile", "percentiles": [1, 99]}], channels=("MR", "T2"))
    assert [n.percentiles for n in plan.normalization] == [(0.5, 99.5), (1.0, 99.0)]
    save_plan(plan, tmp_path / "plan.json")
    written = json.loads((tmp_path / "plan.json").read_text())["normalization"]
    assert written == [{"scheme": "percentile", "percentiles": [0.5, 99.5]}, {"scheme": "percentile", "percentiles": [1.0, 99.0]}]
    assert load_plan(tmp_path / "plan.json") == plan
    assert plan.cache_key() != _plan([{"scheme": "percentile", "percentiles": [1, 99]}] * 2, channels=("MR", "T2")).cache_key()


@pytest.mark.parametrize(("entry", "key"), [
    ({"scheme": "percentile", "percentiles": [99.5, 0.5]}, "normalization[0].percentiles"),
    ({"scheme": "percentile", "percentiles": [0.5, 100.5]}, "normalization[0].percentiles"),
    ({"scheme": "percentile", "percentiles": [-1, 99]}, "normalization[0].percentiles"),
    ({"scheme": "percentile", "percentiles": [0.5]}, "normalization[0].percentiles"),
    ({"scheme": "percentile", "percentiles": "0.5-99.5"}, "normalization[0].percentiles"),
    ({"scheme": "percentile", "clip": [0, 1]}, "normalization[0].clip"),
    ({"scheme": "percentiles"}, "normalization[0]"),
])
def test_bad_percentile_entries_are_refused_naming_the_key(entry, key):
    with pytest.raises(PlanError, match=re.escape(f"'{key}'")):
        _plan([entry])


def test_the_override_sets_every_channel_and_refuses_what_it_cannot_plan():
    zscored = _plan([{"scheme": "zscore"}, {"scheme": "percentile", "percentiles": [1, 99]}], channels=("MR", "T2"),
                    use_mask_for_norm=[True, False],
                    intensity_profile=[{"quantiles": [50], "mean": [0.1], "std": [0.2]}, None])
    turned = override(zscored, normalization="percentile")
    assert [n.to_json() for n in turned.normalization] == [{"scheme": "percentile", "percentiles": [0.5, 99.5]},
                                                           {"scheme": "percentile", "percentiles": [1.0, 99.0]}]
    assert turned.use_mask_for_norm == (False, False) and turned.intensity_profile == (None, None)
    assert turned.cache_key() != zscored.cache_key()  # the cases are redone
    assert override(turned, normalization="percentile") == turned
    with pytest.raises(PlanError, match="fingerprint.*new cache folder"):
        override(turned, normalization="zscore")
    with pytest.raises(PlanError, match="'ct' cannot be chosen"):
        override(turned, normalization="ct")


def test_training_cache_and_prediction_use_the_same_function(tmp_path, monkeypatch):
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=2, shape=(16, 16, 16))
    assert main(["preprocess", str(raw), "-o", str(tmp_path / "cache"), "--workers", "1",
                 "--normalization", "percentile"]) == 0
    cache = tmp_path / "cache"
    plan = load_plan(cache / "plan.json")
    assert [n.scheme for n in plan.normalization] == ["percentile"]
    case = sorted(raw.glob("imagesTr/*_0000.nii.gz"))[0]
    cached = np.load(cache / "cases" / f"{case.name[:-len('_0000.nii.gz')]}_image.npy")
    assert cached.min() == 0.0 and cached.max() == 1.0
    np.testing.assert_array_equal(preprocess_image([nib.load(case)], plan)[0], cached)

    run = lightseg.train(cache, tmp_path / "run", recipe="lightmedseg-acdc", epochs=1, iters_per_epoch=1, batch_size=1,
                         patch_size=(16, 16, 16), device="cpu", workers=0)
    calls = []
    real = preprocess_module.percentile_scale
    monkeypatch.setattr(preprocess_module, "percentile_scale", lambda *a: calls.append(a[2]) or real(*a))
    (tmp_path / "in").mkdir()
    shutil.copy(case, tmp_path / "in" / case.name)
    written = lightseg.predict(tmp_path / "in", tmp_path / "out", run, progress=False)
    assert len(written) == 1 and calls == [(0.5, 99.5)]


def test_the_acdc_recipe_refuses_another_plan_with_the_command_to_run(tmp_path, capsys):
    zscored = _plan([{"scheme": "zscore"}]).to_json()
    with pytest.raises(PlanError, match=r"'lightmedseg-acdc'.*channel 'MR' with 'zscore'.*"
                                        r"lightseg preprocess DATASET_DIR -o CACHE-percentile --normalization percentile"):
        check_recipe_plan("lightmedseg-acdc", zscored, Path("CACHE"))
    check_recipe_plan("lightmedseg-acdc", _plan([{"scheme": "percentile"}]).to_json(), Path("CACHE"))
    check_recipe_plan("lightmedseg", zscored, Path("CACHE"))
    check_recipe_plan(None, zscored, Path("CACHE"))

    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=2, shape=(16, 16, 16))
    preprocess_dataset(raw, tmp_path / "cache", workers=1, progress=False)
    argv = ["train", str(tmp_path / "cache"), "-o", str(tmp_path / "run"), "--recipe", "lightmedseg-acdc",
            "--epochs", "1", "--device", "cpu"]
    assert main(argv) == 1
    assert "--normalization percentile" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()
