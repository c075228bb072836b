"""The use-mask-for-norm rule, background-independent z-scores, and the out-of-distribution warning."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lightseg.data.dataset import DatasetSpec
from lightseg.data.fingerprint import fingerprint_arrays, make_fingerprint, nonzero_mask
from lightseg.data.intensity import OutOfDistributionWarning, use_mask_for_norm_rule, warn_if_out_of_distribution
from lightseg.data.plan import parse_plan, plan_dataset
from lightseg.data.preprocess import normalize, preprocess_image

SPEC = DatasetSpec(channel_names=("T1",), labels={"background": 0, "CSF": 1, "GM": 2, "WM": 3}, num_training=4, name="t")


def _brain(seed: int = 0, shape=(40, 44, 36), contrast=(250.0, 550.0, 800.0)) -> tuple[np.ndarray, np.ndarray]:
    """A zero-background 'brain': nested ellipsoids CSF < GM < WM with noise, inside a zero margin."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.8, 0.85, 0.75])[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[radius < 1.0], label[radius < 0.85], label[radius < 0.55] = 1, 2, 3
    means = np.array([0.0, *contrast], np.float32)
    image = means[label] + rng.normal(0, 20, shape).astype(np.float32) * (label > 0)
    return np.clip(image, 1, None) * (label > 0), label


def _noisy_background(image: np.ndarray, label: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    """The same brain with Rician noise (the magnitude of complex Gaussian noise) in the background."""
    rng = np.random.default_rng(seed)
    noise = np.hypot(rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape)).astype(np.float32)
    return np.where(label > 0, image, noise)


def _plan(use_mask: bool):
    return parse_plan({"dataset_name": "t", "channel_names": ["T1"], "label_values": [0, 1, 2, 3],
                       "target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                       "normalization": [{"scheme": "zscore"}], "use_mask_for_norm": [use_mask],
                       "zscore_region": "foreground"}, "test")


def _normalised(image: np.ndarray, use_mask: bool) -> np.ndarray:
    stack = image[None].astype(np.float32)
    return normalize(stack.copy(), _plan(use_mask), nonzero_mask(stack))[0]


def test_rule_follows_nnunet_crop_shrinkage():
    shapes = np.array([[100, 100, 100]] * 3)
    assert use_mask_for_norm_rule(shapes, np.array([[80, 80, 80]] * 3), ["zscore"], True) == (True,)  # 0.51
    assert use_mask_for_norm_rule(shapes, np.array([[95, 95, 95]] * 3), ["zscore"], True) == (False,)  # 0.86
    assert use_mask_for_norm_rule(shapes, np.array([[80, 80, 80]] * 3), ["zscore"], False) == (False,)
    assert use_mask_for_norm_rule(shapes, np.array([[80, 80, 80]] * 3), ["ct", "zscore"], True) == (False, True)
    # the median case decides: two of three shrink
    after = np.array([[80, 80, 80], [80, 80, 80], [100, 100, 100]])
    assert use_mask_for_norm_rule(shapes, after, ["zscore"], True) == (True,)


def test_plan_records_the_rule_and_a_profile():
    cases = [fingerprint_arrays(f"c{i}", _brain(i)[0][None], _brain(i)[1], (1.0, 1.0, 1.0)) for i in range(4)]
    plan = plan_dataset(SPEC, make_fingerprint(cases, 1))
    assert plan.use_mask_for_norm == (True,)
    assert plan.to_json()["use_mask_for_norm"] == [True]
    assert plan.intensity_profile[0]["quantiles"] == [5, 25, 50, 75, 95]
    assert parse_plan(plan.to_json(), "round trip") == plan
    noisy = [fingerprint_arrays(f"c{i}", _noisy_background(*_brain(i), 30.0)[None], _brain(i)[1], (1.0, 1.0, 1.0))
             for i in range(4)]
    assert plan_dataset(SPEC, make_fingerprint(noisy, 1)).use_mask_for_norm == (False,)


