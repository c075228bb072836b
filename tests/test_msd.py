"""MSD -> nnU-Net v2 conversion: geometry and voxels equal per channel, then verify passes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightseg.cli import main
from lightseg.data.msd import convert_msd
from lightseg.data.verify import verify_dataset
from lightseg.errors import DatasetError, ImageError

SHAPE = (10, 9, 7)


def oblique_affine() -> np.ndarray:
    """Anisotropic spacing, a rotation about z and an offset origin: nothing identity-like."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (-40.5, 12.25, 7.0)
    return affine


def save(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 2) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qcode)
    image.set_sform(affine, code=scode)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def make_msd_task(root: Path, num_channels: int = 2, cases: tuple[str, ...] = ("brain_001", "brain_002")) -> Path:
    rng = np.random.default_rng(0)
    affine = oblique_affine()
    training = []
    for i, case in enumerate(cases):
        dtype = np.float32 if i == 0 else np.int16
        shape = SHAPE + (num_channels,) if num_channels > 1 else SHAPE
        save(root / "imagesTr" / f"{case}.nii.gz", (rng.normal(0, 100, shape)).astype(dtype), affine)
        save(root / "labelsTr" / f"{case}.nii.gz", rng.integers(0, 3, SHAPE).astype(np.uint8), affine)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    save(root / "imagesTs" / "brain_100.nii.gz", rng.normal(0, 1, shape).astype(np.float32), affine)
    (root / "imagesTr" / "._brain_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    training.append({"image": "./imagesTr/._brain_001.nii.gz", "label": "./labelsTr/._brain_001.nii.gz"})
    modality = {"0": "FLAIR", "1": "T1w"} if num_channels == 2 else {"0": "MRI"}
    (root / "dataset.json").write_text(json.dumps({
        "name": "BrainTiny", "description": "fake MSD task", "tensorImageSize": "4D", "licence": "CC-BY-SA 4.0",
        "modality": modality, "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": len(cases), "numTest": 1, "training": training, "test": ["./imagesTs/brain_100.nii.gz"],
    }))
    return root


def test_round_trip_keeps_geometry_and_voxels(tmp_path):
    task = make_msd_task(tmp_path / "Task01_BrainTiny")
    out = convert_msd(task, tmp_path / "Dataset001_BrainTiny", workers=1)
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "FLAIR", "1": "T1w"}
    assert spec["labels"] == {"background": 0, "edema": 1, "tumour": 2}
    assert spec["numTraining"] == 2 and spec["file_ending"] == ".nii.gz"
    assert spec["licence"] == "CC-BY-SA 4.0" and "modality" not in spec and "training" not in spec
    for case in ("brain_001", "brain_002"):
        source = nib.load(task / "imagesTr" / f"{case}.nii.gz")
        data = np.asanyarray(source.dataobj)
        for c in range(2):
            channel = nib.load(out / "imagesTr" / f"{case}_{c:04d}.nii.gz")
            assert channel.shape == SHAPE
            assert channel.get_data_dtype() == source.get_data_dtype()
            np.testing.assert_array_equal(np.asanyarray(channel.dataobj), data[..., c])
            np.testing.assert_array_equal(channel.affine, source.affine)
            np.testing.assert_allclose(channel.get_qform(), source.get_qform(), atol=1e-6)
            np.testing.assert_array_equal(channel.get_sform(), source.get_sform())
            assert (int(channel.header["qform_code"]), int(channel.header["sform_code"])) == (1, 2)
        label = f"{case}.nii.gz"
        assert (out / "labelsTr" / label).read_bytes() == (task / "labelsTr" / label).read_bytes()
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["brain_100_0000.nii.gz", "brain_100_0001.nii.gz"]
    assert not any(p.name.startswith("._") for p in out.rglob("*"))
    report = verify_dataset(out, workers=1)
    assert report.ok, report.format()
    assert (report.num_training, report.num_test) == (2, 1)


def test_single_modality_is_copied(tmp_path):
    task = make_msd_task(tmp_path / "Task02_Heart", num_channels=1)
    out = convert_msd(task, tmp_path / "out", workers=1)
    for case in ("brain_001", "brain_002"):
        assert (out / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == (task / "imagesTr" / f"{case}.nii.gz").read_bytes()
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "MRI"}
    assert verify_dataset(out, workers=1).ok


def test_rerun_skips_finished_cases(tmp_path):
    task = make_msd_task(tmp_path / "task")
    out = convert_msd(task, tmp_path / "out", workers=1)
    done = out / "imagesTr" / "brain_001_0000.nii.gz"
    before = done.stat().st_mtime_ns
    (out / "labelsTr" / "brain_002.nii.gz").unlink()  # as if killed before the last file of this case
    convert_msd(task, out, workers=1)
    assert done.stat().st_mtime_ns == before
    assert (out / "labelsTr" / "brain_002.nii.gz").is_file()
    assert verify_dataset(out, workers=1).ok


def test_missing_files_are_all_named(tmp_path):
    task = make_msd_task(tmp_path / "task")
    (task / "imagesTr" / "brain_001.nii.gz").unlink()
    (task / "labelsTr" / "brain_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match="2 file") as info:
        convert_msd(task, tmp_path / "out", workers=1)
    assert "brain_001.nii.gz" in str(info.value) and "brain_002.nii.gz" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_channel_count_mismatch(tmp_path):
    task = make_msd_task(tmp_path / "task")
    obj = json.loads((task / "dataset.json").read_text())
    obj["modality"] = {"0": "FLAIR", "1": "T1w", "2": "T2"}
    (task / "dataset.json").write_text(json.dumps(obj))
    with pytest.raises(ImageError, match="3 channel"):
        convert_msd(task, tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_not_an_msd_task(tmp_path, synthetic_dataset):
    with pytest.raises(DatasetError, match="MSD key 'modality'"):
        convert_msd(synthetic_dataset, tmp_path / "out")
    with pytest.raises(DatasetError, match="not found"):
        convert_msd(tmp_path / "nothing", tmp_path / "out")


def test_bad_label_keys(tmp_path):
    task = make_msd_task(tmp_path / "task")
    obj = json.loads((task / "dataset.json").read_text())
    obj["labels"] = {"background": 0}
    (task / "dataset.json").write_text(json.dumps(obj))
    with pytest.raises(DatasetError, match="map integers to names"):
        convert_msd(task, tmp_path / "out")


def test_refuses_another_dataset_in_output(tmp_path, synthetic_dataset):
    task = make_msd_task(tmp_path / "task")
    with pytest.raises(DatasetError, match="another data set"):
        convert_msd(task, synthetic_dataset, workers=1)


def test_cli(tmp_path, capsys):
    task = make_msd_task(tmp_path / "task")
    assert main(["convert-msd", str(task), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert "2 training" in capsys.readouterr().out
    assert main(["convert-msd", str(tmp_path / "none"), str(tmp_path / "out2")]) == 1
    assert "not found" in capsys.readouterr().err
