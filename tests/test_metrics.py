"""Metrics against values computed by hand on tiny masks (cubes, lines, single voxels)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightseg.data.dataset import parse_dataset_json
from lightseg.evaluation.metrics import Target, case_metrics, image_diagonal_mm, targets_from_spec, targets_from_values

ONE = targets_from_values([1])


def cube(shape, lo, hi, value=1):
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


def test_cubes_with_known_overlap():
    ref = cube((12, 12, 12), (2, 2, 2), (6, 6, 6))
    pred = cube((12, 12, 12), (4, 2, 2), (8, 6, 6))  # overlap 2x4x4 = 32 of 64 each
    m = case_metrics(ref, pred, ONE, (1.0, 1.0, 1.0))["1"]
    assert m["Dice"] == pytest.approx(2 * 32 / 128)
    assert m["IoU"] == pytest.approx(32 / 96)
    assert (m["TP"], m["FP"], m["FN"], m["n_ref"], m["n_pred"]) == (32, 32, 32, 64, 64)


def test_identical_masks_are_perfect():
    ref = cube((10, 10, 10), (2, 3, 1), (7, 6, 8))
    m = case_metrics(ref, ref.copy(), ONE, (0.7, 1.3, 2.5))["1"]
    assert (m["Dice"], m["IoU"], m["HD95"], m["NSD"]) == (1.0, 1.0, 0.0, 1.0)


def test_hd95_single_voxels_anisotropic():
    ref, pred = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    ref[1, 1, 1], pred[2, 3, 4] = 1, 1
    m = case_metrics(ref, pred, ONE, (0.5, 2.0, 3.0))["1"]
    assert m["HD95"] == pytest.approx(math.sqrt(0.5**2 + (2 * 2.0) ** 2 + (3 * 3.0) ** 2))


def test_hd95_shift_along_coarse_axis_is_in_mm():
    """A 1-voxel shift along a 2 mm axis: every far-face voxel is 2 mm away (16 of 56 boundary voxels)."""
    ref = cube((10, 8, 8), (2, 2, 2), (6, 6, 6))
    pred = cube((10, 8, 8), (3, 2, 2), (7, 6, 6))
    m = case_metrics(ref, pred, ONE, (2.0, 1.0, 1.0), nsd_tolerance_mm=1.0)["1"]
    assert m["HD95"] == pytest.approx(2.0)
    # NSD at 1 mm: 40 of 56 boundary voxels are within 1 mm, in both directions.
    assert m["NSD"] == pytest.approx(80 / 112)
    assert case_metrics(ref, pred, ONE, (2.0, 1.0, 1.0), nsd_tolerance_mm=2.0)["1"]["NSD"] == pytest.approx(1.0)
    assert case_metrics(ref, pred, ONE, (1.0, 1.0, 1.0))["1"]["HD95"] == pytest.approx(1.0)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    """A 10-voxel line plus one outlier 10 voxels (20 mm) away: 11 distances, ten 0 and one 20.

    Linear-interpolated 95th percentile: position 0.95 * 10 = 9.5, halfway between 0 and 20.
    """
    ref = np.zeros((16, 8, 16), np.uint8)
    ref[2:12, 4, 4] = 1
    pred = ref.copy()
    pred[2, 4, 14] = 1
    m = case_metrics(ref, pred, ONE, (1.0, 1.0, 2.0))["1"]
    assert m["HD95"] == pytest.approx(10.0)
    ref_long = np.zeros((48, 8, 16), np.uint8)
    ref_long[2:42, 4, 4] = 1  # 40 line voxels + outlier: position 0.95 * 40 = 38 is still a 0
    pred_long = ref_long.copy()
    pred_long[2, 4, 14] = 1
    assert case_metrics(ref_long, pred_long, ONE, (1.0, 1.0, 2.0))["1"]["HD95"] == pytest.approx(0.0)


def test_both_empty_is_perfect():
    empty = np.zeros((6, 6, 6), np.uint8)
    m = case_metrics(empty, empty.copy(), ONE, (1.0, 1.0, 1.0))["1"]
    assert (m["Dice"], m["IoU"], m["HD95"], m["NSD"]) == (1.0, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("empty_side", ["prediction", "reference"])
def test_one_empty_scores_zero_and_the_diagonal(empty_side):
    mask = cube((6, 8, 10), (1, 1, 1), (3, 3, 3))
    empty = np.zeros_like(mask)
    ref, pred = (mask, empty) if empty_side == "prediction" else (empty, mask)
    m = case_metrics(ref, pred, ONE, (1.0, 0.5, 2.0))["1"]
    diagonal = math.sqrt(6**2 + 4**2 + 20**2)
    assert (m["Dice"], m["IoU"], m["NSD"]) == (0.0, 0.0, 0.0)
    assert m["HD95"] == pytest.approx(diagonal)
    assert image_diagonal_mm((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.01)  # BraTS's penalty


def test_classes_are_scored_separately():
    ref = cube((10, 10, 10), (1, 1, 1), (5, 5, 5), 1) + cube((10, 10, 10), (6, 6, 6), (9, 9, 9), 2)
    pred = ref.copy()
    pred[pred == 2] = 0
    m = case_metrics(ref, pred, targets_from_values([0, 1, 2, 3]), (1.0, 1.0, 1.0))
    assert set(m) == {"1", "2", "3"}
    assert m["1"]["Dice"] == 1.0 and m["2"]["Dice"] == 0.0 and m["3"]["Dice"] == 1.0


BRATS = parse_dataset_json({
    "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3],
    "numTraining": 1,
})


def test_regions_from_brats_spec():
    targets = targets_from_spec(BRATS)
    assert [t.key for t in targets] == ["1", "2", "3", "(1, 2, 3)", "(2, 3)", "(3,)"]
    assert targets[2].name == "label 3" and targets[3] == Target((1, 2, 3), "whole tumor", region=True)
    assert targets[5] == Target((3,), "enhancing tumor", region=True)


def test_region_metrics_union_the_labels():
    """Whole tumour is labels 1-3 together: mislabelling core as edema leaves WT perfect, TC empty."""
    ref = cube((12, 12, 12), (2, 2, 2), (10, 10, 10), 1)
    ref[4:8, 4:8, 4:8] = 2
    ref[5:7, 5:7, 5:7] = 3
    pred = ref.copy()
    pred[pred == 2] = 1
    m = case_metrics(ref, pred, targets_from_spec(BRATS), (1.0, 1.0, 1.0))
    assert m["(1, 2, 3)"]["Dice"] == 1.0
    assert m["3"]["Dice"] == 1.0
    core_ref, core_pred = 64, 8  # TC: 4^3 in the reference, only the 2^3 enhancing part predicted
    assert m["(2, 3)"]["Dice"] == pytest.approx(2 * core_pred / (core_ref + core_pred))
    assert m["2"]["Dice"] == 0.0
