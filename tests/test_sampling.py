"""Patch sampler: shapes, padding, foreground oversampling, determinism, setters, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_helper import make_cache
from torch.utils.data import DataLoader

from lightseg.data import make_synthetic_dataset
from lightseg.data.sampling import PatchSampler, cached_cases, crop_bounds, crop_padded, validation_patches


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    raw = make_synthetic_dataset(root / "raw", num_cases=3, shape=(20, 24, 28), num_classes=3)
    return make_cache(raw, root / "cache")


def test_crop_padded_pads_outside_volume():
    array = np.arange(27, dtype=np.uint8).reshape(3, 3, 3) + 1
    out = crop_padded(array, (-1, -1, -1), (5, 5, 5))
    assert out.shape == (5, 5, 5)
    assert (out[1:4, 1:4, 1:4] == array).all()
    assert out[0].sum() == 0 and out[4].sum() == 0


def test_crop_bounds_centres_small_volumes_and_stays_inside_large_ones():
    rng = np.random.default_rng(0)
    assert tuple(crop_bounds((4, 4, 4), (8, 8, 8), None, rng)) == (-2, -2, -2)
    for _ in range(50):
        lower = crop_bounds((20, 20, 20), (8, 8, 8), None, rng)
        assert (lower >= 0).all() and (lower + 8 <= 20).all()
    assert tuple(crop_bounds((20, 20, 20), (8, 8, 8), (0, 19, 10), rng)) == (0, 12, 6)


def test_batches_have_shape_and_last_third_is_foreground(cache):
    cases = cached_cases(cache)
    sampler = PatchSampler(cache, cases, (8, 8, 8), batch_size=6, iters_per_epoch=20, seed=1)
    for images, labels in sampler:
        assert images.shape == (6, 1, 8, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (6, 1, 8, 8, 8) and labels.dtype == torch.uint8
        # nnU-Net: the last round(6 * 1/3) = 2 elements are centred on a foreground voxel
        for j in (4, 5):
            assert labels[j, 0, 4, 4, 4] > 0


def test_patch_larger_than_volume_is_padded(cache):
    sampler = PatchSampler(cache, cached_cases(cache), (32, 32, 32), batch_size=2, iters_per_epoch=1)
    images, labels = next(iter(sampler))
    assert images.shape == (2, 1, 32, 32, 32)
    assert (images[:, :, :, :, :2] == 0).all()  # 28 -> 32 along the last axis: 2 padded each side


def test_deterministic_and_rank_dependent(cache):
    cases = cached_cases(cache)
    a = [b[0] for b in PatchSampler(cache, cases, (8, 8, 8), 2, 3, seed=5)]
    b = [b[0] for b in PatchSampler(cache, cases, (8, 8, 8), 2, 3, seed=5)]
    c = [b[0] for b in PatchSampler(cache, cases, (8, 8, 8), 2, 3, seed=5, rank=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    sampler = PatchSampler(cache, cases, (8, 8, 8), 2, 3, seed=5)
    sampler.set_epoch(1)
    assert not torch.equal(next(iter(sampler))[0], a[0])


def test_setters_change_the_next_batches(cache):
    sampler = PatchSampler(cache, cached_cases(cache), (8, 8, 8), 2, 2)
    sampler.set_patch_size((16, 8, 4))
    sampler.set_batch_size(3)
    images, _ = next(iter(sampler))
    assert images.shape == (3, 1, 16, 8, 4)
    with pytest.raises(ValueError):
        sampler.set_batch_size(0)


def test_workers_give_the_same_stream_as_the_main_process(cache):
    sampler = PatchSampler(cache, cached_cases(cache), (8, 8, 8), 2, 4, seed=3)
    direct = [b[0] for b in sampler]
    loaded = [b[0] for b in DataLoader(sampler, batch_size=None, num_workers=2)]
    assert len(loaded) == 4 and all(torch.equal(x, y) for x, y in zip(direct, loaded))


def test_class_balanced_sampling_reaches_every_class(cache):
    sampler = PatchSampler(cache, cached_cases(cache), (4, 4, 4), 3, 30, oversample_foreground=1.0, class_balanced=True)
    centres = [int(labels[j, 0, 2, 2, 2]) for _, labels in sampler for j in range(3)]
    counts = np.bincount(centres, minlength=3)
    assert counts[0] == 0 and counts[1] > 20 and counts[2] > 20  # class 2 is small but drawn as often


def test_validation_patches_are_fixed(cache):
    cases = cached_cases(cache)[:2]
    a = validation_patches(cache, cases, (8, 8, 8), per_case=2, seed=0)
    b = validation_patches(cache, cases, (8, 8, 8), per_case=2, seed=0)
    assert len(a) == 4 and all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert a[0][1][4, 4, 4] > 0
