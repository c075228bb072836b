"""Validation during and after training, on held-out cases only.

* Per epoch: a cheap "pseudo Dice" on fixed validation patches (nnU-Net's online evaluation):
  true/false positives and false negatives summed over all patches (and all ranks), one Dice per
  foreground class or region.
* At the end: every validation case whole, predicted as ``lightseg predict`` predicts it (a
  copy of the training model, accelerated on the CPU, in the inference layout; the sliding-window
  engine of :mod:`lightseg.inference.window`: nnU-Net's grid, Gaussian blending, step 0.5, no
  mirroring), Dice per case and class. This is measured on the preprocessed grid
  (resampled, cropped to non-zero), not in the original image space: ``lightseg predict`` + ``lightseg evaluate`` give the latter.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from lightseg.data.sampling import CachedCase
from lightseg.device import autocast
from lightseg.models.registry import first_output
from lightseg.training.distributed import all_gather_objects, all_reduce_sum


class LabelCoding:
    """Turns raw label maps into the loss target and into binary evaluation channels.

    Softmax models: class indices into ``label_values``; evaluation channels are classes 1..K-1,
    or ``eval_regions`` when given (a class-trained net scored on a data set's regions, BraTS
    WT/TC/ET: the argmax label value is tested for membership in each region).
    Region models: one binary mask per region for both. Voxels of the ``ignore_label`` get the
    target :data:`~lightseg.training.losses.IGNORE` (the losses leave them out) and are masked
    out of the evaluation counts by :meth:`valid`.
    """

    def __init__(
        self,
        label_values: Sequence[int],
        regions: Sequence[Sequence[int]] | None,
        eval_regions: Sequence[Sequence[int]] | None = None,
        ignore_label: int | None = None,
    ) -> None:
        self.regions = [tuple(r) for r in regions] if regions else None
        lut = torch.zeros(256, dtype=torch.long)
        lut[torch.as_tensor(label_values)] = torch.arange(len(label_values))
        self.ignore_label = ignore_label
        if ignore_label is not None:
            from lightseg.training.losses import IGNORE

            lut[ignore_label] = IGNORE
        self.lut = lut
        self.label_values = tuple(label_values)
        self.groups = self.regions or [tuple(r) for r in eval_regions or [(v,) for v in self.label_values[1:]]]

    @property
    def num_channels(self) -> int:
        return len(self.groups)

    def target(self, raw: torch.Tensor) -> torch.Tensor:
        """Loss target from raw labels ``(B, 1, *spatial)``."""
        if self.regions:
            from lightseg.training.losses import IGNORE, region_targets

            target = region_targets(raw.long(), self.regions)
            return target if self.ignore_label is None else target.masked_fill(raw == self.ignore_label, IGNORE)
        return self.lut.to(raw.device)[raw.long()]

    def valid(self, raw: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *spatial)`` True where a voxel is annotated (not the ignore label)."""
        if self.ignore_label is None:
            return torch.ones_like(raw, dtype=torch.bool)
        return raw != self.ignore_label

    def counts(self, logits: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """:func:`confusion` of the prediction against the truth, ignore-label voxels left out."""
        return confusion(self.predicted(logits) & self.valid(raw), self.truth(raw))

    def truth(self, raw: torch.Tensor) -> torch.Tensor:
        """Binary evaluation channels ``(B, N, *spatial)`` from raw labels."""
        raw = raw.long()
        return torch.cat([torch.isin(raw, torch.as_tensor(g, device=raw.device)) for g in self.groups], 1)

    def predicted(self, logits: torch.Tensor) -> torch.Tensor:
        """Binary channels from logits: sigmoid > 0.5 per region, or the argmax class's label value
        in each evaluation group."""
        if self.regions:
            return logits > 0
        values = torch.as_tensor(self.label_values, device=logits.device)[logits.argmax(1, keepdim=True)]
        return self.truth(values)


def confusion(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``(3, N)`` float64: TP, FP, FN per channel summed over batch and voxels."""
    dims = [0] + list(range(2, pred.ndim))
    tp = (pred & truth).sum(dims)
    fp = (pred & ~truth).sum(dims)
    fn = (~pred & truth).sum(dims)
    return torch.stack([tp, fp, fn]).double()


def dice_from_confusion(counts: torch.Tensor) -> list[float]:
    """Dice per channel; NaN where the class is absent from both prediction and truth."""
    tp, fp, fn = counts
    denominator = 2 * tp + fp + fn
    return [float(2 * t / d) if d > 0 else math.nan for t, d in zip(tp, denominator)]


@torch.no_grad()
def patch_validation(
    model: nn.Module,
    patches: Sequence[tuple[np.ndarray, np.ndarray]],
    coding: LabelCoding,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int,
    precision: str = "fp32",
) -> tuple[float, list[float]]:
    """Mean loss and pseudo Dice over this rank's patches (network in ``precision``), reduced over all ranks."""
    model.eval()
    counts = torch.zeros(3, coding.num_channels, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(patches), batch_size):
        chunk = patches[start : start + batch_size]
        images = torch.from_numpy(np.stack([p[0] for p in chunk])).to(device)
        raw = torch.from_numpy(np.stack([p[1] for p in chunk])[:, None]).to(device)
        with autocast(device, precision):
            logits = first_output(model(images)).float()
        loss_sum += torch.tensor([float(loss_fn(logits, coding.target(raw))) * len(chunk), len(chunk)], device=device, dtype=torch.float64)
        counts += coding.counts(logits, raw)
    all_reduce_sum(counts)
    all_reduce_sum(loss_sum)
    model.train()
    return float(loss_sum[0] / max(loss_sum[1], 1)), dice_from_confusion(counts.cpu())


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of the training ``model`` (its module tree and weights, a pruned or swapped model
    included) for :func:`case_validation` to run as ``predict`` does, leaving the training model
    as it is.

    Each module is copied with fresh tables of parameters (cloned, without gradients), buffers and
    submodules, and without hooks: the input layout hook of
    :func:`lightseg.training.memory_format.prepare_for_training` would force the training layout,
    and a callback's hook would run in validation. Other attributes are shared, not deep-copied:
    they may hold what a training forward left (PSP-Seg's ``features``, tensors of the autograd
    graph, which cannot be deep-copied) and an eval forward only rebinds them. The training forms
    of its layers stay; :func:`lightseg.accel.accelerate` takes them for the plain layers."""
    copies: dict[int, Any] = {}

    def clone(obj: Any) -> Any:
        if obj is None or id(obj) in copies:  # shared (tied) modules and weights stay shared
            return copies.get(id(obj))
        if isinstance(obj, nn.Module):
            new = copy.copy(obj)  # its own attribute table
            copies[id(obj)] = new
            new._parameters = {k: clone(v) for k, v in obj._parameters.items()}
            new._buffers = {k: clone(v) for k, v in obj._buffers.items()}
            new._modules = {k: clone(v) for k, v in obj._modules.items()}
            for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
                setattr(new, hooks, OrderedDict())
            return new
        tensor = obj.detach().clone()
        copies[id(obj)] = nn.Parameter(tensor, obj.requires_grad) if isinstance(obj, nn.Parameter) else tensor
        return copies[id(obj)]

    return clone(model)


@torch.no_grad()
def case_validation(
    model: nn.Module,
    cache_dir: str,
    cases: Sequence[str],
    coding: LabelCoding,
    patch_size: Sequence[int],
    device: torch.device,
    precision: str = "fp32",
    on_case: Callable[[str, np.ndarray], None] | None = None,
) -> list[dict]:
    """Sliding-window Dice on whole cases (this rank's share), gathered from all ranks in case order.

    ``model`` (a copy, :func:`inference_copy`, not the training model) runs as ``lightseg predict`` runs it,
    changed in place to that form (:func:`lightseg.inference.predictor.inference_form`: accelerated
    on the CPU, in its inference layout), in the same sliding window (overlap 0.5, the device's
    tiles per call and blending device, ``precision``), without mirroring. ``on_case(name, logits)``
    receives each case's blended float32 ``(K, *spatial)`` logits (to keep the prediction)."""
    from lightseg.inference.predictor import inference_form
    from lightseg.inference.sliding import TorchExecutor, WindowSettings, sliding_window

    model, channels_last = inference_form(model, device)
    results = []
    for name in cases:
        case = CachedCase.open(cache_dir, name)
        image = np.array(case.image, dtype=np.float32)  # a writable copy of the memory map
        settings = WindowSettings.build(patch_size, image.shape[0], device=str(device))
        outputs = len(coding.regions) if coding.regions else len(coding.label_values)  # softmax: every class, background included
        executor = TorchExecutor(model, settings, precision, channels_last, out_channels=outputs)
        logits = torch.from_numpy(sliding_window(executor, settings, image))
        raw = torch.from_numpy(np.array(case.label))[None, None]
        dice = dice_from_confusion(coding.counts(logits[None], raw))
        results.append({"case": name, "dice": dice})
        if on_case is not None:
            on_case(name, logits.numpy())
    gathered = [r for part in all_gather_objects(results) for r in part]
    order = {name: i for i, name in enumerate(sorted(r["case"] for r in gathered))}
    return sorted(gathered, key=lambda r: order[r["case"]])


def summarise(results: Sequence[dict], names: Sequence[str], checkpoint: str) -> dict:
    """``validation/summary.json``: per-case and mean Dice per class, NaN (absent class) as null."""
    from lightseg.inference.window import WindowSettings  # lazily, as in validate


    def clean(values: Sequence[float]) -> dict[str, float | None]:
        return {n: (None if math.isnan(v) else round(v, 6)) for n, v in zip(names, values)}

    table = np.array([r["dice"] for r in results], dtype=np.float64).reshape(len(results), len(names))
    with np.errstate(invalid="ignore"):
        means = [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in table.T]
    finite = [m for m in means if not math.isnan(m)]
    return {
        "space": "preprocessed grid (resampled to the plan spacing, cropped to non-zero); not the original image space",
        "method": f"sliding window, Gaussian blending (sigma {WindowSettings.sigma_scale} of the tile), step "
                  f"{WindowSettings.step} of the tile, full validation cases",
        "checkpoint": checkpoint,
        "classes": list(names),
        "mean_dice": clean(means),
        "foreground_mean_dice": round(float(np.mean(finite)), 6) if finite else None,
        "cases": [{"case": r["case"], "dice": clean(r["dice"])} for r in results],
    }
