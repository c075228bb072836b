"""The region loss against a hand-computed soft Dice + BCE (the Dice settings are shared with LightMedSegLoss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightseg.training.losses import RegionLoss, build_loss


@pytest.mark.parametrize("batch_dice", [False, True])
def test_region_loss_is_soft_dice_plus_bce(batch_dice):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=generator)
    target = (torch.rand(2, 3, 4, 5, 6, generator=generator) > 0.6).float()
    p = torch.sigmoid(logits)
    dims = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    dice = 1 - (2 * (p * target).sum(dims) + 1e-5) / (p.sum(dims) + target.sum(dims) + 1e-5)
    expected = dice.mean() + F.binary_cross_entropy_with_logits(logits, target)
    loss = RegionLoss(batch_dice=batch_dice)
    torch.testing.assert_close(loss(logits, target), expected)
    torch.testing.assert_close(build_loss("region", 3, batch_dice=batch_dice)(logits, target), expected)
