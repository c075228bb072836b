"""PSP-Seg's functional-decoupling (FD) loss (spec section 3) as a trainer callback.

Two auxiliary terms, added to the segmentation loss with weight 0.1, in training only:

* encoder term: for every encoder level and the bottleneck, ``mean(1 - cos)`` over voxels of
  the channel-wise cosine between the features of the image and (without gradient) those of
  the *foreground-only* image, whose background is replaced by a constant fill value;
* decoder term: BCE-with-logits of the channel mean of the stage-1 decoder features (1/2
  resolution) against the foreground mask.

The fill value. The published code fills with the dataset's 0.5th percentile of *raw* foreground
intensity (HU for CT) while the images are already normalised, so the fill lands far outside
the data range (thousands of standard deviations for CT). The default here, ``"normalized"``,
is the same statistic measured in the units the network sees: per input channel, the 0.5th
percentile of the foreground voxels of the normalised batch (the batch minimum when the batch
has no foreground). It works for every normalisation scheme (CT clipping, per-image z-score)
without reading the plan. Passing a number reproduces the published behaviour (give it the raw
percentile).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from lightseg.training.callbacks import Callback

FD_WEIGHT = 0.1


def foreground_mask(target: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, 1, *spatial)`` float mask of labelled voxels.

    Accepts a label map ``(B, 1, ...)`` or ``(B, ...)`` (foreground = nonzero), region targets
    ``(B, R, ...)`` (foreground = any region), or a list of deep-supervision targets (its
    full-resolution entry is used).
    """
    if isinstance(target, (list, tuple)):
        target = target[0]
    if target.dim() == 4:
        target = target[:, None]
    return (target != 0).any(dim=1, keepdim=True).float()


def fill_values(images: torch.Tensor, mask: torch.Tensor, percentile: float = 0.5) -> torch.Tensor:
    """Per-channel ``percentile`` (in %) of the foreground voxels of ``images``, shape ``(C,)``."""
    flat = images.detach().transpose(0, 1).reshape(images.shape[1], -1)
    keep = mask.expand_as(images).transpose(0, 1).reshape(images.shape[1], -1)[0] > 0
    if not bool(keep.any()):
        return flat.min(dim=1).values
    values = flat[:, keep]
    k = max(1, math.ceil(percentile / 100.0 * values.shape[1]))
    return values.kthvalue(k, dim=1).values


def masked_image(images: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
    """``mask * images + (1 - mask) * fill`` with ``fill`` a scalar or one value per channel."""
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(1, -1, *([1] * (images.dim() - 2)))
    return mask * images + (1 - mask) * fill


def encoder_term(features: Sequence[torch.Tensor], masked_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the mean (over batch and voxels) of ``1 - cos`` along channels."""
    return sum(
        (1 - F.cosine_similarity(f.float(), m.detach().float(), dim=1)).mean()
        for f, m in zip(features, masked_features, strict=True)
    )


def decoder_term(decoder1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the channel mean of stage-1 decoder features against the mask at that scale."""
    small = F.interpolate(mask, size=decoder1.shape[2:], mode="nearest")
    return F.binary_cross_entropy_with_logits(decoder1.float().mean(dim=1, keepdim=True), small)


class FunctionalDecoupling(Callback):
    """Adds ``weight * (encoder term + decoder term)`` to each training step (spec section 3).

    The model must be a :class:`~lightseg.models.pspseg.PSPSeg`: it records its encoder and
    stage-1 decoder features during the training forward, so the FD loss reuses them and
    costs one extra no-grad encoder pass. Per-epoch means go into the history as ``fd_enc`` and
    ``fd_dec`` (the pruning schedule watches them, section 4).
    """

    def __init__(self, weight: float = FD_WEIGHT, fill: str | float = "normalized", percentile: float = 0.5) -> None:
        if isinstance(fill, str) and fill != "normalized":
            raise ValueError(f"fill must be 'normalized' or a number, got {fill!r}")
        self.weight, self.fill, self.percentile = weight, fill, percentile
        self._sums = [0.0, 0.0]
        self._count = 0

    def on_train_start(self, trainer: Any) -> None:
        trainer.model.record_features = True

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        trainer.model.record_features = True  # a pruning step may have swapped the model in
        self._sums, self._count = [0.0, 0.0], 0

    def extra_loss(self, trainer: Any, images: torch.Tensor, target: Any, outputs: Any) -> torch.Tensor | None:
        model = trainer.model
        features, model.features = model.features, None
        if features is None:
            return None
        mask = foreground_mask(target).to(images.dtype)
        fill = fill_values(images, mask, self.percentile) if self.fill == "normalized" else self.fill
        with torch.no_grad():
            masked = model.encode(masked_image(images, mask, fill))
        enc = encoder_term(features["encoder"], masked)
        dec = decoder_term(features["decoder1"], mask)
        self._sums[0] += float(enc.detach())
        self._sums[1] += float(dec.detach())
        self._count += 1
        return self.weight * (enc + dec)

    def on_train_end(self, trainer: Any) -> None:
        """Stop recording: features a forward kept without a loss to take them (a pruning search's
        calibration passes) would otherwise hold their autograd graph for the model's lifetime."""
        trainer.model.record_features, trainer.model.features = False, None

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        totals = torch.tensor([*self._sums, float(self._count)], dtype=torch.float64, device=trainer.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)  # every rank must see the same losses (pruning decisions)
        if totals[2] > 0:
            metrics["fd_enc"] = float(totals[0] / totals[2])
            metrics["fd_dec"] = float(totals[1] / totals[2])
