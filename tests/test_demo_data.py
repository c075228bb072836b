"""Demo data set from the MNI152 template: 2 cases at a coarse 4 mm spacing keep this fast."""

from __future__ import annotations

import json
import os
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from lightseg.cli import main
from lightseg.data import demo
from lightseg.data.demo import load_template, make_demo_dataset, tissue_labels
from lightseg.data.verify import verify_dataset
from lightseg.errors import DatasetError

SPACING = 4.0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "Dataset900_Demo", num_cases=2, seed=3, spacing=SPACING,
                             workers=1)


def test_label_recipe_on_the_template():
    """The recipe's class fractions on the 1 mm template, as given in the project's data notes."""
    template = load_template()
    fractions = np.bincount(tissue_labels(template.t1, template.gm, template.wm).ravel(), minlength=4) / template.t1.size
    np.testing.assert_allclose(fractions, [0.783, 0.018, 0.126, 0.073], atol=0.001)


def test_dataset_json(built):
    spec = json.loads((built / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T1"}
    assert spec["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    assert spec["numTraining"] == 2
    assert "not patients" in spec["description"] and "Montreal Neurological Institute" in spec["licence"]


def test_verify_passes(built):
    report = verify_dataset(built, workers=1)
    assert report.ok, report.format()
    assert report.num_training == 2


def test_geometry_and_content(built):
    points = load_template().brain_points
    brain_center = (points.min(axis=1) + points.max(axis=1)) / 2
    origins = []
    for name in ("brain_000", "brain_001"):
        image = nib.load(built / "imagesTr" / f"{name}_0000.nii.gz")
        label = nib.load(built / "labelsTr" / f"{name}.nii.gz")
        data, seg = image.get_fdata(dtype=np.float32), np.asanyarray(label.dataobj)
        style = demo.case_style(3, int(name[-3:]))
        assert image.shape == label.shape and all(20 < s < 80 for s in image.shape)  # ~150-220 mm at 4 mm
        x_sign = -1.0 if style.las else 1.0
        np.testing.assert_allclose(image.affine[:3, :3], np.diag([x_sign, 1, 1]) * SPACING, atol=1e-5)
        assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (1, 1)
        assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1, 2, 3}
        fractions = np.bincount(seg.ravel(), minlength=4) / seg.size
        assert 0.55 < fractions[0] < 0.9 and 0.005 < fractions[1] < 0.06
        assert 0.07 < fractions[2] < 0.25 and 0.04 < fractions[3] < 0.17
        assert fractions[2] > fractions[3] > fractions[1]  # GM > WM > CSF, as in the template
        brain, outside = data[seg > 0], data[seg == 0]
        assert image.get_data_dtype() == np.dtype(style.storage) and data.min() >= 0
        assert brain.mean() > 3 * outside.mean()  # a T1 with a dark background
        assert data[seg == 3].mean() > data[seg == 2].mean() > data[seg == 1].mean()  # every curve keeps WM > GM > CSF
        # the whole brain lies inside the field of view, which sits where the (moved) brain is
        assert not seg[[0, -1]].any() and not seg[:, [0, -1]].any() and not seg[:, :, [0, -1]].any()
        fov_center = nib.affines.apply_affine(image.affine, (np.array(image.shape) - 1) / 2)
        assert np.linalg.norm(fov_center - brain_center) < 20
        origins.append(image.affine[:3, 3])
    assert not np.allclose(origins[0], origins[1])  # each case has its own field of view


def test_deterministic_and_resumable(built, tmp_path):
    again = make_demo_dataset(tmp_path / "again", num_cases=2, seed=3, spacing=SPACING, workers=1)
    for rel in ("imagesTr/brain_001_0000.nii.gz", "labelsTr/brain_001.nii.gz"):
        a, b = nib.load(built / rel), nib.load(again / rel)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
    image, label, affine = demo.demo_case(load_template(), 1, 3, SPACING)
    np.testing.assert_array_equal(label, np.asanyarray(nib.load(built / "labelsTr/brain_001.nii.gz").dataobj))
    other = demo.demo_case(load_template(), 1, 4, SPACING)[1]
    assert other.shape != label.shape or not np.array_equal(other, label)
    (again / "labelsTr" / "brain_001.nii.gz").unlink()  # as if killed before the last file
    kept = (again / "imagesTr" / "brain_000_0000.nii.gz").stat().st_mtime_ns
    make_demo_dataset(again, num_cases=3, seed=3, spacing=SPACING, workers=1)  # resume and grow
    assert (again / "imagesTr" / "brain_000_0000.nii.gz").stat().st_mtime_ns == kept
    rewritten = np.asanyarray(nib.load(again / "labelsTr" / "brain_001.nii.gz").dataobj)
    np.testing.assert_array_equal(rewritten, label)
    assert verify_dataset(again, workers=1).num_training == 3


def test_refuses_other_settings_and_foreign_folders(built, tmp_path, synthetic_dataset):
    with pytest.raises(DatasetError, match="other settings"):
        make_demo_dataset(built, num_cases=2, seed=4, spacing=SPACING)
    with pytest.raises(DatasetError, match="other settings"):
        make_demo_dataset(synthetic_dataset, num_cases=2, spacing=SPACING)
    with pytest.raises(DatasetError, match="already holds 2"):
        make_demo_dataset(built, num_cases=1, seed=3, spacing=SPACING)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        make_demo_dataset(tmp_path / "busy", num_cases=1, spacing=SPACING)
    with pytest.raises(DatasetError, match="at least 1 case"):
        make_demo_dataset(tmp_path / "none", num_cases=0)


def test_missing_nilearn_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match=r'pip install "lightseg\[demo\]"'):
        make_demo_dataset(tmp_path / "x", num_cases=1)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["demo-data", str(out), "--cases", "1", "--seed", "1", "--spacing", "6", "--workers", "1"]) == 0
    assert "1 demo cases" in capsys.readouterr().out
    assert sorted(os.listdir(out / "labelsTr")) == ["brain_000.nii.gz"]
    assert main(["demo-data", str(out), "--cases", "1", "--seed", "2", "--spacing", "6"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_every_appearance_variant_is_drawn():
    styles = [demo.case_style(0, index) for index in range(40)]
    assert {s.contrast for s in styles} == set(demo.CONTRASTS)
    assert {s.storage for s in styles} == set(demo.STORAGE)
    assert {s.zero_background for s in styles} == {True, False}
    assert {s.las for s in styles} == {True, False}
    assert sum(s.zero_background for s in styles) > 20  # most cases, as shared brain volumes are
    resolutions = [s.resolution_mm for s in styles]
    assert 1.0 <= min(resolutions) < 1.3 and 1.7 < max(resolutions) <= 2.0
    gammas = [s.gamma for s in styles]
    assert min(gammas) < 0.8 and max(gammas) > 1.4
    for s in styles:
        assert s.curve[0] == 0.0 and abs(s.curve[-1] - 1.0) < 1e-9 and np.all(np.diff(s.curve) > 0)  # monotone


def _case_with(predicate, seed=0):
    index = next(i for i in range(200) if predicate(demo.case_style(seed, i)))
    return demo.case_style(seed, index), demo.demo_case(load_template(), index, seed, SPACING)


@pytest.mark.parametrize("storage", demo.STORAGE)
def test_storage_types_and_scales(storage):
    style, (image, label, _) = _case_with(lambda s: s.storage == storage)
    assert image.dtype == np.dtype(storage)
    if storage == "uint8":
        assert image.max() == 255
    elif storage == "float32":
        assert image.max() == pytest.approx(1.0)
    else:  # the template maximum at the drawn int16 maximum; bias and noise move it a little
        assert 0.5 * style.int16_max < image.max() < 2 * style.int16_max


def test_zero_and_noisy_backgrounds():
    _, (image, label, _) = _case_with(lambda s: s.zero_background)
    assert (image[label > 0] > 0).mean() > 0.99 and (image == 0).mean() > 0.3  # exact zeros outside the brain
    _, (image, label, _) = _case_with(lambda s: not s.zero_background)
    assert (image == 0).mean() < 0.01 and image[label == 0].mean() > 0  # noise everywhere


def test_las_is_the_same_world_reversed():
    index = next(i for i in range(200) if demo.case_style(0, i).las)
    image, label, affine = demo.demo_case(load_template(), index, 0, SPACING)
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    ras = nib.as_closest_canonical(nib.Nifti1Image(label, affine))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(np.asanyarray(ras.dataobj), label[::-1])


def test_contrast_curves_are_monotone_and_change_tissue_ratios():
    t1 = np.linspace(0, 1, 101, dtype=np.float32)
    for contrast in ("gamma", "curve"):
        style = next(s for s in (demo.case_style(0, i) for i in range(200)) if s.contrast == contrast)
        mapped = demo.apply_contrast(t1, style)
        assert mapped[0] == 0 and mapped[-1] == pytest.approx(1) and np.all(np.diff(mapped) > 0)
        assert np.abs(mapped - t1).max() > 0.03  # an actual change


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kinds_are_balanced_in_every_block_of_training_cases(seed):
    """Each block of STRATUM cases holds every kind in its probability's share (largest remainder):
    the demo's training cases (the first block) see every background, storage, contrast and orientation."""
    assert demo.STRATUM == 6
    aug = demo.DemoAugmentation()
    for block in range(3):
        styles = [demo.case_style(seed, index, aug) for index in range(6 * block, 6 * block + 6)]
        assert sum(s.zero_background for s in styles) == 4  # 0.7 * 6 = 4.2
        assert sum(s.las for s in styles) == 2  # 0.3 * 6 = 1.8
        assert sorted(Counter(s.storage for s in styles).values()) == [2, 2, 2]
        assert sorted(Counter(s.contrast for s in styles).values()) == [2, 2, 2]
    orders = {tuple(demo.case_style(seed, i).las for i in range(6)) for seed in range(8)}
    assert len(orders) > 1  # the order within a block is drawn per seed


def test_stratified_kind_follows_other_probabilities():
    counts = Counter(demo.stratified_kind(5, index, 0, (0.1, 0.0, 0.9)) for index in range(60))
    assert counts == {0: 10, 2: 50}  # 0.6 rounds up to 1 per block, a zero share never appears
