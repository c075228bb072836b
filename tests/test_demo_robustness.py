"""The robustness check's inputs and baselines (the check itself runs in test_demo's end-to-end demo)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lightseg import demo_robustness as rb
from lightseg.data.demo import demo_case, load_template


@pytest.fixture(scope="module")
def case():
    image, label, affine = demo_case(load_template(), 2, 0, 3.0)  # an RAS case (seed 0's cases 0 and 1 are LAS)
    return image.astype(np.float32) + 5.0, label, affine  # + 5: a nonzero background to strip


def test_variants_change_what_they_name(case):
    image, label, affine = case
    stripped = rb._strip(*case)
    assert (stripped[0][label > 0] > 0).all() and stripped[0][~ndimage.binary_dilation(label > 0)].max() == 0
    assert rb._uint8(*stripped)[0].dtype == np.uint8 and rb._uint8(*stripped)[0].max() == 255
    assert rb._float01(*stripped)[0].max() == pytest.approx(1.0)
    small, small_label, small_affine = rb._resample_2mm(*stripped)
    np.testing.assert_allclose(np.sqrt((small_affine[:3, :3] ** 2).sum(0)), 2.0)
    assert small.shape == small_label.shape and small.shape[0] == round(image.shape[0] * 1.5)
    # the brain stays where it was in the world
    centre = lambda lab, aff: nib.affines.apply_affine(aff, np.argwhere(lab > 0).mean(0))
    np.testing.assert_allclose(centre(small_label, small_affine), centre(label, affine), atol=1.5)
    flipped, flipped_label, flipped_affine = rb._las(*stripped)
    assert nib.aff2axcodes(flipped_affine)[0] == "L"
    np.testing.assert_allclose(centre(flipped_label, flipped_affine), centre(label, affine), atol=1e-6)
    contrast = rb._contrast(*stripped)[0]
    ratio = lambda im: im[label == 3].mean() / im[label == 2].mean()
    assert ratio(contrast) > ratio(stripped[0]) ** 1.5  # gamma 2: about the square of the WM/GM ratio


def test_atlas_baseline_is_a_real_baseline(case):
    _, label, affine = case
    atlas = rb.atlas_labels(label, affine)
    assert set(np.unique(atlas[label > 0])) <= {1, 2, 3} and (atlas[label == 0] == 0).all()
    assert 0.4 < rb.foreground_dice(label, atlas) < 0.95  # placed by extent only: the warp is unknown to it
    template_image, template_label, template_affine = rb.template_case()
    assert rb.foreground_dice(template_label, rb.atlas_labels(template_label, template_affine)) > 0.9


def test_dice_and_missing_itk_volume(tmp_path):
    truth = np.array([0, 1, 1, 2, 2, 3])
    assert rb.foreground_dice(truth, truth) == 1.0
    assert rb.foreground_dice(truth, np.array([0, 1, 2, 2, 2, 0])) == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert rb.itk_case(tmp_path) is None


def test_itk_label_comes_from_the_tissue_classes_inside_the_mask(tmp_path):
    """The classes file gives the tissues, the skull-strip file only the brain: a class outside the
    mask is background, and the mask's own values never become tissues."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    t1 = np.arange(4 * 4 * 2, dtype=np.uint8).reshape(4, 4, 2) + 10
    mask = np.zeros_like(t1)
    mask[1:3, 1:3] = 6  # skull-strip values are not classes: all 6 here
    classes = np.zeros_like(t1)
    classes[1, 1:3], classes[2, 1], classes[2, 2], classes[0, 0] = 4, 5, 6, 5  # (0, 0): outside the mask
    for name, data in ((rb.ITK_T1, t1), (rb.ITK_MASK, mask), (rb.ITK_LABEL, classes)):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / name)
    image, label, _ = rb.itk_case(tmp_path)
    expected = np.zeros_like(t1)
    expected[1, 1:3], expected[2, 1], expected[2, 2] = 1, 2, 3
    np.testing.assert_array_equal(label, expected)
    assert (image[mask == 0] == 0).all() and (image[mask > 0] == t1[mask > 0]).all()


@pytest.mark.skipif(rb.itk_case() is None, reason="Debian's insighttoolkit5-examples is not installed")
def test_installed_itk_label_is_a_tissue_map():
    """A real T1 label: every tissue holds a real share of the brain, in T1 order CSF < GM < WM."""
    image, label, _ = rb.itk_case()
    brain = label > 0
    shares = [(label == c).sum() / brain.sum() for c in (1, 2, 3)]
    means = [image[label == c].mean() for c in (1, 2, 3)]
    assert min(shares) > 0.1, shares
    assert means[0] < means[1] < means[2], means


def test_registered_label_recovers_a_warp_the_extent_baseline_cannot(case):
    """The registration reference follows a case's rotation and elastic warp: it agrees with the
    case's true label better than the atlas baseline, which places the template by extent only;
    and it is the same label on every run (a reference that moved would move the demo's table)."""
    image, label, affine = rb._strip(*case)
    registered = rb.registered_labels(image, label > 0, affine)
    np.testing.assert_array_equal(rb.registered_labels(image, label > 0, affine), registered)
    assert set(np.unique(registered[label > 0])) <= {1, 2, 3} and (registered[label == 0] == 0).all()
    registered_dice = rb.foreground_dice(label, registered)
    atlas_dice = rb.foreground_dice(label, rb.atlas_labels(label, affine))
    assert registered_dice > atlas_dice + 0.05 and registered_dice > 0.7, (registered_dice, atlas_dice)
