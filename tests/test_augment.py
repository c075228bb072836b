"""Augmentation: levels, shapes, label integrity, determinism, cost-saving crop path."""

from __future__ import annotations

import numpy as np
import pytest

from lightseg.data.augment import augment_params, build_augmenter


def _crop(size, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(size, np.uint8)
    label[size[0] // 4 : 3 * size[0] // 4, size[1] // 4 : 3 * size[1] // 4, size[2] // 4 : 3 * size[2] // 4] = 2
    image = rng.normal(0, 1, (channels, *size)).astype(np.float32) + label
    return image, label


def test_levels():
    assert build_augmenter("none") is None
    assert augment_params("light").rotation < augment_params("default").rotation
    assert augment_params("default", elastic=True).elastic_prob > 0
    with pytest.raises(ValueError):
        augment_params("heavy")


@pytest.mark.parametrize("spatial", [False, True])
def test_output_is_the_patch_with_valid_labels(spatial):
    augment = build_augmenter("default")
    patch = (12, 16, 8)
    size = tuple(p + 2 * m for p, m in zip(patch, augment.context(patch))) if spatial else patch
    image, label = _crop(size, channels=2)
    out_image, out_label = augment(image, label, patch, spatial, seed=3)
    assert out_image.shape == (2, *patch) and out_image.dtype == np.float32
    assert out_label.shape == patch and out_label.dtype == np.uint8
    assert set(np.unique(out_label)) <= {0, 2}  # nearest interpolation: no invented label values
    assert np.isfinite(out_image).all()


def test_same_seed_same_result_and_transforms_change_data():
    augment = build_augmenter("default")
    patch = (8, 8, 8)
    size = tuple(p + 2 * m for p, m in zip(patch, augment.context(patch)))
    image, label = _crop(size)
    a = augment(image, label, patch, True, seed=11)
    b = augment(image, label, patch, True, seed=11)
    c = augment(image, label, patch, True, seed=12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_spatial_probability_matches_level():
    augment = build_augmenter("default")
    rng = np.random.default_rng(0)
    rate = np.mean([augment.draw_spatial(rng) for _ in range(4000)])
    assert abs(rate - 0.36) < 0.03
