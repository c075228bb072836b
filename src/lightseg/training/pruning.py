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
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from lightseg.errors import TrainingError
from lightseg.io import write_json
from lightseg.models.pspseg import PSPSeg, RedundantModule
from lightseg.run_folder import ARCHITECTURE_FILE
from lightseg.training.callbacks import Callback
from lightseg.training.config import PruningConfig
from lightseg.training.distributed import broadcast_object


Combination = tuple[int, ...]


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
    _sum_over_ranks(scores, next(model.parameters()).device)
    # Rank 0's choice for all: equal sums already agree, this keeps DDP's parameter sets equal regardless.
    choices = broadcast_object({name: best_combination(s) for name, s in scores.items()})
    return choices, used, peak


def _sum_over_ranks(scores: dict[str, dict[Combination, float]], device: torch.device) -> None:
    """Under torchrun every rank scores its own batches; summing makes every rank pick the same."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for name, table in scores.items():
        flat = torch.tensor(list(table.values()), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(flat)
        scores[name] = dict(zip(table, flat.tolist()))


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


def shrink_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A copy of ``optimizer`` over the model's surviving parameters, their state (momentum) kept.

    Parameter order follows the old groups, which is ``model.parameters()`` order, so the state
    dict matches an optimizer built afresh from the rebuilt model on resume.
    """
    live = {id(p) for p in model.parameters()}
    groups = [{**g, "params": [p for p in g["params"] if id(p) in live]} for g in optimizer.param_groups]
    new = type(optimizer)(groups)
    for group in new.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                new.state[p] = optimizer.state[p]
    return new


def active_parameters(model: PSPSeg) -> int:
    """Parameters taking part in the forward pass (masked branches excluded)."""
    masked = sum(p.numel() for rm in model.rms.values() for i in rm.masked for p in rm.branches[str(i)].parameters())
    return sum(p.numel() for p in model.parameters()) - masked


def _set_masks(model: PSPSeg, masks: Mapping[str, Sequence[int]], on: bool) -> None:
    """Mask (or un-mask) branches (:meth:`RedundantModule.set_masked`)."""
    for name, ids in masks.items():
        rm = model.rms[name]
        rm.set_masked(rm.masked | set(ids) if on else rm.masked - set(ids))


