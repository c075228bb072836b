"""nnU-Net v2 data set conventions: the ``dataset`` key, required ``file_ending``, preprocessed folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lightseg.cli import main
from lightseg.data import make_synthetic_dataset
from lightseg.data.dataset import load_dataset
from lightseg.data.preprocess import preprocess_dataset
from lightseg.data.verify import verify_dataset
from lightseg.errors import DatasetError
from lightseg.io import write_json


@pytest.fixture
def listed(tmp_path):
    """A data set whose files live outside imagesTr/labelsTr, named by dataset.json's ``dataset`` key."""
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=2, shape=(16, 16, 16), num_channels=2)
    (raw / "scans").mkdir()
    shutil.move(raw / "imagesTr" / "case_tr001_0001.nii.gz", tmp_path / "elsewhere.nii.gz")
    for path in sorted((raw / "imagesTr").iterdir()) + sorted((raw / "labelsTr").iterdir()):
        shutil.move(path, raw / "scans" / f"{path.parent.name}-{path.name}")
    shutil.rmtree(raw / "imagesTr")
    shutil.rmtree(raw / "labelsTr")
    spec = json.loads((raw / "dataset.json").read_text())
    spec["dataset"] = {
        "p0": {"images": ["scans/imagesTr-case_tr000_0000.nii.gz", "scans/imagesTr-case_tr000_0001.nii.gz"],
               "label": "scans/labelsTr-case_tr000.nii.gz"},
        "p1": {"images": ["scans/imagesTr-case_tr001_0000.nii.gz", str(tmp_path / "elsewhere.nii.gz")],
               "label": "$LIGHTSEG_TEST_LABELS/labelsTr-case_tr001.nii.gz"},
    }
    write_json(raw / "dataset.json", spec)
    return raw


def test_the_dataset_key_names_the_cases(listed, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTSEG_TEST_LABELS", "scans")
    dataset = load_dataset(listed)
    assert [c.name for c in dataset.training] == ["p0", "p1"]
    assert dataset.training[1].images[1] == tmp_path / "elsewhere.nii.gz"  # absolute paths stay absolute
    assert verify_dataset(listed, workers=1).ok
    plan = preprocess_dataset(listed, tmp_path / "cache", workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "cache" / "cases").glob("*.json")) == ["p0.json", "p1.json"]
    assert plan.label_values == (0, 1, 2)


def test_a_broken_dataset_key_is_a_clear_error(listed):
    spec = json.loads((listed / "dataset.json").read_text())
    spec["dataset"]["p0"]["images"] = spec["dataset"]["p0"]["images"][:1]
    write_json(listed / "dataset.json", spec)
    with pytest.raises(DatasetError, match="case 'p0' lists 1 images but 'channel_names' declares 2"):
        load_dataset(listed)
    report = verify_dataset(listed, workers=1)
    assert not report.ok and "lists 1 images" in report.format()


def test_verify_requires_file_ending_as_nnunet(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=1, shape=(8, 8, 8))
    spec = json.loads((raw / "dataset.json").read_text())
    del spec["file_ending"]
    write_json(raw / "dataset.json", spec)
    report = verify_dataset(raw, workers=1)
    assert [p.check for p in report.problems] == ["file-ending"] and "nnU-Net requires it" in report.format()


def test_an_nnunet_preprocessed_folder_points_to_the_raw_set(tmp_path, capsys):
    folder = tmp_path / "nnUNet_preprocessed" / "Dataset001_Heart"
    (folder / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    write_json(folder / "dataset.json", {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "heart": 1},
                                         "numTraining": 1, "file_ending": ".nii.gz"})
    write_json(folder / "nnUNetPlans.json", {"dataset_name": "Dataset001_Heart"})
    write_json(folder / "splits_final.json", [{"train": ["a"], "val": ["b"]}])
    assert main(["train", str(folder), "-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "nnU-Net preprocessed folder (nnUNetPlans.json)" in err and "$nnUNet_raw/Dataset001_Heart" in err
    assert not np.any([p.name == "cases" for p in tmp_path.rglob("*")])  # nothing preprocessed


@pytest.mark.parametrize("fine, coarse", [(0.8, 2.4), (0.7, 2.1), (0.6, 1.8), (0.5, 1.5)])
def test_exactly_3x_is_anisotropic_in_planner_and_resampler_alike(fine, coarse):
    from lightseg.data.plan import target_spacing_rule
    from lightseg.data.resample import anisotropic_axis

    for f, c in ((fine, coarse), (float(np.float32(fine)), float(np.float32(coarse)))):  # as typed, as read from files
        assert anisotropic_axis((f, f, c)) == 2
        spacings = np.array([(f, f, c)] * 5 + [(f, f, 0.9 * c)])
        shapes = np.array([(100, 100, 10)] * 6)
        assert target_spacing_rule(spacings, shapes)[2] == pytest.approx(0.95 * c)  # the 10th percentile: rule fired
    assert anisotropic_axis((fine, fine, coarse * 0.999)) is None


def test_cubic_resampling_is_clipped_to_the_input_range_as_nnunet():
    from lightseg.data.resample import _resample_volume, resample_image

    rng = np.random.default_rng(0)
    image = np.where(rng.random((1, 12, 12, 6)) > 0.5, 1.0, -1.0).astype(np.float32)
    image[0, :, :, 3] *= 3  # one slice with a wider range
    raw = _resample_volume(image[0], (30, 30, 6), [3, 3, 0])
    assert raw.max() > 3.0 or raw[..., :3].max() > 1.0  # cubic overshoots: the clip below does something
    out = resample_image(image, (1.0, 1.0, 3.0), (0.4, 0.4, 3.0))[0]
    assert out.shape == (30, 30, 6)
    assert out[..., 3].max() <= 3.0 and out[..., 3].min() >= -3.0
    assert out[..., :3].max() <= 1.0 and out[..., :3].min() >= -1.0  # per slice, as nnU-Net's in-plane resize
    iso = resample_image(image[:, :, :, :3], (1.0, 1.0, 1.0), (0.7, 0.7, 0.7))
    assert iso.max() <= 1.0 and iso.min() >= -1.0
