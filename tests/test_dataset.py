"""dataset.json parsing and case discovery."""

from __future__ import annotations

import json
import re

import nibabel as nib
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
        ({"channel_names": {"0": "T1"}, "labels": {"background": 1, "a": 0}, "numTraining": 1}, "background as 0"),
        ({"channel_names": {"0": "T1"}, "labels": {"bg": 0, "a": 1}, "numTraining": 1}, "background as 0"),
        ({"channel_names": {"0": "T1"}, "labels": {"background": [0], "a": 1}, "numTraining": 1}, "background"),
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


@pytest.mark.parametrize("declared, actual", [(".nii", ".nii.gz"), (".nii.gz", ".nii")])
def test_a_file_ending_the_files_do_not_have_is_named(tmp_path, declared, actual):
    """A wrong 'file_ending' said "the data set has no training cases" of a folder full of them."""
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=2, shape=(8, 8, 8))
    if actual == ".nii":
        for path in [*raw.glob("imagesTr/*.nii.gz"), *raw.glob("labelsTr/*.nii.gz")]:
            nib.save(nib.load(path), path.with_name(path.name[: -len(".gz")]))
            path.unlink()
    spec = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**spec, "file_ending": declared}))
    with pytest.raises(DatasetError, match=rf"'file_ending' is \"{re.escape(declared)}\", but the 2 files in imagesTr end in "
                                           rf"\"{re.escape(actual)}\"; set \"file_ending\": \"{re.escape(actual)}\""):
        load_dataset(raw)
    (raw / "dataset.json").write_text(json.dumps({**spec, "file_ending": actual}))  # the advice, followed
    assert len(load_dataset(raw).training) == 2
