"""``lightseg info``: the summary of real NIfTI files written by the test."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lightseg.cli import main
from lightseg.data.info import MAX_LABEL_VALUES, image_info
from lightseg.errors import ImageError


def write(path, data, affine, qcode=1, scode=1):
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=qcode)
    image.set_sform(affine, code=scode)
    nib.save(image, path)
    return path


def test_image_geometry_and_intensity(tmp_path):
    affine = np.diag([-0.5, 2.0, 3.0, 1.0])  # x axis flipped: L instead of R
    affine[:3, 3] = (10.0, -20.0, 5.5)
    data = np.linspace(-3.5, 7.25, 6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    data[0, 0, 0] = np.nan
    info = image_info(write(tmp_path / "ct.nii.gz", data, affine, qcode=1, scode=4))
    assert info.shape == (6, 5, 4)
    assert info.spacing == pytest.approx((0.5, 2.0, 3.0))
    assert info.orientation == "LAS+"
    assert info.origin == pytest.approx((10.0, -20.0, 5.5))
    assert info.dtype == "float32"
    assert (info.minimum, info.maximum) == pytest.approx((float(np.nanmin(data)), 7.25))
    assert info.mean == pytest.approx(float(np.nanmean(data)), rel=1e-6)
    assert info.non_finite == 1
    assert (info.qform, info.sform) == ("1 (scanner)", "4 (mni)")
    assert info.label_counts is None
    text = info.format()
    for fragment in ("(6, 5, 4)", "(0.5, 2, 3) mm", "LAS+", "float32", "1 NaN/Inf", "1 (scanner) / 4 (mni)"):
        assert fragment in text
    assert "labels" not in text


def test_label_values_and_shares(tmp_path):
    label = np.zeros((10, 10, 10), np.uint8)
    label[:5] = 1
    label[:1] = 3
    info = image_info(write(tmp_path / "seg.nii.gz", label, np.eye(4)))
    assert info.label_counts == {0: 500, 1: 400, 3: 100}
    assert info.dtype == "uint8"
    assert "0 (50.0%), 1 (40.0%), 3 (10.0%)" in info.format()


def test_many_integer_values_are_not_labels(tmp_path):
    ct = np.arange(-1024, -1024 + 4 * 4 * 4 * 10, 10, dtype=np.int16).reshape(4, 4, 4)
    info = image_info(write(tmp_path / "ct.nii.gz", ct, np.eye(4)))
    assert len(np.unique(ct)) > MAX_LABEL_VALUES
    assert info.label_counts is None
    assert (info.minimum, info.maximum) == (-1024.0, float(ct.max()))


def test_unreadable(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"nope")
    with pytest.raises(ImageError, match="not a NIfTI file"):
        image_info(tmp_path / "x.nii.gz")


def test_cli(tmp_path, capsys):
    path = write(tmp_path / "seg.nii.gz", np.ones((3, 3, 3), np.uint8), np.eye(4))
    assert main(["info", str(path), str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("orientation  RAS+") == 2 and "1 (100.0%)" in out
    assert main(["info", str(tmp_path / "missing.nii.gz")]) == 1
    assert "file not found" in capsys.readouterr().err
