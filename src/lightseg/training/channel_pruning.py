"""Training-time channel pruning of the U-Net family: STAMP and the two random baselines of
the LUnet paper (lunet spec section 2), as one trainer callback.

Every ``recovery_epochs`` epochs from ``start_epoch`` on, one *step* removes
``channels_per_step`` output channels of the U-Net's conv units for good
(:func:`lightseg.models.surgery.remove_channels`), then training recovers. The rules:

* ``stamp``: one pass over ``ranking_batches`` training batches scores every channel by the
  Taylor criterion, the mean over batch and voxels of (conv output x its gradient), summed over
  batches; scores are normalised per unit (``|v| / ||v||_2``) and the globally lowest channels go.
  The same scores set the *targeted dropout*: every unit's output gets ``Dropout3d(p)``, with
  ``p = initial_dropout`` (0.005) before the first step, then STAMP's update (:func:`targeted_dropout`).
* ``random-in-stamp-layer``: STAMP's ranking chooses how many channels go from which unit; which
  channels of the unit go is random. Ranking and targeted dropout as for ``stamp``.
* ``random-in-largest-layer``: each channel comes from the unit that is widest at that moment
  (ties broken at random), chosen at random within it. No ranking, so no targeted dropout.

Pruning stops once the model has at most ``target_params`` parameters (checked after every
single channel, so a step stops early rather than overshooting), after ``max_steps`` steps, or
when every unit is down to ``min_channels``. The released STAMP script sets no default for its
channels per iteration (``-p``) or recovery epochs (``-r``); the defaults here are one channel
per step (spec 2.2) and one recovery epoch between steps (the script's ``-r 2``: its recovery
loop runs ``r - 1`` epochs), after one epoch of plain training (the script trains one epoch
before its first iteration). Choices where the spec is silent:

* The segmentation head's conv unit is neither ranked nor pruned: STAMP ranks the U-Net body
  only, not its "Segmenter". The transposed convs keep their width (:mod:`~lightseg.models.surgery`).
* Ranking runs in training mode with the targeted dropout active, as STAMP's ranking pass does;
  it uses the trainer's own loss; gradients are cleared afterwards. Under torchrun the scores are
  summed over processes and the random draws are seeded alike, so every process prunes the same.
* After a step the optimizer starts afresh (STAMP builds a new Adam after each pruning).
* Random draws come from ``numpy.random.default_rng([seed, step])``: a resumed run draws the same.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.errors import ConfigError, TrainingError
from lightseg.io import write_json
from lightseg.models.lunet import UNet3D, conv_units
from lightseg.models.surgery import remove_channels
from lightseg.run_folder import ARCHITECTURE_FILE
from lightseg.training.callbacks import Callback
from lightseg.training.config import CHANNEL_RULES, ChannelPruningConfig

RULES = CHANNEL_RULES

Choice = tuple[str, int]
"""A channel to remove: ``(conv unit, channel index at the start of the step)``."""


# ----- pure decisions ------------------------------------------------------------------------------
def normalise_per_layer(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """STAMP's per-unit normalisation ``|v| / ||v||_2`` (an all-zero unit stays zero)."""
    out = {}
    for name, v in scores.items():
        v = v.abs().double()
        norm = torch.linalg.vector_norm(v)
        out[name] = v / norm if norm > 0 else v
    return out


def _ascending(scores: Mapping[str, torch.Tensor]) -> list[tuple[float, int, str, int]]:
    """Every channel as ``(score, unit position, unit, index)``, lowest first (ties: network order)."""
    return sorted((float(s), order, name, i) for order, (name, v) in enumerate(scores.items()) for i, s in enumerate(v.tolist()))


def lowest_channels(scores: Mapping[str, torch.Tensor], n: int, min_channels: int = 1) -> list[Choice]:
    """The ``n`` globally lowest-scoring channels, lowest first, never taking a unit below
    ``min_channels`` (STAMP's ``lowest_ranking_filters``, which has no such floor)."""
    taken: Counter[str] = Counter()
    choices: list[Choice] = []
    for _, _, name, index in _ascending(scores):
        if len(choices) == n:
            break
        if len(scores[name]) - taken[name] > min_channels:
            taken[name] += 1
            choices.append((name, index))
    return choices


