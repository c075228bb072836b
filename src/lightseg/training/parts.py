"""The trainer's parts, built from the configuration in one place.

:func:`build_parts` turns a resolved :class:`~lightseg.training.config.TrainConfig` into what
:class:`~lightseg.training.trainer.Trainer` runs: the model (the run folder's architecture), the
label coding and loss, the optimiser and LR schedule, the patch sampler and its loader, the
validation patches and the callbacks the configuration asks for (PSP-Seg pruning, channel
pruning, the patch-size curriculum) after the caller's own. The trainer only runs them, so a
test or a study can hand it other parts.

The patch is not checked here: :func:`lightseg.training.run._resolve_patch` checked it against
the model's size rule before the run folder was written. The order below is the order weights
and draws depend on: the seed is set right before the model is built, so one seed gives one
set of initial weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from lightseg.data.augment import build_augmenter
from lightseg.data.sampling import PatchSampler, validation_patches
from lightseg.run_folder import build_model_from_run
from lightseg.training.callbacks import Callback
from lightseg.training.channel_pruning import channel_pruning_callbacks
from lightseg.training.config import OptimConfig, TrainConfig
from lightseg.training.distributed import DistInfo
from lightseg.training.loader import patch_loader
from lightseg.training.losses import DeepSupervisionLoss, build_loss
from lightseg.training.optim import EpochSchedule, build_optimizer
from lightseg.training.pruning import pruning_callbacks
from lightseg.training.validation import LabelCoding


@dataclass
class TrainingParts:
    """What the trainer runs. ``new_optimizer`` builds the optimiser for a replaced (pruned) model."""

    model: nn.Module
    coding: LabelCoding
    loss: DeepSupervisionLoss
    new_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    optimizer: torch.optim.Optimizer
    scheduler: EpochSchedule
    sampler: PatchSampler
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
    val_patches: list[tuple[np.ndarray, np.ndarray]]
    callbacks: list[Callback]


def new_optimizer(optim: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(optim.optimizer, model.parameters(), optim.lr, optim.weight_decay, optim.momentum)


def build_parts(
    config: TrainConfig,
    run_dir: Path,
    splits: dict[str, list[str]],
    device: torch.device,
    dist: DistInfo,
    workers: int,
    callbacks: Sequence[Callback] = (),
) -> TrainingParts:
    """The parts of one training of ``config`` on ``splits`` (each rank validates its share)."""
    data, seed = config.data, config.runtime.seed
    torch.manual_seed(seed)
    model = build_model_from_run(run_dir, config).to(device)
    coding = LabelCoding(data.label_values, data.regions, data.eval_regions, data.ignore_label)
    loss_options = {} if data.ignore_label is None else {"ignore_label": True}
    loss = DeepSupervisionLoss(build_loss(config.loss.name, data.num_classes, **loss_options))
    optimizer_for = partial(new_optimizer, config.optim)
    optimizer = optimizer_for(model)
    o = config.optim
    scheduler = EpochSchedule(optimizer, o.schedule, o.epochs, o.lr, o.min_lr, o.warmup_epochs)
    sampler = PatchSampler(
        data.cache_dir, splits["train"], data.patch_size, data.batch_size, o.iters_per_epoch,
        oversample_foreground=data.oversample_foreground, class_balanced=data.class_balanced,
        augment=build_augmenter(config.augment.name, config.augment.elastic), seed=seed, rank=dist.rank,
        ignore_label=data.ignore_label,
    )  # fmt: skip
    loader = patch_loader(sampler, workers, pin_memory=device.type == "cuda")
    own_val = splits["val"][dist.rank :: dist.world_size]
    val_patches = validation_patches(data.cache_dir, own_val, data.patch_size, data.val_patches_per_case, seed, data.ignore_label)
    every = [*callbacks, *pruning_callbacks(config), *channel_pruning_callbacks(config), *_curriculum(config, model)]
    return TrainingParts(model, coding, loss, optimizer_for, optimizer, scheduler, sampler, loader, val_patches, every)


def _curriculum(config: TrainConfig, model: nn.Module) -> list[Any]:
    c = config.curriculum
    if c.name == "none":
        return []
    from lightseg.training.curriculum_callback import curriculum_callback

    callback = curriculum_callback(
        c.name, model, config.data.in_channels, config.data.patch_size, config.data.batch_size, config.optim.epochs,
        version=c.pgps_version, batch_memory=c.batch_memory, max_batch=c.max_batch, seed=config.runtime.seed,
    )
    return [] if callback is None else [callback]
