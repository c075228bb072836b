"""dataset.json parsing and case discovery."""

from __future__ import annotations


import pytest

from lightseg.data import load_dataset, make_synthetic_dataset
from lightseg.data.dataset import parse_dataset_json
from lightseg.errors import DatasetError


def test_load_synthetic(synthetic_dataset):
    ds = load_dataset(synthetic_dataset)
    assert ds.spec.num_channels == 1
    assert ds.spec.num_classes == 3
    assert len(ds.training) == 4
    assert all(p.is_file() for c in ds.training for p in c.images)
    assert all(c.label.is_file() for c in ds.training)


def test_regions(tmp_path):
    root = make_synthetic_dataset(tmp_path / "r", num_cases=1, shape=(8, 8, 8), num_classes=4, regions=True)
    spec = load_dataset(root).spec
    assert spec.has_regions
    assert spec.regions == ((1, 2, 3), (2, 3), (3,))
    assert spec.num_classes == 3
    assert spec.regions_class_order == (1, 2, 3)
    assert spec.label_values == (0, 1, 2, 3)
    assert parse_dataset_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ([], "JSON object"),
        ({"labels": {"background": 0}, "numTraining": 1}, "channel_names"),
        ({"channel_names": {"1": "T1"}, "labels": {"background": 0}, "numTraining": 1}, "without gaps"),
        ({"channel_names": {"0": "T1"}, "labels": {"background": "zero"}, "numTraining": 1}, "background"),
        ({"channel_names": {"0": "T1"}, "labels": {"a": 1}, "numTraining": 1}, "background as 0"),
        ({"channel_names": {"0": "T1"}, "labels": {"background": 0}, "numTraining": -1}, "numTraining"),
        ({"channel_names": {"0": "T1"}, "labels": {"background": 0, "wt": [1, 2]}, "numTraining": 1}, "regions_class_order"),
    ],
)
def test_bad_dataset_json(obj, fragment):
    with pytest.raises(DatasetError, match=fragment):
        parse_dataset_json(obj)


def test_not_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(tmp_path)