def random_in_layers(layer_order: Sequence[str], widths: Mapping[str, int], rng: np.random.Generator) -> list[Choice]:
    """``random-in-stamp-layer``: for each entry of ``layer_order`` (the units of STAMP's choices,
    in its order) a random channel of that unit, all distinct."""
    counts = Counter(layer_order)
    drawn = {name: [int(i) for i in rng.choice(widths[name], size=k, replace=False)] for name, k in counts.items()}
    return [(name, drawn[name].pop(0)) for name in layer_order]


def largest_layer(widths: Mapping[str, int], rng: np.random.Generator, min_channels: int = 1) -> str | None:
    """The widest unit that may still lose a channel, ties broken at random; None when none may."""
    open_ = {name: w for name, w in widths.items() if w > min_channels}
    if not open_:
        return None
    top = max(open_.values())
    ties = [name for name, w in open_.items() if w == top]
    return ties[int(rng.integers(len(ties)))]


def random_in_largest_layer(widths: Mapping[str, int], n: int, rng: np.random.Generator, min_channels: int = 1) -> list[Choice]:
    """``random-in-largest-layer``: ``n`` times a random channel of the currently widest unit."""
    alive = {name: list(range(w)) for name, w in widths.items()}
    choices: list[Choice] = []
    for _ in range(n):
        name = largest_layer({k: len(v) for k, v in alive.items()}, rng, min_channels)
        if name is None:
            break
        choices.append((name, alive[name].pop(int(rng.integers(len(alive[name]))))))
    return choices


def targeted_dropout(scores: Mapping[str, torch.Tensor], max_p: float = 0.1) -> dict[str, float]:
    """STAMP's dropout update (``new_weights_rankval``): sort every channel's score network-wide,
    give each its inverse rank (the lowest of ``N`` channels gets ``N - 1``, the highest 0), average
    per unit, divide by the largest unit average and multiply by ``max_p``."""
    ordered = _ascending(scores)
    total: Counter[str] = Counter()
    for position, (_, _, name, _) in enumerate(ordered):
        total[name] += len(ordered) - 1 - position
    mean = {name: total[name] / len(v) for name, v in scores.items()}
    top = max(mean.values())
    return {name: (m / top if top > 0 else 0.0) * max_p for name, m in mean.items()}


