"""Resampling, normalisation, cropping, the cache layout, resume, and the inference round trip."""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lightseg.cli import main
from lightseg.data import make_synthetic_dataset
from lightseg.data.plan import load_plan, parse_plan
from lightseg.data.preprocess import (
    CaseProperties,
    load_case_properties,
    normalize,
    preprocess_arrays,
    preprocess_dataset,
    preprocess_image,
)
from lightseg.data.resample import anisotropic_axis, resample_image, resample_label, separate_axis
from lightseg.data.restore import restore_to_original
from lightseg.errors import ImageError, PlanError

CONTRACT_KEYS = {"original_shape", "original_spacing", "original_affine", "crop_bbox", "shape_after_crop",
                 "spacing", "shape", "classes_present"}


def _plan(spacing=(1.0, 1.0, 1.0), channels=("MR",), norms=None, labels=(0, 1, 2), crop=True):
    return parse_plan({
        "dataset_name": "t", "channel_names": list(channels), "label_values": list(labels),
        "target_spacing": list(spacing), "patch_size": [16, 16, 16],
        "normalization": norms or [{"scheme": "zscore"}] * len(channels), "crop_to_nonzero": crop,
    }, "test")


def _blob_case(shape=(30, 26, 12), border=3, seed=0):
    """A smooth 2-class blob inside a zero border: image nonzero only inside the border."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[radius < 0.75] = 1
    label[radius < 0.4] = 2
    image = (label * 10.0 + rng.normal(50, 1, shape)).astype(np.float32)
    inner = tuple(slice(border, n - border) for n in shape)
    outside = np.ones(shape, bool)
    outside[inner] = False
    image[outside] = 0
    label[outside] = 0
    return image[None], label


@pytest.mark.parametrize("order", [0, 1, 3])
def test_separable_resampling_equals_scipy_zoom(order):
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.normal(size=(13, 17, 11)), 1.5).astype(np.float32)
    shape = (20, 12, 15)
    expected = ndimage.zoom(volume, [n / o for n, o in zip(shape, volume.shape)], order=order, mode="nearest",
                            grid_mode=True)
    if order == 3:  # cubic overshoot is clipped to the input range, as nnU-Net
        expected = np.clip(expected, volume.min(), volume.max())
    got = resample_image(volume[None], (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), shape, order=order)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_anisotropy_rule():
    assert anisotropic_axis((0.8, 0.8, 4.0)) == 2
    assert anisotropic_axis((1.0, 3.0, 1.0)) == 1  # exactly 3x counts
    assert anisotropic_axis((1.0, 2.9, 1.0)) is None
    assert anisotropic_axis((3.0, 3.0, 1.0)) is None  # two coarse axes: no single out-of-plane axis
    assert separate_axis((1.0, 1.0, 1.0), (1.0, 1.0, 4.0)) == 2  # the target's axis when the source is isotropic


def test_anisotropic_axis_is_resampled_with_nearest_neighbour():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 10, 10, 6)).astype(np.float32)
    out = resample_image(image, (1.0, 1.0, 4.0), (1.0, 1.0, 2.0))
    assert out.shape == (1, 10, 10, 12)
    for k in range(12):  # every output slice is one input slice, never a blend
        assert any(np.array_equal(out[0, :, :, k], image[0, :, :, j]) for j in range(6))
    iso = resample_image(image, (1.0, 1.0, 2.0), (1.0, 1.0, 1.0))  # 2x: not anisotropic, cubic blends
    assert not any(np.array_equal(iso[0, :, :, 1], image[0, :, :, j]) for j in range(6))


def test_label_resampling_keeps_one_valid_class_per_voxel():
    _, label = _blob_case()
    up = resample_label(label * 3, (1.0, 1.0, 1.0), (0.5, 0.7, 1.0))
    assert up.shape == (60, 37, 12) and up.dtype == np.uint8
    assert set(np.unique(up)) == {0, 3, 6}
    down = resample_label(up, (0.5, 0.7, 1.0), (1.0, 1.0, 1.0), label.shape)
    assert (down == label * 3).mean() > 0.97


def test_label_resampling_uses_nearest_on_the_anisotropic_axis_and_copies_an_unchanged_grid():
    rng = np.random.default_rng(2)
    label = rng.integers(0, 3, size=(6, 6, 5)).astype(np.uint8)
    out = resample_label(label, (1.0, 1.0, 4.0), (1.0, 1.0, 2.0))
    assert out.shape == (6, 6, 10)
    assert all(any(np.array_equal(out[..., k], label[..., j]) for j in range(5)) for k in range(10))  # never a blend
    same = resample_label(label, (1.0, 1.0, 4.0), (1.0, 1.0, 2.0), label.shape)
    assert np.array_equal(same, label) and same is not label


def test_ct_and_mr_normalisation():
    image = np.array([[[[-2000.0, 0.0, 40.0, 3000.0]]]], np.float32)
    ct = _plan(channels=("CT",), norms=[{"scheme": "ct", "clip": [-1000, 1000], "mean": 40.0, "std": 20.0}])
    out = normalize(image.copy(), ct, None)
    np.testing.assert_allclose(out.ravel(), [(-1000 - 40) / 20, -2.0, 0.0, (1000 - 40) / 20])
    mr = np.zeros((1, 6, 6, 6), np.float32)
    mr[0, 1:5, 1:5, 1:5] = np.random.default_rng(0).normal(300, 40, (4, 4, 4))
    mask = mr[0] != 0
    out = normalize(mr.copy(), _plan(), mask)
    assert out[0][mask].mean() == pytest.approx(0, abs=1e-5) and out[0][mask].std() == pytest.approx(1, abs=1e-4)
    assert np.all(out[0][~mask] == 0)
    whole = normalize(mr.copy(), _plan(crop=False), None)
    assert whole.mean() == pytest.approx(0, abs=1e-5) and whole.std() == pytest.approx(1, abs=1e-4)


def test_crop_to_nonzero_and_properties():
    image, label = _blob_case(border=3)
    reference = nib.Nifti1Image(image[0], np.diag([1.0, 1.0, 1.0, 1.0]))
    out, out_label, props = preprocess_arrays(image, label, reference, _plan())
    assert props.crop_bbox == ((3, 27), (3, 23), (3, 9))
    assert out.shape == (1, 24, 20, 6) and out_label.shape == (24, 20, 6)
    assert props.classes_present == (1, 2)
    assert CaseProperties.from_json(json.loads(json.dumps(props.to_json()))) == props


def _non_ras_affine(spacing):
    """Axes permuted and flipped: voxel i runs along -y, j along -x, k along +z."""
    affine = np.zeros((4, 4))
    affine[1, 0], affine[0, 1], affine[2, 2] = -spacing[0], -spacing[1], spacing[2]
    affine[:, 3] = (12.0, -7.0, 3.0, 1.0)
    return affine


def test_round_trip_is_exact_when_spacing_equals_target():
    image, label = _blob_case(shape=(30, 26, 12))
    affine = _non_ras_affine((0.8, 0.8, 3.0))
    plan = _plan(spacing=(0.8, 0.8, 3.0))
    reference = nib.Nifti1Image(image[0], affine)
    _, cached_label, props = preprocess_arrays(image, label, reference, plan)
    assert props.shape_after_crop != props.original_shape  # really cropped
    restored = restore_to_original(cached_label, props)
    np.testing.assert_array_equal(restored, label)


def test_round_trip_on_anisotropic_non_ras_input_with_resampling():
    image, label = _blob_case(shape=(40, 36, 14))
    affine = _non_ras_affine((0.8, 0.8, 3.0))
    plan = _plan(spacing=(1.2, 1.2, 1.5))
    images = [nib.Nifti1Image(image[0], affine)]
    _, cached_label, props = preprocess_arrays(image, label, images[0], plan)
    assert props.original_spacing == pytest.approx((0.8, 0.8, 3.0))
    assert props.shape == (23, 20, 16)
    restored = restore_to_original(cached_label, props)
    assert restored.shape == label.shape
    for value in (1, 2):  # only boundary voxels may differ
        a, b = restored == value, label == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95
    arr, arr_props = preprocess_image(image, plan, affine=affine)
    nib_arr, nib_props = preprocess_image(images, plan)
    np.testing.assert_array_equal(arr, nib_arr)
    assert arr.dtype == np.float32 and arr.shape == (1, *props.shape) and arr_props == nib_props
    assert arr_props.original_affine == tuple(tuple(row) for row in affine)


def test_restore_probabilities_pads_with_background():
    image, label = _blob_case()
    plan = _plan(spacing=(2.0, 2.0, 1.0))
    _, cached_label, props = preprocess_arrays(image, label, nib.Nifti1Image(image[0], np.eye(4)), plan)
    probs = np.stack([cached_label == k for k in range(3)]).astype(np.float32)
    restored = restore_to_original(probs, props)
    assert restored.shape == (3, *label.shape)
    np.testing.assert_allclose(restored.sum(0), 1.0, atol=1e-5)
    assert np.all(restored[0, :3] == 1) and np.all(restored[1:, :3] == 0)
    assert (restored.argmax(0) == label).mean() > 0.97
    regions = restore_to_original(probs[1:], props, background=False)
    assert np.all(regions[:, :3] == 0)
    with pytest.raises(ImageError, match="spatial shape"):
        restore_to_original(probs[:, 1:], props)
    with pytest.raises(ImageError, match="channels"):
        preprocess_image(np.zeros((2, 4, 4, 4), np.float32), plan, affine=np.eye(4))


@pytest.fixture
def raw(tmp_path):
    return make_synthetic_dataset(tmp_path / "raw", num_cases=3, shape=(20, 20, 12), spacing=(0.8, 0.8, 3.0),
                                  num_classes=3)


def _mtimes(cache, case):
    return {p.name: p.stat().st_mtime_ns for p in (cache / "cases").glob(f"{case}*")}


def test_preprocess_writes_the_contract_layout(raw, tmp_path):
    cache = tmp_path / "cache"
    plan = preprocess_dataset(raw, cache, workers=1, progress=False)
    assert load_plan(cache / "plan.json") == plan
    assert json.loads((cache / "dataset.json").read_text()) == json.loads((raw / "dataset.json").read_text())
    names = sorted(p.name[: -len(".json")] for p in (cache / "cases").glob("*.json"))
    assert names == ["case_tr000", "case_tr001", "case_tr002"]
    for name in names:
        props = json.loads((cache / "cases" / f"{name}.json").read_text())
        assert CONTRACT_KEYS <= set(props)
        image = np.load(cache / "cases" / f"{name}_image.npy", mmap_mode="r", allow_pickle=False)
        label = np.load(cache / "cases" / f"{name}_label.npy", mmap_mode="r", allow_pickle=False)
        assert isinstance(image, np.memmap) and image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == (1, *props["shape"]) and label.shape == tuple(props["shape"])
        with np.load(cache / "cases" / f"{name}_locations.npz", allow_pickle=False) as locations:
            assert sorted(locations.files) == [f"class_{v}" for v in props["classes_present"]]
            for key in locations.files:
                coords = locations[key]
                assert coords.dtype == np.int32 and coords.shape[1] == 3
                assert np.all(label[tuple(coords.T)] == int(key.split("_")[1]))
        assert load_case_properties(cache, name).shape == tuple(props["shape"])
    assert not list((cache / "cases").glob(".*"))


def test_ct_fingerprint_uses_foreground_voxels_and_the_cache_is_clipped(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=2, shape=(16, 16, 16), channel_names=("CT",))
    foreground = []
    for case in ("case_tr000", "case_tr001"):
        image = nib.load(raw / "imagesTr" / f"{case}_0000.nii.gz").get_fdata(dtype=np.float32)
        label = np.asarray(nib.load(raw / "labelsTr" / f"{case}.nii.gz").dataobj)
        foreground.append(image[label > 0])  # fewer than 10,000 voxels: all are sampled
    foreground = np.concatenate(foreground).astype(np.float64)
    cache = tmp_path / "cache"
    plan = preprocess_dataset(raw, cache, workers=1, progress=False)
    (norm,) = plan.normalization
    assert norm.scheme == "ct"
    assert norm.clip == pytest.approx(tuple(np.percentile(foreground, [0.5, 99.5])), rel=1e-5)
    assert (norm.mean, norm.std) == pytest.approx((foreground.mean(), foreground.std()), rel=1e-5)
    cached = np.load(cache / "cases" / "case_tr000_image.npy")
    low, high = ((c - norm.mean) / norm.std for c in norm.clip)
    assert cached.min() >= low - 1e-4 and cached.max() <= high + 1e-4
    assert np.isclose(cached.min(), low, atol=1e-4)  # background is below the foreground 0.5 percentile


def test_resume_redoes_only_unfinished_cases(raw, tmp_path):
    cache = tmp_path / "cache"
    preprocess_dataset(raw, cache, workers=1, progress=False)
    before = {c: _mtimes(cache, c) for c in ("case_tr000", "case_tr001", "case_tr002")}
    time.sleep(0.01)
    (cache / "cases" / "case_tr001.json").unlink()  # killed before its marker: half-written
    (cache / "cases" / "case_tr001_image.npy").write_bytes(b"truncated")
    (cache / "cases" / ".case_tr002_label.npy.lightseg-abc.tmp").write_bytes(b"left by a kill")
    preprocess_dataset(raw, cache, workers=1, progress=False)
    assert _mtimes(cache, "case_tr000") == before["case_tr000"]
    assert _mtimes(cache, "case_tr002") == before["case_tr002"]
    assert all(_mtimes(cache, "case_tr001")[k] > v for k, v in before["case_tr001"].items())
    np.load(cache / "cases" / "case_tr001_image.npy", allow_pickle=False)
    assert not list((cache / "cases").glob(".*"))


def test_plan_edits_are_respected(raw, tmp_path):
    cache = tmp_path / "cache"
    preprocess_dataset(raw, cache, workers=1, progress=False)
    before = _mtimes(cache, "case_tr000")
    obj = json.loads((cache / "plan.json").read_text())
    obj["patch_size"] = [16, 16, 8]
    (cache / "plan.json").write_text(json.dumps(obj))
    assert preprocess_dataset(raw, cache, workers=1, progress=False).patch_size == (16, 16, 8)
    assert _mtimes(cache, "case_tr000") == before  # the patch size does not change the arrays
    obj["target_spacing"] = [1.6, 1.6, 3.0]
    obj["image_dtype"] = "float16"
    (cache / "plan.json").write_text(json.dumps(obj))
    plan = preprocess_dataset(raw, cache, workers=1, progress=False)
    assert plan.target_spacing == (1.6, 1.6, 3.0) and load_plan(cache / "plan.json").patch_size == (16, 16, 8)
    image = np.load(cache / "cases" / "case_tr000_image.npy", mmap_mode="r")
    assert image.dtype == np.float16 and image.shape == (1, 10, 10, 12)


def test_bad_or_foreign_plan_json_is_a_plan_error(raw, tmp_path):
    cache = tmp_path / "cache"
    preprocess_dataset(raw, cache, workers=1, progress=False)
    obj = json.loads((cache / "plan.json").read_text())
    (cache / "plan.json").write_text(json.dumps({**obj, "target_spacing": [1, 1]}))
    with pytest.raises(PlanError, match="'target_spacing'"):
        preprocess_dataset(raw, cache, workers=1, progress=False)
    (cache / "plan.json").write_text(json.dumps({**obj, "channel_names": ["CT"],
                                                 "normalization": [{"scheme": "zscore"}]}))
    with pytest.raises(PlanError, match="another data set"):
        preprocess_dataset(raw, cache, workers=1, progress=False)
    assert main(["preprocess", str(raw), "-o", str(cache)]) == 1


def test_broken_case_is_named_and_the_others_finish(raw, tmp_path):
    cache = tmp_path / "cache"
    preprocess_dataset(raw, cache, workers=1, progress=False)
    before = _mtimes(cache, "case_tr002")
    bad = raw / "imagesTr" / "case_tr001_0000.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    (cache / "cases" / "case_tr001.json").unlink()
    (cache / "cases" / "case_tr000.json").unlink()
    with pytest.raises(ImageError, match="case_tr001_0000"):
        preprocess_dataset(raw, cache, workers=1, progress=False)
    assert sorted(p.name for p in (cache / "cases").glob("*.json")) == ["case_tr000.json", "case_tr002.json"]
    assert _mtimes(cache, "case_tr002") == before
    with pytest.raises(ImageError, match="case_tr001_0000"):  # a new cache: the fingerprint names it
        preprocess_dataset(raw, tmp_path / "fresh", workers=1, progress=False)
    assert not (tmp_path / "fresh" / "plan.json").exists()


def test_cli_with_a_process_pool_and_overrides(raw, tmp_path, capsys):
    cache = tmp_path / "cache"
    preprocess_dataset(raw, cache, workers=1, progress=False)
    for path in (cache / "cases").glob("*.json"):
        path.unlink()  # one process pool start, for the preprocessing stage
    code = main(["preprocess", str(raw), "-o", str(cache), "--workers", "2", "--patch", "16", "16", "16",
                 "--spacing", "1.6", "1.6", "3.0"])
    assert code == 0 and "patch [16, 16, 16]" in capsys.readouterr().out
    plan = load_plan(cache / "plan.json")
    assert plan.patch_size == (16, 16, 16) and plan.target_spacing == (1.6, 1.6, 3.0)
    assert len(list((cache / "cases").glob("*_image.npy"))) == 3
    assert os.path.getsize(cache / "cases" / "case_tr000_label.npy") > 10 * 10 * 12


@pytest.mark.slow
def test_killed_run_keeps_finished_cases_and_a_rerun_completes(tmp_path):
    import signal
    import subprocess
    import sys

    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=8, shape=(64, 64, 48), seed=3)
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "lightseg", "preprocess", str(raw), "-o", str(cache), "--workers", "1",
               "--spacing", "0.7", "0.7", "0.7"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((cache / "cases").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {p.stem: _mtimes(cache, p.stem) for p in (cache / "cases").glob("*.json")}
    assert 1 <= len(done) < 8, "the run was not killed in the middle"
    assert main(["preprocess", str(raw), "-o", str(cache), "--workers", "1"]) == 0
    assert len(list((cache / "cases").glob("*.json"))) == 8
    assert all(_mtimes(cache, name) == before for name, before in done.items())
    for path in (cache / "cases").glob("*_image.npy"):
        np.load(path, mmap_mode="r", allow_pickle=False)


@pytest.mark.parametrize("case", ["cavity", "touches-border", "open-channel", "diagonal-gap", "empty"])
def test_nonzero_mask_is_fill_holes_of_the_whole_grid(case):
    """Filling holes only inside the nonzero box gives the whole-grid mask: an enclosed cavity
    filled, background reaching the grid's border (directly or through a tunnel) kept."""
    from lightseg.data.fingerprint import nonzero_mask

    rng = np.random.default_rng(0)
    image = np.zeros((2, 30, 34, 26), dtype=np.float32)
    if case != "empty":
        image[1, 5:25, 6:28, 4:22] = rng.normal(size=(20, 22, 18)) + 5
        image[1][rng.random((30, 34, 26)) < 0.05] = 0  # pepper holes
        image[1, 10:15, 12:18, 9:14] = 0  # a cavity
        image[0, 3, 3, 3] = 1.0  # a voxel nonzero only in channel 0 widens the box
    if case == "touches-border":
        image[1, 0:4, 10:20, 10:20] = 2.0
    if case == "open-channel":
        image[1, 12, 15:34, 11] = 0  # a tunnel from the cavity to the grid's border
    if case == "diagonal-gap":  # a tunnel whose voxels touch only along edges: no face-connected way out
        for step in range(12):
            image[1, 12 + step % 2, 18 + step, 11] = 0
    expected = ndimage.binary_fill_holes(np.any(image != 0, axis=0))
    np.testing.assert_array_equal(nonzero_mask(image), expected)
    assert expected[12, 14, 11] == (case in ("cavity", "touches-border", "diagonal-gap"))