class ProgressivePruning(Callback):
    """Section 4 as a trainer callback: watch the training losses, mask, confirm or undo, prune.

    Every event is logged (epoch, branches per module, parameters after); ``num_params`` (active
    parameters) goes into the history each epoch, so ``progress.png`` plots it; the surviving
    branches are written to ``RUN/architecture.json`` at the end of an epoch that changed them,
    right before the trainer's checkpoint, so the file and ``checkpoint_latest.pth`` agree.
    """

    def __init__(self, config: PruningConfig = PruningConfig()) -> None:
        self.config = config
        self.step, self.last_prune, self.enabled = config.step, 0, True
        self.pending: dict[str, list[int]] = {}
        self._changed = False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "last_prune": self.last_prune, "enabled": self.enabled, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.last_prune, self.enabled = int(state["step"]), int(state["last_prune"]), bool(state["enabled"])
        self.pending = {name: [int(i) for i in ids] for name, ids in state["pending"].items()}

    def on_train_start(self, trainer: Any) -> None:
        if not isinstance(trainer.model, PSPSeg):
            raise TrainingError(f"progressive pruning needs a pspseg model, not {type(trainer.model).__name__}")
        if self.pending:  # resumed with masks pending: the checkpoint restored them; re-masking also covers older checkpoints
            _set_masks(trainer.model, self.pending, True)
            trainer.replace_model(trainer.model, trainer.optimizer)

    def _logs(self, history: Sequence[Mapping[str, Any]]) -> list[list[float]]:
        keys = [k for k in self.config.loss_keys if history and k in history[0]]
        return [[float(entry[k]) for entry in history] for k in keys]

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if not self.enabled:
            return
        decision = decide(self._logs(trainer.history), epoch, trainer.num_epochs, self.last_prune, self.step, bool(self.pending), self.config)
        if decision.action == "wait":
            return
        model: PSPSeg = trainer.model
        optimizer = trainer.optimizer
        if decision.action == "undo":
            _set_masks(model, self.pending, False)
            trainer.log(f"pruning, before epoch {epoch + 1}: over-pruned, restored {self._describe(self.pending)}; step {self.step} -> {decision.step}")
        elif self.pending:
            for name, ids in self.pending.items():
                model.rms[name].remove(ids)
            optimizer = shrink_optimizer(optimizer, model)
            trainer.log(f"pruning, before epoch {epoch + 1}: removed {self._describe(self.pending)}; {_count(model)} parameters now")
        self.pending, self._changed = {}, True
        self.step, self.enabled, self.last_prune = decision.step, decision.enabled, epoch
        if decision.mask_new:
            self._mask_round(trainer, model, epoch)
        trainer.replace_model(model, optimizer)
        if not self.enabled:
            trainer.log(f"pruning, before epoch {epoch + 1}: finished; architecture {model.architecture()}")

    def _mask_round(self, trainer: Any, model: PSPSeg, epoch: int) -> None:
        n = self.config.calibration_batches
        batches = (trainer.sampler.batch(i)[0].to(trainer.device) for i in range(n))
        choices, used, held = search_masks(model, batches, self.step, self.config.min_branches)
        if not choices:
            self.enabled = False
            trainer.log(f"pruning, before epoch {epoch + 1}: every module is at {self.config.min_branches} branch(es); nothing left to prune")
            return
        self.pending = {name: list(combo) for name, combo in choices.items()}
        _set_masks(model, self.pending, True)
        published = calibration_bytes(model, trainer.config.data.patch_size, trainer.config.data.batch_size) * used
        trainer.log(
            f"pruning, before epoch {epoch + 1}: masked {self._describe(self.pending)} (step {self.step}); "
            f"{active_parameters(model)} active parameters; search over {used} batches held at most "
            f"{held / 2**20:.1f} MiB beyond the forward pass (the published cache: {published / 2**20:.0f} MiB)"
        )

    @staticmethod
    def _describe(masks: Mapping[str, Sequence[int]]) -> str:
        return ", ".join(f"{name} {list(ids)}" for name, ids in masks.items()) or "nothing"

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        metrics["num_params"] = float(active_parameters(trainer.model))
        if self._changed and trainer.is_main:
            write_json(Path(trainer.run_dir) / ARCHITECTURE_FILE, trainer.model.architecture())
        self._changed = False

    def on_train_end(self, trainer: Any) -> None:
        """Settle masks still pending: undo if over-pruned, otherwise remove them."""
        if not self.pending:
            return
        model: PSPSeg = trainer.model
        epoch = len(trainer.history)
        if over_pruned(self._logs(trainer.history), self.last_prune, epoch, self.config.tolerance):
            _set_masks(model, self.pending, False)
            trainer.log(f"pruning, end of training: over-pruned, restored {self._describe(self.pending)}")
        else:
            for name, ids in self.pending.items():
                model.rms[name].remove(ids)
            trainer.replace_model(model, shrink_optimizer(trainer.optimizer, model))
            trainer.log(f"pruning, end of training: removed {self._describe(self.pending)}; {_count(model)} parameters now")
        self.pending = {}
        if trainer.is_main:
            write_json(Path(trainer.run_dir) / ARCHITECTURE_FILE, model.architecture())


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pruning_callbacks(config: Any) -> list[Callback]:
    """The callbacks of ``config.pruning``: ``progressive`` is FD loss + pruning, ``fd`` the FD
    loss alone (the unpruned reference of the same training objective), ``none`` nothing.

    They are built from ``config.json`` alone, so a resumed run or a rerun from its
    ``config.json`` gets the same callbacks without repeating a flag.
    """
    from lightseg.training.decoupling import FunctionalDecoupling

    mode = config.pruning.mode
    if mode == "none":
        return []
    if mode == "fd":
        return [FunctionalDecoupling()]
    if mode != "progressive":
        raise TrainingError(f"unknown pruning mode {mode!r}; choose none, fd or progressive")
    return [FunctionalDecoupling(), ProgressivePruning(config.pruning)]
