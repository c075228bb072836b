"""``dice_ce`` is nnU-Net v2's DC_and_CE_loss, checked against the formula written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightseg.training.losses import build_loss


def _reference(logits, labels, include_background, batch_dice, smooth=1e-5):
    """nnU-Net's soft Dice (as ``1 - dc``) + mean cross-entropy over every class."""
    p = torch.softmax(logits, 1)
    onehot = F.one_hot(labels[:, 0], logits.shape[1]).movedim(-1, 1).float()
    if not include_background:
        p, onehot = p[:, 1:], onehot[:, 1:]
    dims = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    dc = (2 * (p * onehot).sum(dims) + smooth) / (p.sum(dims) + onehot.sum(dims) + smooth)
    return (1 - dc).mean() + F.cross_entropy(logits, labels[:, 0])


@pytest.mark.parametrize(("name", "include_background", "batch_dice"), [("dice_ce", False, True), ("dice_ce_bg", True, False)])
def test_dice_ce_matches_its_definition(name, include_background, batch_dice):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, 7, generator=generator)
    labels = torch.randint(0, 4, (2, 1, 5, 6, 7), generator=generator)
    labels[1][labels[1] == 3] = 2  # class 3 absent from the second sample: per-sample and batch Dice differ
    loss = build_loss(name, 4)(logits, labels)
    torch.testing.assert_close(loss, _reference(logits, labels, include_background, batch_dice))
    other = _reference(logits, labels, not include_background, not batch_dice)
    assert not torch.allclose(loss, other)  # the settings matter on this input

