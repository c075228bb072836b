"""Fuzzing the readers of user-editable files: any JSON value, any bytes, any corruption.

``dataset.json`` -> a :class:`DatasetSpec` or :class:`DatasetError`; ``plan.json`` -> a
:class:`Plan` or :class:`PlanError`; a checkpoint file -> a state dict or
:class:`CheckpointError`. Never another exception: the CLI would show a traceback.
"""

from __future__ import annotations

import copy
import io
import pickle
import random
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightseg.data.dataset import parse_dataset_json, read_dataset_json
from lightseg.data.plan import load_plan, parse_plan
from lightseg.errors import CheckpointError, DatasetError, PlanError
from lightseg.run_folder import load_checkpoint

SCALARS = (st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8))
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                       max_leaves=16)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

DATASET = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "wt": [1, 2, 3], "tc": [2, 3], "et": [3]},
           "regions_class_order": [1, 2, 3], "numTraining": 2, "file_ending": ".nii.gz", "name": "x"}
PLAN = {"dataset_name": "x", "channel_names": ["CT", "MR"], "label_values": [0, 1], "target_spacing": [1.0, 1.0, 3.0],
        "patch_size": [16, 16, 16], "normalization": [{"scheme": "ct", "clip": [0, 1], "mean": 0, "std": 1}, {"scheme": "zscore"}],
        "crop_to_nonzero": True, "image_dtype": "float32", "anisotropy_threshold": 3.0, "median_shape": [1, 2, 3],
        "format_version": 1}


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        out += _paths(value, prefix + (key,))
    return out


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    """``valid`` with 1-3 values anywhere in it replaced by any JSON value, or deleted."""
    obj = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(obj)))
        value = draw(JSONISH)
        if not path:
            obj = value
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return obj


def test_the_valid_documents_parse():
    assert parse_dataset_json(DATASET).num_classes == 3
    assert parse_plan(PLAN, "plan").patch_size == (16, 16, 16)


@FUZZ
@given(mutated(DATASET))
def test_dataset_json_reader_raises_only_dataset_errors(obj):
    try:
        spec = parse_dataset_json(obj)
    except DatasetError as exc:
        assert "dataset.json" in str(exc)
    else:
        assert spec.num_channels >= 1 and 0 in spec.label_values


@FUZZ
@given(JSONISH)
def test_dataset_json_reader_on_any_json_value(obj):
    with pytest.raises(DatasetError):
        parse_dataset_json(obj)


@FUZZ
@given(mutated(PLAN))
def test_plan_reader_raises_only_plan_errors(obj):
    try:
        plan = parse_plan(obj, "plan.json")
    except PlanError as exc:
        assert "plan.json" in str(exc)
    else:
        assert len(plan.normalization) == len(plan.channel_names) and min(plan.target_spacing) > 0


@FUZZ
@given(JSONISH)
def test_plan_reader_on_any_json_value(obj):
    with pytest.raises(PlanError):
        parse_plan(obj, "plan.json")


@pytest.mark.parametrize("text", [b"[" * 100_000, b'{"a":' * 50_000, b"", b"\x00\xff", b"NaN", b'{"numTraining": 1e999}'])
def test_files_that_are_not_json_documents(tmp_path, text):
    (tmp_path / "dataset.json").write_bytes(text)
    (tmp_path / "plan.json").write_bytes(text)
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset_json(tmp_path / "dataset.json")
    with pytest.raises(PlanError, match="plan.json"):
        load_plan(tmp_path / "plan.json")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_corrupted_checkpoints_load_or_raise_checkpoint_error(tmp_path, legacy):
    """200 seeded corruptions (byte flips, truncations, junk after a pickle header) of a real state
    dict, in torch's zip format and its older pickle format."""
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(4, 3)}, "epoch": 2}, buffer, _use_new_zipfile_serialization=not legacy)
    good = buffer.getvalue()
    rng = random.Random(7)
    path = tmp_path / "c.pth"
    outcomes = {"loaded": 0, "refused": 0, "refused from an unusual exception": 0}
    for index in range(200):
        if index % 3 == 0:
            data = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif index % 3 == 1:
            data = good[: rng.randrange(len(good))]
        else:
            data = good[:2] + rng.randbytes(rng.randint(0, 64))
        path.write_bytes(bytes(data))
        try:
            load_checkpoint(path)
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            assert str(path) in str(exc)
            outcomes["refused"] += 1
            outcomes["refused from an unusual exception"] += not isinstance(exc.__cause__, (RuntimeError, pickle.UnpicklingError))
    assert outcomes["refused"] > 100, outcomes  # the corruptions were real; a flip inside tensor bytes still loads
    if legacy:  # IndexError, KeyError, struct.error ... escaped load_checkpoint before
        assert outcomes["refused from an unusual exception"] > 0, outcomes