@pytest.mark.parametrize("crop", [True, False])
def test_unstacked_channels_preprocess_like_the_stacked_image(crop):
    """Prediction passes the channels unstacked (cropped before the one copy): the same arrays,
    bit for bit, and the caller's arrays are left as they were."""
    image, label = _blob_case(shape=(30, 26, 12))
    image = np.concatenate([image, image[:1] * 0.5 + 3 * (image[:1] != 0)])
    plan = _plan(channels=("T1", "T2"), crop=crop)
    reference = nib.Nifti1Image(image[0], np.diag([1.0, 1.0, 1.0, 1.0]))
    stacked = preprocess_arrays(image.copy(), label, reference, plan)
    channels = [c.copy() for c in image]
    unstacked = preprocess_arrays(channels, label, reference, plan)
    np.testing.assert_array_equal(unstacked[0], stacked[0])
    np.testing.assert_array_equal(unstacked[1], stacked[1])
    assert unstacked[2] == stacked[2]
    assert all(np.array_equal(c, original) for c, original in zip(channels, image))


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("codes", ["LAS", "LSA", "PIR"])
def test_a_turned_copy_preprocesses_to_the_same_arrays(codes, crop):
    """Spacing follows the permutation: a copy stored in another axis order gives the cached
    arrays of the RAS original bit for bit, and restoring puts the label back on the copy's grid."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    image, label = _blob_case(shape=(30, 26, 12))
    affine = np.diag([0.8, 1.1, 3.0, 1.0])
    plan = parse_plan({**_plan(spacing=(1.0, 1.0, 2.0), crop=crop).to_json(), "reorient": True}, "test")
    ras = preprocess_arrays(image, label, nib.Nifti1Image(image[0], affine), plan)
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    turned_image, turned_label = apply_orientation(image[0], ornt)[None], apply_orientation(label, ornt)
    reference = nib.Nifti1Image(turned_image[0], affine @ inv_ornt_aff(ornt, label.shape))
    assert "".join(nib.aff2axcodes(reference.affine)) == codes
    turned = preprocess_arrays(turned_image, turned_label, reference, plan)
    np.testing.assert_array_equal(turned[0], ras[0])
    np.testing.assert_array_equal(turned[1], ras[1])
    assert turned[2].reoriented_from == codes and turned[2].original_shape == turned_label.shape
    np.testing.assert_array_equal(restore_to_original(turned[1], turned[2]),
                                  apply_orientation(restore_to_original(ras[1], ras[2]), ornt))
    assert type(turned[2]).from_json(json.loads(json.dumps(turned[2].to_json()))) == turned[2]
    if codes == "LSA":  # without the turn the spacing is taken per stored axis: another grid
        assert preprocess_arrays(turned_image, turned_label, reference, _plan(spacing=(1.0, 1.0, 2.0)))[0].shape != ras[0].shape


def test_bad_reoriented_from_in_case_json_is_a_plan_error(tmp_path):
    image, label = _blob_case()
    _, _, props = preprocess_arrays(image, label, nib.Nifti1Image(image[0], np.eye(4)), _plan())
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "a.json").write_text(json.dumps({**props.to_json(), "reoriented_from": "LRS"}))
    with pytest.raises(PlanError, match="reoriented_from"):
        load_case_properties(tmp_path, "a")
