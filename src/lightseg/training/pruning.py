"""PSP-Seg's progressive block pruning (spec section 4): pure decisions and the search.

The schedule runs at the start of every epoch. When every watched training loss has stopped
improving for ``window`` epochs, one *pruning event* happens: if the branches masked at the
previous event left the network unable to get back within ``tolerance`` of its best losses,
they are un-masked and the step shrinks ("over-pruned"); otherwise they are deleted for good and
``step`` more branches are masked in every redundant module, chosen by an exhaustive search
over combinations that minimises the module's output change on calibration batches. The first
event at or after ``deadline`` x epochs ends pruning.

Choices where the published code differs (docs/pspseg.md lists them):

* Active branches are counted, and a module always keeps ``min_branches`` (default 1): a module
  with ``n`` active branches loses ``min(step, n - min_branches)``. The published code counts
  deleted entries too, so it can empty a module and later crash on a module with fewer than
  ``step`` branches left.
* Over-pruning is only judged when a mask is pending; after an undo nothing is masked, so the
  next event masks again with the smaller step (the published code can decrement again).
* At the deadline event nothing new is masked (the published code masks, then un-masks at once).
* The search needs no activation cache: scores are sums over batches of per-batch norms, so each
  module's candidates are scored inside its forward hook, one batch at a time.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from lightseg.models.pspseg import PSPSeg, RedundantModule

Combination = tuple[int, ...]


@dataclass(frozen=True)
class PruningConfig:
    """Section 1's pruning hyperparameters (published values as defaults)."""

    step: int = 2
    window: int = 10
    tolerance: float = 1e-3
    deadline: float = 0.4
    calibration_batches: int = 100
    min_branches: int = 1
    loss_keys: tuple[str, ...] = ("train_loss", "fd_enc", "fd_dec")


@dataclass(frozen=True)
class Decision:
    """What one epoch start does: ``wait``, ``undo`` pending masks, or ``confirm`` (delete) them."""

    action: Literal["wait", "undo", "confirm"]
    mask_new: bool
    step: int
    enabled: bool


def converged(logs: Sequence[Sequence[float]], last_prune: int, epoch: int, window: int = 10) -> bool:
    """True when no log's best since ``last_prune`` lies in its last ``window`` epochs.

    ``logs[j][e]`` is loss ``j`` of finished epoch ``e``; ``epoch`` is the epoch about to start.
    """
    if epoch <= window:
        return False
    for log in logs:
        since = list(log[last_prune:epoch])
        if len(since) <= window or min(since) == min(since[-window:]):
            return False
    return True


def over_pruned(logs: Sequence[Sequence[float]], last_prune: int, epoch: int, tolerance: float = 1e-3) -> bool:
    """True when some loss never came back within ``tolerance`` of its all-time best since ``last_prune``."""
    return any(min(log[:epoch]) + tolerance <= min(log[last_prune:epoch]) for log in logs)


def past_deadline(epoch: int, num_epochs: int, deadline: float = 0.4) -> bool:
    """The first pruning event at or after ``deadline * num_epochs`` is the last one."""
    return epoch >= deadline * num_epochs


def decide(
    logs: Sequence[Sequence[float]],
    epoch: int,
    num_epochs: int,
    last_prune: int,
    step: int,
    has_pending: bool,
    config: PruningConfig,
) -> Decision:
    """One epoch start of the schedule (section 4's ``on_epoch_start``), as a pure function."""
    if not converged(logs, last_prune, epoch, config.window):
        return Decision("wait", False, step, True)
    final = past_deadline(epoch, num_epochs, config.deadline)
    if has_pending and over_pruned(logs, last_prune, epoch, config.tolerance):
        return Decision("undo", False, step - 1, step - 1 > 0 and not final)
    return Decision("confirm", not final, step, not final)


def candidate_combinations(active: Sequence[int], step: int, min_branches: int = 1) -> list[Combination]:
    """Every set of ``min(step, len(active) - min_branches)`` active branches, in a fixed order."""
    k = min(step, len(active) - min_branches)
    return list(itertools.combinations(sorted(active), k)) if k > 0 else []


def best_combination(scores: Mapping[Combination, float]) -> Combination:
    """The combination whose removal changed the output least (ties: the first in order)."""
    return min(scores, key=lambda combo: (scores[combo], combo))


def removal_errors(rm: RedundantModule, x: torch.Tensor, combos: Sequence[Combination]) -> tuple[list[float], int]:
    """``||y - y_without_combo||_F`` for each combination on one batch, and the bytes held doing it.

    A parallel module reuses each branch's gated output once; a sequential one is recomputed
    per combination because later branches see earlier ones.
    """
    active = rm.active()
    if rm.sequential:
        y = rm.forward_with(x, active)
        errors = [float(torch.linalg.vector_norm(y - rm.forward_with(x, [i for i in active if i not in c]))) for c in combos]
        return errors, 3 * y.numel() * y.element_size()
    gated = {i: rm.branches[str(i)](x) for i in active}
    total = x + sum(gated.values())
    y = F.leaky_relu(total, 0.01)
    errors = [float(torch.linalg.vector_norm(y - F.leaky_relu(total - sum(gated[i] for i in c), 0.01))) for c in combos]
    return errors, (len(gated) + 4) * y.numel() * y.element_size()


def search_masks(
    model: PSPSeg, batches: Iterable[torch.Tensor], step: int, min_branches: int = 1
) -> tuple[dict[str, Combination], int, int]:
    """Score every candidate combination of every module on ``batches`` (section 4, prune_round).

    Returns the best combination per module that has any, the number of batches used and the
    peak bytes one module's scoring held beyond the plain forward pass.
    """
    candidates = {name: candidate_combinations(rm.active(), step, min_branches) for name, rm in model.rms.items()}
    scores = {name: {c: 0.0 for c in combos} for name, combos in candidates.items() if combos}
    peak = 0

    def hook(name: str):
        def score(module: RedundantModule, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            nonlocal peak
            errors, held = removal_errors(module, inputs[0], candidates[name])
            peak = max(peak, held)
            for combo, err in zip(candidates[name], errors):
                scores[name][combo] += err

        return score

    handles = [model.rms[name].register_forward_hook(hook(name)) for name in scores]
    was_training = model.training
    model.eval()
    used = 0
    try:
        with torch.no_grad():
            for images in batches:
                model(images)
                used += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: best_combination(s) for name, s in scores.items()}, used, peak


def calibration_bytes(model: PSPSeg, patch_size: Sequence[int], batch_size: int, bytes_per_value: int = 4) -> int:
    """What the published cache (every module's input and output for one batch) would hold.

    Multiply by the number of calibration batches for the published total; the streaming search
    here holds none of it.
    """
    levels = len(model.down) + 1
    voxels = batch_size * math.prod(patch_size)
    total = 0
    for name, rm in model.rms.items():
        level = levels - 1 if name == "bottleneck" else int(name[3:])
        total += 2 * rm.channels * voxels // 8**level
    return total * bytes_per_value
