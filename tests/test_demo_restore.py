"""Restoring a prediction made on the plan's grid onto a finer input grid (the demo's 1 mm template
case): probabilities are resampled before the argmax, and a zero-background input's outside stays
background."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lightseg.data.dataset import DatasetSpec
from lightseg.data.plan import parse_plan
from lightseg.data.preprocess import preprocess_arrays
from lightseg.data.restore import restore_argmax, restore_to_original
from lightseg.data.resample import resample_argmax, resample_label, resample_probabilities
from lightseg.errors import ImageError
from lightseg.inference.pipeline import Predictor, outside_input
from lightseg.inference.window import StageTimer


def _plan(spacing: float, crop: bool = True):
    return parse_plan({
        "dataset_name": "t", "channel_names": ["T1"], "label_values": [0, 1, 2],
        "target_spacing": [spacing] * 3, "patch_size": [16, 16, 16],
        "normalization": [{"scheme": "zscore"}], "crop_to_nonzero": crop,
    }, "test")


def _shells(shape=(40, 40, 40), noisy_background: bool = False):
    """A 1 mm ball (class 2) in a thin shell (class 1, 1.5 voxels thick), outside exactly 0 (or noise)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[radius < 13.5] = 1
    label[radius < 12.0] = 2
    image = np.where(label == 1, 30.0, np.where(label == 2, 100.0, 0.0)).astype(np.float32)
    if noisy_background:
        image[label == 0] = np.random.default_rng(0).uniform(1.0, 3.0, int((label == 0).sum()))
    return image, label


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2 * float((x & y).sum()) / float(x.sum() + y.sum())


def test_resample_argmax_of_masks_is_resample_label_and_leaves_its_input_alone():
    _, label = _shells((20, 18, 16))
    values = np.unique(label)
    masks = np.stack([(label == v).astype(np.float32) for v in values])
    down = resample_argmax(masks, values, (1.0,) * 3, (1.7,) * 3)
    np.testing.assert_array_equal(down, resample_label(label, (1.0,) * 3, (1.7,) * 3))
    before = masks.copy()
    same = resample_argmax(masks, values, (1.0,) * 3, (1.0,) * 3)  # same grid: no resampling
    np.testing.assert_array_equal(same, label)
    np.testing.assert_array_equal(masks, before)


def test_probabilities_restore_a_thin_class_better_than_an_argmax_taken_first():
    """The class probabilities a perfect model gives on the plan's 1.5 mm grid, brought back to 1 mm:
    through the probabilities the thin shell keeps its Dice, through the argmax it loses some."""
    image, label = _shells()
    _, _, props = preprocess_arrays(image[None], label, nib.Nifti1Image(image, np.eye(4)), _plan(1.5))
    assert props.shape != props.shape_after_crop  # really resampled
    box = tuple(slice(lo, hi) for lo, hi in props.crop_bbox)
    onehot = np.stack([(label[box] == v).astype(np.float32) for v in (0, 1, 2)])
    probs = resample_probabilities(onehot, (1.0,) * 3, (1.5,) * 3, props.shape)  # a perfect model at 1.5 mm
    from_probs = restore_argmax(probs, props, (0, 1, 2))
    from_labels = restore_to_original(probs.argmax(0).astype(np.uint8), props)
    assert from_probs.dtype == np.uint8 and from_probs.shape == label.shape
    assert _dice(label, from_probs, 1) > _dice(label, from_labels, 1) + 0.03
    assert _dice(label, from_probs, 2) >= _dice(label, from_labels, 2)
    with pytest.raises(ImageError, match="spatial shape"):
        restore_argmax(probs[:, 1:], props, (0, 1, 2))


def _constant_predictor(plan, value: int) -> Predictor:
    """A predictor whose network says ``value`` everywhere, confidently."""
    def logits(array, timer):
        out = np.zeros((3, *array.shape[1:]), np.float32)
        out[value] = 10.0
        return out

    spec = DatasetSpec(channel_names=("T1",), labels={"background": 0, "a": 1, "b": 2}, num_training=1)
    return Predictor(logits=logits, plan=plan, spec=spec, label_values=(0, 1, 2), regions=False,
                     patch_size=(16, 16, 16))


def test_zero_background_outside_the_input_stays_background():
    """Every voxel enclosed by the nonzero region (the hole included) keeps the network's class;
    every voxel outside it is background, in the labels and in the probabilities."""
    image, label = _shells()
    image[20, 20, 20] = 0.0  # an enclosed zero: inside the brain, so the network's call stands
    nifti = nib.Nifti1Image(image, np.diag([1.0, 1.0, 1.0, 1.0]))
    labels, probs = _constant_predictor(_plan(1.5), 1).predict_case([nifti], StageTimer(), probabilities=True)
    inside = label > 0
    assert np.all(labels[inside] == 1) and np.all(labels[~inside] == 0)
    assert probs is not None and np.all(probs[0][~inside] == 1) and np.all(probs[1:, ~inside] == 0)
    assert np.all(probs.argmax(0)[inside] == 1)


def test_noisy_background_and_plans_without_a_mask_are_left_alone():
    image, _ = _shells(noisy_background=True)
    nifti = nib.Nifti1Image(image, np.eye(4))
    assert outside_input([nifti], _plan(1.5)) is None  # nothing is exactly 0
    zero, _ = _shells()
    assert outside_input([nib.Nifti1Image(zero, np.eye(4))], _plan(1.5, crop=False)) is None
    outside = outside_input([nib.Nifti1Image(zero, np.eye(4))], _plan(1.5))
    assert outside is not None and outside.sum() == int((zero == 0).sum())
