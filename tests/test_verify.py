"""``verify_dataset``: one real broken NIfTI data set per check, then many problems at once."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightseg.cli import main
from lightseg.data import make_synthetic_dataset
from lightseg.data.verify import verify_dataset
from lightseg.errors import DatasetError


@pytest.fixture
def ds(tmp_path) -> Path:
    """Two training cases and one test case, two channels, 3 classes, 12^3 voxels, spacing 1.5 mm."""
    return make_synthetic_dataset(
        tmp_path / "ds", num_cases=2, num_test=1, shape=(12, 12, 12), num_channels=2, spacing=(1.5, 1.5, 1.5)
    )


def checks(root: Path, **kwargs) -> list[str]:
    return sorted(p.check for p in verify_dataset(root, workers=1, **kwargs).problems)


def rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), path)


def edit_json(root: Path, **changes) -> None:
    obj = json.loads((root / "dataset.json").read_text())
    obj.update(changes)
    (root / "dataset.json").write_text(json.dumps(obj))


IMG = "imagesTr/case_tr000_0000.nii.gz"
LBL = "labelsTr/case_tr000.nii.gz"


def test_clean_dataset_passes(ds):
    report = verify_dataset(ds, workers=1)
    assert report.ok, report.format()
    assert (report.num_training, report.num_test) == (2, 1)
    assert "OK" in report.format()


def test_macos_resource_forks_are_ignored(ds):
    (ds / "imagesTr" / "._case_tr000_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (ds / "labelsTr" / "._case_tr000.nii.gz").write_bytes(b"junk")
    assert checks(ds) == []


def test_missing_folder(tmp_path):
    assert checks(tmp_path / "nope") == ["dataset-folder"]


def test_missing_dataset_json(ds):
    (ds / "dataset.json").unlink()
    report = verify_dataset(ds, workers=1)
    assert [p.check for p in report.problems] == ["dataset-json"]
    assert "not found" in report.problems[0].message


def test_invalid_dataset_json(ds):
    edit_json(ds, channel_names={"1": "T1"})
    assert checks(ds) == ["dataset-json"]


def test_labels_not_consecutive(ds):
    edit_json(ds, labels={"background": 0, "class1": 1, "class2": 3})
    found = checks(ds)
    assert "labels-not-consecutive" in found
    assert "label-values" in found  # the files hold 2, which is no longer declared


def test_file_ending_not_nifti(ds):
    edit_json(ds, file_ending=".nrrd")
    assert "file-ending" in checks(ds)


def test_missing_channel(ds):
    (ds / "imagesTr" / "case_tr001_0001.nii.gz").unlink()
    report = verify_dataset(ds, workers=1)
    assert [(p.check, p.where, p.case) for p in report.problems] == [
        ("missing-channel", "imagesTr/case_tr001_0001.nii.gz", "case_tr001")
    ]
    assert "'MR1'" in report.problems[0].message


def test_missing_label(ds):
    (ds / LBL).unlink()
    assert checks(ds) == ["missing-label"]


def test_label_without_images(ds):
    (ds / "labelsTr" / "orphan.nii.gz").write_bytes((ds / LBL).read_bytes())
    found = checks(ds)
    assert found == ["case-count", "missing-channel", "missing-channel"]


def test_case_count(ds):
    edit_json(ds, numTraining=5)
    report = verify_dataset(ds, workers=1)
    assert [p.check for p in report.problems] == ["case-count"]
    assert "'numTraining' is 5 but 2" in report.problems[0].message


def test_no_cases(tmp_path):
    root = make_synthetic_dataset(tmp_path / "e", num_cases=0)
    assert checks(root) == ["no-cases"]


def test_extra_channel(tmp_path):
    root = make_synthetic_dataset(tmp_path / "one", num_cases=1, shape=(8, 8, 8))
    (root / "imagesTr" / "case_tr000_0001.nii.gz").write_bytes((root / IMG).read_bytes())
    report = verify_dataset(root, workers=1)
    assert [(p.check, p.case) for p in report.problems] == [("extra-channel", "case_tr000")]
    assert "declares 1 channel" in report.problems[0].message


def test_unexpected_file_names(ds):
    (ds / "imagesTr" / "case_tr000.nii.gz").write_bytes((ds / IMG).read_bytes())
    (ds / "labelsTr" / "case_tr000.nii").write_bytes(b"")
    (ds / "imagesTr" / "README.txt").write_text("notes are not images")
    assert checks(ds) == ["unexpected-file", "unexpected-file"]


def test_truncated_file(ds):
    path = ds / IMG
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = verify_dataset(ds, workers=1)
    assert [(p.check, p.where) for p in report.problems] == [("unreadable", IMG)]
    assert "truncated" in report.problems[0].message


def test_garbage_file(ds):
    (ds / LBL).write_bytes(b"this is not a NIfTI file at all" * 20)
    assert checks(ds) == ["unreadable"]


def test_garbage_gzip_content(ds):
    (ds / LBL).write_bytes(gzip.compress(b"gzip fine, NIfTI header not" * 40))
    assert checks(ds) == ["unreadable"]


def test_shape_mismatch(ds):
    label = np.asanyarray(nib.load(ds / LBL).dataobj)
    rewrite(ds / LBL, data=np.ascontiguousarray(label[:, :, :10]))
    report = verify_dataset(ds, workers=1)
    assert [(p.check, p.where) for p in report.problems] == [("shape-mismatch", LBL)]
    assert "(12, 12, 10)" in report.problems[0].message


def test_spacing_mismatch(ds):
    rewrite(ds / "imagesTr/case_tr000_0001.nii.gz", affine=np.diag([1.5, 1.5, 2.0, 1.0]))
    assert checks(ds) == ["spacing-mismatch"]


def test_origin_mismatch(ds):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = (0.0, 0.0, 3.0)
    rewrite(ds / LBL, affine=affine)
    assert checks(ds) == ["origin-mismatch"]


def test_direction_mismatch(ds):
    flip = np.diag([-1.5, 1.5, 1.5, 1.0])  # same spacing and origin, x axis reversed
    rewrite(ds / LBL, affine=flip)
    assert checks(ds) == ["direction-mismatch"]


def test_float32_rounding_is_tolerated(ds):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = (1e-5, 0.0, 0.0)
    affine[0, 1] = 1e-6
    rewrite(ds / LBL, affine=affine)
    assert checks(ds) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image(ds, bad):
    data = nib.load(ds / IMG).get_fdata(dtype=np.float32)
    data[3, 4, 5] = bad
    rewrite(ds / IMG, data=data)
    report = verify_dataset(ds, workers=1)
    assert [(p.check, p.where) for p in report.problems] == [("non-finite", IMG)]
    assert ("1 NaN" if np.isnan(bad) else "1 Inf") in report.problems[0].message


def test_undeclared_label_value(ds):
    label = np.asanyarray(nib.load(ds / LBL).dataobj).copy()
    label[0, 0, 0] = 7
    rewrite(ds / LBL, data=label)
    report = verify_dataset(ds, workers=1)
    assert [p.check for p in report.problems] == ["label-values"]
    assert "[7]" in report.problems[0].message


def test_negative_label_value(ds):
    label = np.asanyarray(nib.load(ds / LBL).dataobj).astype(np.int16)
    label[0, 0, 0] = -1
    rewrite(ds / LBL, data=label)
    assert checks(ds) == ["label-values"]


def test_non_integer_label(ds):
    label = np.asanyarray(nib.load(ds / LBL).dataobj).astype(np.float32)
    label[1, 1, 1] = 0.5
    rewrite(ds / LBL, data=label)
    assert checks(ds) == ["label-not-integer"]


def test_4d_image_points_to_convert_msd(ds):
    data = nib.load(ds / IMG).get_fdata(dtype=np.float32)
    rewrite(ds / IMG, data=np.stack([data, data], axis=-1))
    report = verify_dataset(ds, workers=1)
    assert [p.check for p in report.problems] == ["not-3d"]
    assert "convert-msd" in report.problems[0].message


def test_label_not_3d(ds):
    label = np.asanyarray(nib.load(ds / LBL).dataobj)
    rewrite(ds / LBL, data=np.stack([label, label], axis=-1))
    report = verify_dataset(ds, workers=1)
    assert [p.check for p in report.problems] == ["not-3d"]
    assert "one file per channel" in report.problems[0].message


def test_a_trailing_singleton_axis_is_read_as_3d(ds):
    """(X, Y, Z, 1) files, as some converters write 3-D scans: ITK (nnU-Net's reader) reads them as 3-D."""
    for path in (ds / LBL, ds / IMG):
        rewrite(path, data=np.asanyarray(nib.load(path).dataobj)[..., None])
    assert verify_dataset(ds, workers=1).problems == ()


def test_test_set_is_checked(ds):
    (ds / "imagesTs" / "case_ts000_0001.nii.gz").unlink()
    data = nib.load(ds / "imagesTs/case_ts000_0000.nii.gz").get_fdata(dtype=np.float32)
    data[0, 0, 0] = np.nan
    rewrite(ds / "imagesTs/case_ts000_0000.nii.gz", data=data)
    assert checks(ds) == ["missing-channel", "non-finite"]


def test_many_problems_listed_at_once(ds):
    edit_json(ds, numTraining=3)
    (ds / "imagesTr" / "case_tr001_0001.nii.gz").unlink()
    path = ds / IMG
    path.write_bytes(path.read_bytes()[:100])
    label = np.asanyarray(nib.load(ds / "labelsTr/case_tr001.nii.gz").dataobj).copy()
    label[0, 0, 0] = 7
    rewrite(ds / "labelsTr/case_tr001.nii.gz", data=label)
    rewrite(ds / "imagesTs/case_ts000_0001.nii.gz", affine=np.diag([2.0, 1.5, 1.5, 1.0]))
    report = verify_dataset(ds, workers=1)
    assert sorted(p.check for p in report.problems) == [
        "case-count", "label-values", "missing-channel", "spacing-mismatch", "unreadable"
    ]
    text = report.format()
    assert "5 problem(s)" in text
    for where in ("dataset.json", IMG, "imagesTr/case_tr001_0001.nii.gz", "labelsTr/case_tr001.nii.gz",
                  "imagesTs/case_ts000_0001.nii.gz"):
        assert where in text
    with pytest.raises(DatasetError) as info:
        verify_dataset(ds, workers=1, raise_on_error=True)
    assert str(info.value) == text


def test_process_pool_gives_the_same_report(ds):
    (ds / LBL).write_bytes(b"garbage")
    rewrite(ds / "imagesTr/case_tr001_0001.nii.gz", affine=np.diag([1.5, 1.5, 2.0, 1.0]))
    assert verify_dataset(ds, workers=2).problems == verify_dataset(ds, workers=1).problems


def test_cli(ds, capsys):
    assert main(["verify", str(ds), "--workers", "1"]) == 0
    assert "OK" in capsys.readouterr().out
    (ds / LBL).unlink()
    assert main(["verify", str(ds), "--workers", "1"]) == 1
    out = capsys.readouterr()
    assert "missing-label" in out.out + out.err
    assert LBL in out.out + out.err
