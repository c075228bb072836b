"""The region loss is nnU-Net v2's DC_and_BCE_loss, checked against its formula written out in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightseg.training.losses import RegionLoss, build_loss


def _nnunet_region_loss(logits: np.ndarray, target: np.ndarray, batch_dice: bool = True, smooth: float = 1e-5) -> float:
    """nnU-Net's MemoryEfficientSoftDiceLoss (sigmoid, do_bg=True) + BCEWithLogitsLoss, in float64.

    nnU-Net returns ``-dc``; lightseg's Dice term is ``1 - dc`` (the same gradient), hence the ``1 +``."""
    x, y = logits.astype(np.float64), target.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    axes = (2, 3, 4)
    intersect, sum_pred, sum_gt = (p * y).sum(axes), p.sum(axes), y.sum(axes)  # (B, R)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dc = (2 * intersect + smooth) / np.clip(sum_gt + sum_pred + smooth, 1e-8, None)
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    return float(1 - dc.mean() + bce.mean())


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 5, 6, generator=generator) * 2
    target = (torch.rand(2, 3, 4, 5, 6, generator=generator) > 0.6).float()
    target[1, 2] = 0  # region 2 absent from the second sample: per-sample and batch Dice differ
    return logits, target


def test_region_loss_is_nnunets_batch_dice_plus_bce():
    logits, target = _batch()
    expected = _nnunet_region_loss(logits.numpy(), target.numpy())
    per_sample = _nnunet_region_loss(logits.numpy(), target.numpy(), batch_dice=False)
    assert abs(expected - per_sample) > 0.01  # the input tells the two apart (1000x the tolerance below)
    loss = build_loss("region", 3)
    assert isinstance(loss, RegionLoss)
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-5)
    # with the data set's ignore label and nothing ignored, the same loss
    assert float(build_loss("region", 3, ignore_label=True)(logits, target)) == pytest.approx(expected, rel=1e-5)
    # the per-sample Dice stays reachable for a caller who asks for it
    assert float(RegionLoss(batch_dice=False)(logits, target)) == pytest.approx(per_sample, rel=1e-5)


def test_region_loss_gradient_matches_the_formula():
    logits, target = _batch(1)
    logits = logits.double().requires_grad_()
    build_loss("region", 3)(logits, target.double()).backward()
    step = 1e-6
    for index in [(0, 0, 1, 2, 3), (1, 2, 0, 0, 0), (1, 1, 3, 4, 5)]:  # one voxel of the empty region among them
        plus, minus = logits.detach().clone().numpy(), logits.detach().clone().numpy()
        plus[index] += step
        minus[index] -= step
        numeric = (_nnunet_region_loss(plus, target.numpy()) - _nnunet_region_loss(minus, target.numpy())) / (2 * step)
        assert float(logits.grad[index]) == pytest.approx(numeric, rel=1e-4, abs=1e-9)
