"""The overlay figure: RAS reorientation, plane slicing, a valid PNG that shows the labels."""

from __future__ import annotations

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from lightseg.errors import ImageError
from lightseg.evaluation.overlay import canonical, centre_slices, save_overlay

SHAPE = (20, 24, 16)
SPACING = (1.0, 1.5, 3.0)


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _scene(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[5:15, 6:18, 4:12] = 1
    label[8:12, 9:15, 6:10] = 2
    affine = np.diag([*SPACING, 1.0])
    return _write(tmp_path / "img.nii.gz", image, affine), _write(tmp_path / "lab.nii.gz", label, affine), label


def test_canonical_undoes_a_flipped_axis(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    ras = _write(tmp_path / "ras.nii.gz", data, np.diag([*SPACING, 1.0]))
    flipped_affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    flipped_affine[0, 3] = (SHAPE[0] - 1) * SPACING[0]  # same world positions, x stored right-to-left (LAS)
    las = _write(tmp_path / "las.nii.gz", data[::-1].copy(), flipped_affine)
    a, spacing_a = canonical(ras)
    b, spacing_b = canonical(las)
    np.testing.assert_array_equal(a, b)
    assert spacing_a == spacing_b == SPACING


def test_centre_slices_put_superior_up_with_physical_aspect():
    z_index = np.broadcast_to(np.arange(SHAPE[2]), SHAPE)
    slices = centre_slices(z_index, SPACING)
    coronal, aspect = slices["coronal"]
    assert coronal.shape == (SHAPE[2], SHAPE[0])
    np.testing.assert_array_equal(coronal[:, 0], np.arange(SHAPE[2]))  # row index = z: superior at the top with origin="lower"
    assert aspect == pytest.approx(SPACING[2] / SPACING[0])
    assert slices["sagittal"][0].shape == (SHAPE[2], SHAPE[1])
    axial, axial_aspect = slices["axial"]
    assert axial.shape == (SHAPE[1], SHAPE[0]) and np.all(axial == SHAPE[2] // 2)
    assert axial_aspect == pytest.approx(SPACING[1] / SPACING[0])


def test_overlay_png_is_valid_and_shows_the_labels(tmp_path):
    image, label, data = _scene(tmp_path)
    empty = _write(tmp_path / "empty.nii.gz", np.zeros_like(data), np.diag([*SPACING, 1.0]))
    names = {1: "outer", 2: "inner"}
    drawn = save_overlay(image, {"ground truth": label, "prediction": label}, tmp_path / "a.png", names, title="t")
    blank = save_overlay(image, {"ground truth": empty, "prediction": empty}, tmp_path / "b.png", names, title="t")
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels_a, pixels_b = matplotlib.image.imread(drawn), matplotlib.image.imread(blank)
    assert pixels_a.shape == pixels_b.shape and pixels_a.shape[0] > 200 and pixels_a.shape[1] > 300
    changed = np.abs(pixels_a[..., :3] - pixels_b[..., :3]).max(axis=2) > 0.05
    columns = np.flatnonzero(changed.any(axis=0))
    assert columns.size and columns.min() > pixels_a.shape[1] / 3  # labels drawn, never on the image column
    assert not list(tmp_path.glob(".*.tmp"))


def test_overlay_refuses_a_label_on_another_grid(tmp_path):
    image, _, data = _scene(tmp_path)
    other = _write(tmp_path / "other.nii.gz", data[:-2], np.diag([*SPACING, 1.0]))
    with pytest.raises(ImageError, match="differs from the image"):
        save_overlay(image, {"prediction": other}, tmp_path / "x.png", {1: "a"})
    assert not (tmp_path / "x.png").exists()