# ----- the callback ------------------------------------------------------------------------------
def prunable_units(model: nn.Module) -> dict[str, nn.Sequential]:
    """The conv units the rules rank and narrow: all but the segmentation head's."""
    return {name: unit for name, unit in conv_units(model).items() if not name.startswith("head")}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def taylor_scores(model: nn.Module, batches: Any, loss: Any) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over ``batches`` of ``(images, target)`` of each conv output channel's mean of
    (output x gradient of ``loss``); returns the raw scores and the number of batches used."""
    units = prunable_units(model)
    sums = {name: torch.zeros(unit[0].out_channels, dtype=torch.float64) for name, unit in units.items()}

    def hook(name: str):
        def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if output.requires_grad:
                act = output.detach()

                def accumulate(grad: torch.Tensor) -> None:  # returns None: the gradient itself is left alone
                    sums[name].add_((act * grad).mean(dim=(0, 2, 3, 4)).double().cpu())

                output.register_hook(accumulate)

        return keep

    handles = [unit[0].register_forward_hook(hook(name)) for name, unit in units.items()]
    used = 0
    try:
        for images, target in batches:
            model.zero_grad(set_to_none=True)
            loss(model(images), target).backward()
            used += 1
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = next(model.parameters()).device
        for name, v in sums.items():
            on_device = v.to(device)
            torch.distributed.all_reduce(on_device)
            sums[name] = on_device.cpu()
    return sums, used


class ChannelPruning(Callback):
    """The rules and schedule of the module docstring as a trainer callback.

    ``num_params`` goes into the history each epoch (plotted in ``progress.png``); the widths are
    written to ``RUN/architecture.json`` at the end of an epoch whose start pruned, right before
    the trainer's checkpoint, so the file and ``checkpoint_latest.pth`` agree.
    """

    def __init__(self, config: ChannelPruningConfig, seed: int = 0) -> None:
        if config.rule == "none":
            raise ConfigError("channel pruning needs a rule; choose one of: " + ", ".join(RULES))
        self.config, self.seed = config, seed
        self.steps, self.finished = 0, False
        self.dropout: dict[str, float] = {}
        self._handles: list[Any] = []
        self._changed = False

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "finished": self.finished, "dropout": dict(self.dropout)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.finished = int(state["steps"]), bool(state["finished"])
        self.dropout = {str(k): float(v) for k, v in state["dropout"].items()}

    def on_train_start(self, trainer: Any) -> None:
        if not isinstance(trainer.model, UNet3D):
            raise TrainingError(f"channel pruning needs a unet or lunet model, not {type(trainer.model).__name__}")
        if self.config.ranks:
            units = prunable_units(trainer.model)
            self.dropout = self.dropout or {name: self.config.initial_dropout for name in units}
            self._handles = [unit.register_forward_hook(self._drop(name)) for name, unit in units.items()]

    def _drop(self, name: str):
        def drop(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            p = self.dropout.get(name, 0.0)
            return F.dropout3d(output, p, training=True) if module.training and p > 0 else output

        return drop

    def _done(self, model: nn.Module) -> str | None:
        """Why pruning stops now, or None."""
        c = self.config
        if c.target_params is not None and parameter_count(model) <= c.target_params:
            return f"{parameter_count(model)} parameters, at most the target {c.target_params}"
        if c.max_steps is not None and self.steps >= c.max_steps:
            return f"{self.steps} steps done"
        if all(unit[0].out_channels <= c.min_channels for unit in prunable_units(model).values()):
            return f"every unit is down to {c.min_channels} channel(s)"
        return None

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        c = self.config
        if self.finished or epoch < c.start_epoch or (epoch - c.start_epoch) % c.recovery_epochs:
            return
        model = trainer.model
        reason = self._done(model)
        if reason is None:
            choices = self._choose(trainer, model)
            removed = self._apply(model, choices)
            self.steps += 1
            self._changed = True
            trainer.replace_model(model)  # new parameter tensors: a fresh optimizer, LR schedule position kept
            counts = ", ".join(f"{name} -{k}" for name, k in Counter(name for name, _ in removed).items())
            trainer.log(f"channel pruning ({c.rule}), step {self.steps} before epoch {epoch + 1}: removed {counts}; "
                        f"{parameter_count(model)} parameters now")
            reason = self._done(model)
        if reason is not None:
            self.finished = True
            trainer.log(f"channel pruning ({c.rule}) finished before epoch {epoch + 1}: {reason}; widths {model.architecture()}")

    def _choose(self, trainer: Any, model: nn.Module) -> list[Choice]:
        c = self.config
        widths = {name: unit[0].out_channels for name, unit in prunable_units(model).items()}
        rng = np.random.default_rng([self.seed, self.steps])
        if not c.ranks:
            return random_in_largest_layer(widths, c.channels_per_step, rng, c.min_channels)
        n = c.ranking_batches or trainer.iters_per_epoch
        batches = (
            (images.to(trainer.device), trainer.coding.target(labels.to(trainer.device)))
            for images, labels in (trainer.sampler.batch(i) for i in range(n))
        )
        model.train()
        raw, _ = taylor_scores(model, batches, trainer.loss)
        scores = normalise_per_layer(raw)
        self.dropout = targeted_dropout(scores, c.max_dropout)
        stamp = lowest_channels(scores, c.channels_per_step, c.min_channels)
        return stamp if c.rule == "stamp" else random_in_layers([name for name, _ in stamp], widths, rng)

    def _apply(self, model: nn.Module, choices: Sequence[Choice]) -> list[Choice]:
        """Remove ``choices`` one by one (indices at the step's start), stopping at the target."""
        alive = {name: list(range(unit[0].out_channels)) for name, unit in prunable_units(model).items()}
        done: list[Choice] = []
        for name, index in choices:
            if self.config.target_params is not None and parameter_count(model) <= self.config.target_params:
                break
            position = alive[name].index(index)
            remove_channels(model, name, [position])
            alive[name].pop(position)
            done.append((name, index))
        return done

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        metrics["num_params"] = float(parameter_count(trainer.model))
        if self._changed and trainer.is_main:
            write_json(Path(trainer.run_dir) / ARCHITECTURE_FILE, trainer.model.architecture())
        self._changed = False

    def on_train_end(self, trainer: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def channel_pruning_callbacks(config: Any) -> list[Callback]:
    """The callback of ``config.channel_pruning`` (``lightseg train --channel-pruning RULE``), built
    from ``config.json`` alone, so a resumed run or a rerun from it prunes the same way."""
    pruning = config.channel_pruning
    return [] if pruning.rule == "none" else [ChannelPruning(pruning, seed=config.runtime.seed)]
