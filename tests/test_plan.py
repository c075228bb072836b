"""Plan rules on plain numbers (no files) and plan.json validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lightseg.data.dataset import DatasetSpec
from lightseg.data.fingerprint import CaseFingerprint, make_fingerprint
from lightseg.data.plan import (
    check_plan_matches,
    default_patch_size,
    load_plan,
    override,
    parse_plan,
    plan_dataset,
    save_plan,
    target_spacing_rule,
)
from lightseg.errors import PlanError


def _case(name, spacing, shape, samples):
    return CaseFingerprint(name, spacing, shape, shape, (1,), np.asarray(samples, np.float32)[None])


def _spec(channels=("MR",)):
    return DatasetSpec(channel_names=channels, labels={"background": 0, "a": 1, "b": 2}, num_training=5, name="toy")


def test_anisotropic_axis_gets_tenth_percentile():
    z = np.array([2.5, 3.0, 4.0, 4.0, 5.0, 6.0])
    spacings = np.stack([np.full(6, 0.8), np.full(6, 0.8), z], axis=1)
    shapes = np.tile([200, 200, 30], (6, 1))
    target = target_spacing_rule(spacings, shapes)
    assert target[:2] == pytest.approx((0.8, 0.8))
    assert target[2] == pytest.approx(np.percentile(z, 10))
    assert target[2] < np.median(z)


def test_anisotropic_axis_keeps_median_when_it_is_not_short():
    spacings = np.tile([0.8, 0.8, 4.0], (5, 1)) * np.array([[1, 1, s] for s in (0.75, 1, 1, 1, 1.25)])
    shapes = np.tile([100, 100, 90], (5, 1))  # 90 * 3 >= 100: not a short axis
    assert target_spacing_rule(spacings, shapes) == pytest.approx((0.8, 0.8, 4.0))


def test_isotropic_data_gets_median():
    spacings = np.array([[1.0, 1.1, 1.2], [0.9, 1.0, 1.0], [1.0, 1.0, 1.4]])
    assert target_spacing_rule(spacings, np.tile([64, 64, 64], (3, 1))) == pytest.approx((1.0, 1.0, 1.2))


def test_percentile_target_never_goes_below_the_in_plane_spacing():
    shapes = np.tile([300, 300, 40], (5, 1))
    spacings = np.array([[1.0, 1.0, z] for z in (0.5, 3.0, 3.0, 3.0, 3.0)])
    assert target_spacing_rule(spacings, shapes)[2] == pytest.approx(np.percentile([0.5, 3, 3, 3, 3], 10))
    spacings = np.array([[1.0, 1.0, z] for z in (0.2, 0.2, 3.0, 3.0, 3.0)])
    assert target_spacing_rule(spacings, shapes) == pytest.approx((1.0, 1.0, 1.0))


def test_default_patch_size_rounds_to_16_and_caps_at_128():
    assert default_patch_size((130, 150, 40)) == (128, 128, 48)
    assert default_patch_size((20, 7, 300)) == (16, 16, 128)
    assert default_patch_size((100, 33, 56)) == (96, 32, 64)


def test_plan_on_anisotropic_fingerprint():
    rng = np.random.default_rng(0)
    cases = [
        _case(f"c{i}", (0.8, 0.8, z), (160, 160, 24), rng.normal(100, 10, 500)) for i, z in enumerate((3, 4, 4, 4, 5))
    ]
    plan = plan_dataset(_spec(), make_fingerprint(cases, 1))
    assert plan.target_spacing == pytest.approx((0.8, 0.8, float(np.percentile([3, 4, 4, 4, 5], 10))))
    assert plan.median_shape == (160, 160, round(24 * 4 / plan.target_spacing[2]))
    assert plan.patch_size == (128, 128, default_patch_size(plan.median_shape)[2])
    assert all(p % 16 == 0 for p in plan.patch_size)
    assert plan.label_values == (0, 1, 2) and plan.channel_names == ("MR",)
    assert plan.reorient  # new plans turn cases to RAS; plans without the key do not (below)


def test_normalisation_chosen_by_channel_name():
    samples = np.concatenate([np.linspace(-1000, 2000, 1001), [5000.0]])
    case = CaseFingerprint("a", (1, 1, 1), (8, 8, 8), (8, 8, 8), (1,), np.stack([samples] * 3).astype(np.float32))
    plan = plan_dataset(_spec(("ct", "T2", "noNorm")), make_fingerprint([case], 3))
    ct, mr, none = plan.normalization
    assert ct.scheme == "ct"
    assert ct.clip == pytest.approx(tuple(np.percentile(samples, [0.5, 99.5])), rel=1e-5)
    assert ct.mean == pytest.approx(samples.mean(), rel=1e-5) and ct.std == pytest.approx(samples.std(), rel=1e-5)
    assert mr.scheme == "zscore" and mr.clip is None
    assert none.scheme == "none"


def test_overrides_and_json_round_trip(tmp_path):
    cases = [_case("a", (1.0, 1.0, 1.0), (40, 40, 40), [1.0, 2.0])]
    plan = plan_dataset(_spec(), make_fingerprint(cases, 1), target_spacing=(2, 2, 2), patch_size=(16, 32, 48))
    assert plan.target_spacing == (2.0, 2.0, 2.0) and plan.patch_size == (16, 32, 48)
    assert plan.median_shape == (20, 20, 20)
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json") == plan
    edited = override(plan, patch_size=(32, 32, 32), image_dtype="float16")
    assert edited.patch_size == (32, 32, 32) and edited.image_dtype == "float16"
    assert edited.cache_key() != plan.cache_key()  # dtype changes the arrays
    assert override(plan, patch_size=(64, 64, 64)).cache_key() == plan.cache_key()  # patch does not
    assert override(plan, target_spacing=(1, 1, 1)).cache_key() != plan.cache_key()


def _good_plan() -> dict:
    return {
        "dataset_name": "toy",
        "channel_names": ["CT"],
        "label_values": [0, 1],
        "target_spacing": [1.0, 1.0, 2.5],
        "patch_size": [64, 64, 32],
        "normalization": [{"scheme": "ct", "clip": [-100.0, 300.0], "mean": 50.0, "std": 80.0}],
        "crop_to_nonzero": True,
        "image_dtype": "float32",
        "anisotropy_threshold": 3.0,
        "median_shape": None,
        "format_version": 1,
        "use_mask_for_norm": [False],
        "intensity_profile": [None],
        "zscore_region": "nonzero",
        "reorient": False,
    }


def test_good_plan_parses_and_round_trips():
    plan = parse_plan(_good_plan(), "plan.json")
    assert plan.to_json() == _good_plan()
    older = parse_plan({k: v for k, v in _good_plan().items() if k != "reorient"}, "plan.json")
    assert not older.reorient and older.cache_key() == plan.cache_key()  # old caches stay fresh
    assert parse_plan({**_good_plan(), "reorient": True}, "plan.json").cache_key() != plan.cache_key()
    assert plan.normalization[0].clip == (-100.0, 300.0)


@pytest.mark.parametrize(
    "key, value",
    [
        ("target_spacing", [1.0, -1.0, 2.0]),
        ("target_spacing", [1.0, 2.0]),
        ("patch_size", [64, 64, 32.5]),
        ("label_values", [1, 2]),
        ("label_values", [0, 2, 1]),
        ("image_dtype", "float64"),
        ("crop_to_nonzero", "yes"),
        ("channel_names", []),
        ("normalization", []),
        ("format_version", 2),
        ("patchsize", [1, 2, 3]),
        ("anisotropy_threshold", 0.5),
        ("reorient", "yes"),
    ],
)
def test_bad_plan_json_names_the_key(tmp_path, key, value):
    obj = _good_plan()
    obj[key] = value
    (tmp_path / "plan.json").write_text(json.dumps(obj))
    with pytest.raises(PlanError, match=f"'{key}'"):
        load_plan(tmp_path / "plan.json")


@pytest.mark.parametrize(
    "entry, key",
    [
        ({"scheme": "minmax"}, "normalization[0]"),
        ({"scheme": "ct", "clip": [300, -100], "mean": 0.0, "std": 1.0}, "normalization[0].clip"),
        ({"scheme": "ct", "clip": [-100, 300], "mean": 0.0}, "normalization[0].std"),
        ({"scheme": "zscore", "mean": 1.0}, "normalization[0].mean"),
    ],
)
def test_bad_normalisation_entry_names_the_key(entry, key):
    obj = _good_plan()
    obj["normalization"] = [entry]
    with pytest.raises(PlanError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_plan(obj, "plan.json")


def test_missing_key_invalid_json_and_missing_file(tmp_path):
    obj = _good_plan()
    del obj["patch_size"]
    with pytest.raises(PlanError, match="'patch_size' is missing"):
        parse_plan(obj, "plan.json")
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "missing.json")


def test_plan_for_another_data_set_is_refused():
    plan = parse_plan(_good_plan(), "plan.json")
    check_plan_matches(plan, DatasetSpec(("CT",), {"bg": 0, "x": 1}, 1), "plan.json")
    with pytest.raises(PlanError, match="channel_names"):
        check_plan_matches(plan, DatasetSpec(("MR",), {"bg": 0, "x": 1}, 1), "plan.json")
    with pytest.raises(PlanError, match="label_values"):
        check_plan_matches(plan, DatasetSpec(("CT",), {"bg": 0, "x": 1, "y": 2}, 1), "plan.json")