@pytest.mark.parametrize("sigma, tolerance", [(10.0, 1e-5), (40.0, 0.05)])
def test_case_and_zero_background_twin_reach_the_network_alike(sigma, tolerance):
    """Identical when the noise floor lies below the darkest tissue (sigma 10 against CSF 250); with
    noise reaching into the tissue range (sigma 40: its tail passes 200) a few noise voxels join the
    mask, and the brain moves by under ``tolerance`` standard deviations."""
    image, label = _brain()
    noisy = _noisy_background(image, label, sigma)
    brain = label > 0
    twin, case = _normalised(image, True), _normalised(noisy, True)
    np.testing.assert_allclose(case[brain], twin[brain], atol=tolerance)
    # both backgrounds stay darker than every tissue, next to each other (not at 0 = mean tissue, as nnU-Net)
    assert twin[~brain].max() < twin[brain].min() and np.median(case[~brain]) < np.percentile(case[label == 1], 5)
    assert abs(np.median(case[~brain]) - np.median(twin[~brain])) < 0.5
    generous = _normalised(np.where(ndimage.binary_dilation(brain, iterations=2), noisy, 0), True)  # a loose strip
    np.testing.assert_allclose(generous[brain], twin[brain], atol=tolerance)
    # nnU-Net's whole-volume z-score (no mask) shifts the noisy case's brain: the test can fail
    assert np.abs(_normalised(noisy, False)[brain] - twin[brain]).mean() > 0.3


def _profile_plan(cases):
    return plan_dataset(SPEC, make_fingerprint(
        [fingerprint_arrays(f"c{i}", image[None], label, (1.0, 1.0, 1.0)) for i, (image, label) in enumerate(cases)], 1))


def test_warning_fires_on_shifted_input_and_stays_quiet_in_distribution():
    plan = _profile_plan([_brain(i, contrast=(c, 550.0, 800.0)) for i, c in enumerate((220, 250, 280, 300))])
    affine = np.eye(4)
    same, _ = _brain(9, contrast=(260.0, 550.0, 800.0))
    for variant in (same, same / same.max(), np.round(same / same.max() * 255)):  # storage scale: harmless
        _, props = preprocess_image((variant[None]).astype(np.float32), plan, affine)
        with warnings.catch_warnings():
            warnings.simplefilter("error", OutOfDistributionWarning)
            assert warn_if_out_of_distribution("brain_009", props.intensity_profile, plan.intensity_profile, ["T1"]) == []
    inverted, label = _brain(9, contrast=(800.0, 550.0, 250.0))  # T2-like: CSF bright, WM dark
    _, props = preprocess_image(inverted[None].astype(np.float32), plan, affine)
    with pytest.warns(OutOfDistributionWarning, match=r"brain_009.*'T1'.*percentile"):
        warn_if_out_of_distribution("brain_009", props.intensity_profile, plan.intensity_profile, ["T1"])


def test_prediction_pipeline_warns_with_the_case_name(tmp_path):
    from lightseg.inference.pipeline import Predictor
    from lightseg.inference.window import StageTimer

    plan = _profile_plan([_brain(i) for i in range(4)])
    predictor = Predictor(logits=lambda array, timer: np.zeros((4, *array.shape[1:]), np.float32), plan=plan,
                          spec=SPEC, label_values=(0, 1, 2, 3), regions=False, patch_size=(16, 16, 16))
    image, _ = _brain(5, contrast=(800.0, 550.0, 250.0))
    with pytest.warns(OutOfDistributionWarning, match="odd_case"):
        predictor.predict_case([nib.Nifti1Image(image, np.eye(4))], StageTimer(), name="odd_case")
    image, _ = _brain(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDistributionWarning)
        predictor.predict_case([nib.Nifti1Image(image, np.eye(4))], StageTimer(), name="fine_case")


def test_plans_written_before_the_rule_keep_their_normalisation():
    """A plan without the new keys (a model trained before them) is fed exactly as it was trained:
    z-score over the nonzero mask, 0 outside."""
    legacy = parse_plan({"dataset_name": "t", "channel_names": ["T1"], "label_values": [0, 1, 2, 3],
                         "target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                         "normalization": [{"scheme": "zscore"}]}, "old plan.json")
    assert legacy.use_mask_for_norm == (True,) and legacy.zscore_region == "nonzero"
    image, label = _brain()
    stack = image[None].astype(np.float32)
    mask = nonzero_mask(stack)
    expected = stack[0].copy()
    expected[mask] = (expected[mask] - expected[mask].mean()) / expected[mask].std()
    expected[~mask] = 0
    np.testing.assert_allclose(normalize(stack.copy(), legacy, mask)[0], expected, atol=1e-5)
    assert legacy.cache_key() != _plan(True).cache_key()  # the two normalisations never share a cache
