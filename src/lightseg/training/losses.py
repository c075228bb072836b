"""Training losses behind one factory, :func:`build_loss`, plus nnU-Net's deep-supervision weighting.

Every loss takes ``(logits, target)``: ``logits`` of shape ``(B, K, *spatial)``; ``target`` the
class-index map ``(B, 1, *spatial)`` (int64) for softmax losses, or the binary region masks
``(B, R, *spatial)`` (float) for the region loss (:func:`region_targets` builds them).

* ``"dice_ce"``: soft Dice + cross-entropy with softmax, background included in the Dice, as
  nnU-Net's default (MONAI ``DiceCELoss``, every default set explicitly).
* ``"region"``: one sigmoid per region, soft Dice + binary cross-entropy, as nnU-Net's
  region-based training (BraTS: whole tumour, tumour core, enhancing tumour).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from lightseg.errors import TrainingError


def dice_ce_loss(num_classes: int, batch_dice: bool = False) -> nn.Module:
    """nnU-Net's Dice + CE (equal weights); smooth terms 1e-5 keep empty classes finite."""
    return DiceCELoss(
        include_background=True,
        to_onehot_y=True,
        softmax=True,
        squared_pred=False,
        jaccard=False,
        reduction="mean",
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=batch_dice,
        lambda_dice=1.0,
        lambda_ce=1.0,
    )


class RegionLoss(nn.Module):
    """Soft Dice (sigmoid per region) + BCE with logits, equal weights (nnU-Net's DC_and_BCE_loss)."""

    def __init__(self, batch_dice: bool = False) -> None:
        super().__init__()
        self.dice = DiceLoss(
            include_background=True,
            to_onehot_y=False,
            sigmoid=True,
            reduction="mean",
            smooth_nr=1e-5,
            smooth_dr=1e-5,
            batch=batch_dice,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        return self.dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


def region_targets(labels: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Raw label map ``(B, 1, *spatial)`` -> one binary channel per region ``(B, R, *spatial)``."""
    return torch.cat([torch.isin(labels, torch.as_tensor(r, device=labels.device)) for r in regions], 1).float()


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights: 1/2^i for output i (full resolution first), the lowest scale dropped
    (weight 0) when there is more than one output, normalised to sum 1."""
    weights = [1.0 / 2**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisionLoss(nn.Module):
    """Applies ``loss`` to every output of a deep-supervised network against the target resized
    (nearest neighbour, as nnU-Net downsamples its segmentation targets) to that output's size.

    A single tensor is passed straight through, so the trainer wraps every loss in this class.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros(())
        for weight, output in zip(weights, outputs):
            if weight == 0.0:
                continue
            scaled = target
            if tuple(target.shape[2:]) != tuple(output.shape[2:]):
                scaled = F.interpolate(target.float(), size=output.shape[2:], mode="nearest").to(target.dtype)
            total = total + weight * self.loss(output, scaled)
        return total


_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice_ce": lambda num_classes, **kw: dice_ce_loss(num_classes, **kw),
    "region": lambda num_classes, **kw: RegionLoss(**kw),
}


def build_loss(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The loss called ``name`` for ``num_classes`` output channels; unknown names are a TrainingError."""
    if name not in _LOSSES:
        raise TrainingError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name](num_classes, **kwargs)
