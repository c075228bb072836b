"""Training losses behind one factory, :func:`build_loss`, plus nnU-Net's deep-supervision weighting.

Every loss takes ``(logits, target)``: ``logits`` of shape ``(B, K, *spatial)``; ``target`` the
class-index map ``(B, 1, *spatial)`` (int64) for softmax losses, or the binary region masks
``(B, R, *spatial)`` (float) for the region loss (:func:`region_targets` builds them).

* ``"dice_ce"``: nnU-Net v2's default ``DC_and_CE_loss``: softmax soft Dice over the
  foreground classes only (background left out), batch Dice (sums over the whole batch, as
  nnU-Net's 3d_fullres plans), smooth 1e-5, plus cross-entropy over all classes, weights 1:1.
  The Dice term is ``1 - Dice`` (nnU-Net reports ``-Dice``: the same gradient, values 1 higher).
* ``"dice_ce_bg"``: the same with the background counted in the Dice and Dice per sample
  (MONAI ``DiceCELoss``'s defaults); kept to reproduce runs trained before ``dice_ce`` matched nnU-Net.
* ``"region"``: one sigmoid per region, soft Dice + binary cross-entropy, weights 1:1, as nnU-Net
  v2's region-based training (``DC_and_BCE_loss`` with ``MemoryEfficientSoftDiceLoss``): every
  region in the Dice (``do_bg=True``), batch Dice, smooth 1e-5 (BraTS: whole tumour, tumour core,
  enhancing tumour). No per-sample variant is kept: none of the papers trains with one.
* ``"lightmedseg"``: LightMedSeg's Eq. (22): inverse-frequency weighted Dice + cross-entropy +
  a boundary BCE on a dilated band around every class border (:class:`LightMedSegLoss`).

With ``ignore_label=True`` (a data set with nnU-Net's ``"ignore"`` label) ``"dice_ce"`` and
``"region"`` become :class:`IgnoreLabelLoss`: target voxels equal to :data:`IGNORE` count in
neither term, as in nnU-Net; the Dice settings stay those above (batch Dice; background left out
of the softmax Dice).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from lightseg.errors import TrainingError

IGNORE = -1
"""Target value of voxels under the ignore label (every channel of a region target)."""


def dice_ce_loss(num_classes: int, batch_dice: bool = True, include_background: bool = False) -> nn.Module:
    """Soft Dice + CE with softmax, equal weights, smooth terms 1e-5 (finite for empty classes).

    The defaults are nnU-Net v2's (``do_bg=False``, ``batch_dice=True``); ``include_background``
    only affects the Dice term, the cross-entropy always covers every class, as in nnU-Net.
    """
    return DiceCELoss(
        include_background=include_background,
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


def _soft_dice(sigmoid: bool, reduction: str, batch: bool) -> DiceLoss:
    """MONAI's soft Dice on ready targets (no one-hot), every default set explicitly: background
    included, plain (not squared) denominators, smooth terms 1e-5 as nnU-Net. ``sigmoid`` applies
    one to the input; otherwise the input is already probabilities."""
    return DiceLoss(
        include_background=True,
        to_onehot_y=False,
        sigmoid=sigmoid,
        softmax=False,
        squared_pred=False,
        jaccard=False,
        reduction=reduction,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        batch=batch,
    )


class RegionLoss(nn.Module):
    """Soft Dice (sigmoid per region) + BCE with logits, equal weights (nnU-Net's DC_and_BCE_loss).

    ``batch_dice`` (nnU-Net's default for 3d_fullres): each region's intersection and sums are
    taken over the whole batch, so a sample where a region is absent does not score its own Dice
    of about 0 for it; the Dice is then averaged over the regions, none left out."""

    def __init__(self, batch_dice: bool = True) -> None:
        super().__init__()
        self.dice = _soft_dice(sigmoid=True, reduction="mean", batch=batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        return self.dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


class IgnoreLabelLoss(nn.Module):
    """Dice + cross-entropy (softmax) or Dice + BCE (one sigmoid per region) over annotated voxels only.

    nnU-Net's handling of the ignore label: the probabilities and the one-hot target are zeroed
    where the target is :data:`IGNORE` before the soft Dice sums, and the (binary) cross-entropy
    is averaged over the remaining voxels alone. A patch with no annotated voxel gives a CE term
    of 0, not NaN. The Dice is nnU-Net's as without the label: batch Dice, the background class
    left out of a softmax Dice, every region in a sigmoid one.
    """

    def __init__(self, num_classes: int, regions: bool, batch_dice: bool = True) -> None:
        super().__init__()
        self.num_classes, self.regions = num_classes, regions
        self.dice = _soft_dice(sigmoid=False, reduction="mean", batch=batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = target[:, :1] != IGNORE
        count = keep.sum().clamp(min=1)
        if self.regions:
            onehot = target.clamp(min=0).to(logits.dtype)
            probs = torch.sigmoid(logits)
            ce = (F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * keep).sum() / (count * logits.shape[1])
        else:
            index = target[:, 0].long()
            onehot = F.one_hot(index.clamp(min=0), self.num_classes).movedim(-1, 1).to(logits.dtype)
            probs = torch.softmax(logits, 1)
            ce = F.cross_entropy(logits, index, ignore_index=IGNORE, reduction="sum") / count
        if not self.regions:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        return self.dice(probs * keep, onehot * keep) + ce


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


def inverse_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """LightMedSeg's class weights (spec 4): ``w_c = N / (C (N_c + 1))`` from the voxel count
    ``N_c`` of each class in the batch, renormalised to mean 1 over the ``C`` classes."""
    counts = counts.float()
    weights = counts.sum() / (counts.numel() * (counts + 1))
    return weights * (counts.numel() / weights.sum())


def boundary_band(onehot: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Boolean band around every class border (spec 4): the 3x3x3 morphological gradient
    ``maxpool3(y_c) - minpool3(y_c)`` dilated by a cube of half-width ``radius`` (an L-inf
    ball). Max-pooling pads with -inf, so the volume's own edge is not a border."""
    gradient = F.max_pool3d(onehot, 3, stride=1, padding=1) + F.max_pool3d(-onehot, 3, stride=1, padding=1)
    if radius > 0:
        gradient = F.max_pool3d(gradient, 2 * radius + 1, stride=1, padding=radius)
    return gradient > 0


class LightMedSegLoss(nn.Module):
    """LightMedSeg's objective, Eq. (22): ``lambda_dice * Dice + lambda_ce * CE + lambda_boundary * L_B``.

    All three terms use the batch's inverse-frequency class weights
    (:func:`inverse_frequency_weights`). Dice is MONAI's soft Dice over the whole batch
    (background included), weighted per class; CE is weighted cross-entropy; ``L_B`` is, per
    class, the mean binary cross-entropy of its softmax probability over the class's
    :func:`boundary_band`, so its scale does not depend on object size, then weighted.
    Defaults ``1, 1, 0.5`` and ``band_radius=1`` are the spec's guesses [G].

    Choice where the spec is silent: a class absent from the batch has no boundary and is left
    out of the Dice term by default (``dice_absent_classes=False``); its weight ``N / C`` would
    otherwise take nearly all of the Dice weight away from the classes present. Computed in
    float32 with autocast off (binary cross-entropy is not autocast-safe).
    """

    def __init__(
        self,
        num_classes: int,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        lambda_boundary: float = 0.5,
        band_radius: int = 1,
        dice_absent_classes: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.lambda_boundary = lambda_boundary
        self.band_radius = band_radius
        self.dice_absent_classes = dice_absent_classes
        self.dice = _soft_dice(sigmoid=False, reduction="none", batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.num_classes or target.shape != (logits.shape[0], 1, *logits.shape[2:]):
            raise ValueError(
                f"LightMedSegLoss({self.num_classes} classes): expected logits (B, {self.num_classes}, *S) "
                f"and target (B, 1, *S), got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        with torch.autocast(logits.device.type, enabled=False):
            logits = logits.float()
            labels = target[:, 0].long()
            onehot = F.one_hot(labels, self.num_classes).movedim(-1, 1).float()
            reduce_dims = [0, *range(2, onehot.ndim)]
            counts = onehot.sum(dim=reduce_dims)
            weights = inverse_frequency_weights(counts)
            probs = torch.softmax(logits, dim=1)

            dice_weights = weights if self.dice_absent_classes else weights * (counts > 0)
            dice = (dice_weights * self.dice(probs, onehot).flatten()).sum() / dice_weights.sum()
            ce = F.cross_entropy(logits, labels, weight=weights)

            band = boundary_band(onehot, self.band_radius)
            band_sizes = band.sum(dim=reduce_dims)
            bce = F.binary_cross_entropy(probs, onehot, reduction="none")
            per_class = (bce * band).sum(dim=reduce_dims) / band_sizes.clamp(min=1)
            band_weights = weights * (band_sizes > 0)
            boundary = (band_weights * per_class).sum() / band_weights.sum().clamp(min=1e-12)
            return self.lambda_dice * dice + self.lambda_ce * ce + self.lambda_boundary * boundary


_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice_ce": lambda num_classes, **kw: dice_ce_loss(num_classes, **kw),
    "dice_ce_bg": lambda num_classes, **kw: dice_ce_loss(num_classes, **{"batch_dice": False, "include_background": True, **kw}),
    "region": lambda num_classes, **kw: RegionLoss(**kw),
    "lightmedseg": lambda num_classes, **kw: LightMedSegLoss(num_classes, **kw),
}


def build_loss(name: str, num_classes: int, ignore_label: bool = False, **kwargs: Any) -> nn.Module:
    """The loss called ``name`` for ``num_classes`` output channels; unknown names are a TrainingError.

    ``ignore_label``: targets carry :data:`IGNORE` voxels to leave out (:class:`IgnoreLabelLoss`)."""
    if name not in _LOSSES:
        raise TrainingError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(_LOSSES))}")
    if ignore_label:
        if name not in ("dice_ce", "region"):
            raise TrainingError(f"loss {name!r} cannot leave out the data set's 'ignore' label; use dice_ce (or region)")
        return IgnoreLabelLoss(num_classes, regions=name == "region", **kwargs)
    return _LOSSES[name](num_classes, **kwargs)
