"""LightMedSeg's objective (specs/lightmedseg.md section 4) on cases with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightseg.training.losses import LightMedSegLoss, boundary_band, build_loss, inverse_frequency_weights


def one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(labels[:, 0], k).movedim(-1, 1).float()


def blob_target(k: int = 3, size: int = 12, batch: int = 2) -> torch.Tensor:
    """Every class present: class 1 a cube, class 2 a slab, background elsewhere."""
    target = torch.zeros(batch, 1, size, size, size, dtype=torch.long)
    target[:, :, 3:8, 3:8, 3:8] = 1
    target[:, :, :, :, 10:] = k - 1
    return target


def test_inverse_frequency_weights_known_answer():
    # N = 4, C = 2: raw weights 4/(2*4) = 0.5 and 4/(2*2) = 1, renormalised to mean 1
    w = inverse_frequency_weights(torch.tensor([3, 1]))
    torch.testing.assert_close(w, torch.tensor([2 / 3, 4 / 3]))
    assert inverse_frequency_weights(torch.tensor([5, 0, 5])).mean().item() == pytest.approx(1.0)


def test_boundary_band_of_one_voxel():
    """One voxel: its morphological gradient is the 3^3 cube around it; radius 1 dilates it to 5^3."""
    target = torch.zeros(1, 1, 9, 9, 9, dtype=torch.long)
    target[0, 0, 4, 4, 4] = 1
    onehot = one_hot(target, 2)
    assert boundary_band(onehot, radius=0).sum(dim=(0, 2, 3, 4)).tolist() == [27, 27]
    band = boundary_band(onehot, radius=1)
    assert band.sum(dim=(0, 2, 3, 4)).tolist() == [125, 125]
    assert band[0, 1, 2:7, 2:7, 2:7].all()


def test_volume_edge_is_not_a_boundary():
    onehot = one_hot(torch.zeros(1, 1, 6, 6, 6, dtype=torch.long), 2)
    assert not boundary_band(onehot, radius=2).any()


def test_perfect_prediction_is_near_zero_and_a_wrong_one_is_not():
    loss = LightMedSegLoss(3)
    target = blob_target()
    perfect = loss(20.0 * one_hot(target, 3), target)
    assert 0.0 <= perfect.item() < 1e-3
    wrong = loss(20.0 * one_hot((target + 1) % 3, 3), target)
    assert wrong.item() > 10.0


def test_each_term_is_a_known_quantity():
    """Uniform logits: Dice term is MONAI's soft Dice, CE is log(K), boundary BCE is -log(1-1/K)
    off-class and -log(1/K) on-class, mixed per band."""
    k = 3
    target = blob_target(k)
    logits = torch.zeros(2, k, 12, 12, 12)
    ce_only = LightMedSegLoss(k, lambda_dice=0.0, lambda_boundary=0.0)(logits, target)
    assert ce_only.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)
    onehot = one_hot(target, k)
    counts = onehot.sum(dim=(0, 2, 3, 4))
    w = inverse_frequency_weights(counts)
    voxels = counts.sum()
    dice_c = 1 - 2 * (counts / k) / (counts + voxels / k)  # p = 1/K everywhere
    expected_dice = (w * dice_c).sum() / w.sum()
    dice_only = LightMedSegLoss(k, lambda_ce=0.0, lambda_boundary=0.0)(logits, target)
    assert dice_only.item() == pytest.approx(expected_dice.item(), rel=1e-4)
    band = boundary_band(onehot, 1).float()
    inside = (band * onehot).sum(dim=(0, 2, 3, 4)) / band.sum(dim=(0, 2, 3, 4))
    per_class = -(inside * torch.log(torch.tensor(1 / k)) + (1 - inside) * torch.log(torch.tensor(1 - 1 / k)))
    boundary_only = LightMedSegLoss(k, lambda_dice=0.0, lambda_ce=0.0, lambda_boundary=1.0)(logits, target)
    assert boundary_only.item() == pytest.approx(((w * per_class).sum() / w.sum()).item(), rel=1e-4)


def test_empty_class_is_finite_and_ignored_by_dice():
    loss = LightMedSegLoss(4)
    target = blob_target(k=3)  # class 3 never occurs
    logits = 20.0 * one_hot(target, 4)
    assert loss(logits, target).item() < 1e-3
    with_absent = LightMedSegLoss(4, dice_absent_classes=True)(logits, target)
    assert torch.isfinite(with_absent)
    background_only = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    logits = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    value = loss(logits, background_only)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_one_voxel_object_gets_a_finite_gradient_that_favours_it():
    target = torch.zeros(1, 1, 10, 10, 10, dtype=torch.long)
    target[0, 0, 5, 5, 5] = 1
    logits = torch.zeros(1, 2, 10, 10, 10, requires_grad=True)
    value = LightMedSegLoss(2)(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    # descending the gradient raises the object's logit at its voxel
    assert logits.grad[0, 1, 5, 5, 5] < 0 and logits.grad[0, 0, 5, 5, 5] > 0


def test_saturated_logits_keep_gradients_finite():
    target = blob_target()
    logits = (100.0 * torch.randn(2, 3, 12, 12, 12)).requires_grad_()
    LightMedSegLoss(3)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()


def test_build_loss_and_shape_errors():
    loss = build_loss("lightmedseg", 4, lambda_boundary=0.25, band_radius=2)
    assert isinstance(loss, LightMedSegLoss)
    assert (loss.lambda_dice, loss.lambda_ce, loss.lambda_boundary, loss.band_radius) == (1.0, 1.0, 0.25, 2)
    with pytest.raises(ValueError, match="4 classes"):
        loss(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long))
