"""The training loop: epochs of sampled patches, per-epoch validation, checkpoints, callbacks.

One code path for one CPU, one GPU and ``torchrun`` (DistributedDataParallel): every rank draws
its own patches (seeds differ per rank), gradients are averaged by DDP, validation counts are
summed over ranks, and only rank 0 writes files. Under DDP, parameters no used output reaches
(deep supervision's weight-0 head) are frozen first (:func:`~lightseg.training.distributed.freeze_unreached`).
Precision is the config's (``fp32``/``fp16``/``bf16``, :mod:`lightseg.device`), in training and
validation alike; a device that cannot run it falls back with a logged note. Under fp16 a step
whose loss or gradients overflow is skipped by the GradScaler (scale halved), and only
:data:`MAX_SKIPPED_STEPS` non-finite losses in a row stop training. The callback members this
class guarantees are listed in :mod:`lightseg.training.callbacks`.

Per epoch: LR from the schedule, callbacks' ``on_epoch_start``, ``iters_per_epoch`` steps,
patch validation, ``on_epoch_end``, then ``checkpoint_latest.pth`` (and ``checkpoint_best.pth``
when the exponential moving average of the validation Dice improves, nnU-Net's rule, or the
training loss when there is no validation split), log line and ``progress.png``. A non-finite
loss stops training with a :class:`TrainingError` before the step is applied, so no NaN weights
are ever written over a good checkpoint.
"""

from __future__ import annotations

import math
import sys
from functools import partial
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lightseg.device import autocast, configure_backend, grad_scaler, runnable_precision
from lightseg.errors import CheckpointError, TrainingError
from lightseg.io import write_json
from lightseg.models import first_output
from lightseg.evaluation.crossval import save_validation_case
from lightseg.run_folder import checkpoint_path, load_checkpoint
from lightseg.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from lightseg.training.config import TrainConfig
from lightseg.training.distributed import DistInfo, all_reduce_sum, freeze_unreached
from lightseg.training.loader import loader_workers_checked
from lightseg.training.losses import deep_supervision_weights
from lightseg.training.memory_format import prepare_for_training
from lightseg.training.progress import RunLog, plot_progress
from lightseg.training.parts import TrainingParts
from lightseg.training.validation import case_validation, inference_copy, patch_validation, summarise

EMA_DECAY = 0.9  # nnU-Net's smoothing of the per-epoch pseudo Dice used to pick the best checkpoint
MAX_SKIPPED_STEPS = 20  # fp16: non-finite losses in a row before training stops (the scale has fallen 2^20-fold)
DATA_WAIT_WARNING = 0.2  # CUDA: share of an epoch spent waiting for batches that earns a hint to raise --workers
PLOT_INTERVAL_S = 30.0  # progress.png is redrawn at most this often (and after the last epoch): drawing costs ~1 s


class Trainer:
    """Trains ``config`` on a cache into ``run_dir`` with ``parts`` (:func:`lightseg.training.parts.build_parts`);
    the run folder's JSON files already exist."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        parts: TrainingParts,
        val_cases: Sequence[str],
        class_names: Sequence[str],
        device: torch.device,
        dist: DistInfo,
        workers: int = 2,
    ) -> None:
        self.config, self.run_dir, self.device, self.dist = config, Path(run_dir), device, dist
        self.is_main = dist.is_main
        self.workers = workers
        self.class_names = list(class_names)
        self.num_epochs, self.iters_per_epoch = config.optim.epochs, config.optim.iters_per_epoch
        self.log = RunLog(self.run_dir / "training_log.txt" if self.is_main else None, echo=self.is_main)
        self.precision, note = runnable_precision(config.runtime.precision, device)
        if note:
            self.log(f"precision: {note}")
        configure_backend(device)
        self.model: nn.Module = parts.model
        self.coding, self.loss = parts.coding, parts.loss
        self._new_optimizer = parts.new_optimizer
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.scaler = grad_scaler(device, self.precision)
        self._skipped = 0
        self.sampler, self.loader, self.val_patches = parts.sampler, parts.loader, parts.val_patches
        self.val_cases = list(val_cases)
        self.callbacks = parts.callbacks
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.global_step = 0
        self.best: float | None = None
        self.ema: float | None = None
        self._last_plot = -math.inf
        self._wrap()

    # ----- members the callbacks use -------------------------------------------------------
    def replace_model(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Swap in a new model (for example a pruned one); the LR schedule position is kept."""
        self.model = model.to(self.device)
        self.optimizer = optimizer or self._new_optimizer(self.model)
        self.scheduler.optimizer = self.optimizer
        self.scheduler.set_epoch(self.scheduler.epoch)
        self._wrap()

    def _wrap(self) -> None:
        self.model = prepare_for_training(self.model, self.config.model.name, self.device)  # its fastest training layout
        self.network: nn.Module = self.model
        if self.dist.enabled:
            frozen = freeze_unreached(self.model, self._probe)
            if frozen:
                self.log(f"DDP: {len(frozen)} parameter tensor(s) no used output depends on are frozen ({frozen[0]} ...)")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=ids)

    def _used_outputs(self, outputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs the loss reads: the first without deep supervision, else those of non-zero weight."""
        if not self.config.loss.deep_supervision or isinstance(outputs, torch.Tensor):
            return [first_output(outputs)]
        weights = deep_supervision_weights(len(outputs))
        return [o for o, w in zip(outputs, weights) if w > 0]

    def _probe(self) -> list[torch.Tensor]:
        """A training-mode forward of a zero batch as training draws it (for :func:`freeze_unreached`):
        one patch alone fails in batch norm where the bottleneck is one voxel."""
        self.model.train()
        shape = (self.sampler.batch_size, self.config.data.in_channels, *self.sampler.patch_size)
        x = torch.zeros(shape, device=self.device)
        return self._used_outputs(self.model(x))

    # ----- training ---------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> Path:
        """Train from scratch or from ``checkpoint_latest.pth``; write final checkpoint and validation.

        The loader's workers live from the first epoch to the end, and PyTorch reports a worker's
        death from its SIGCHLD handler wherever the main process is then (saving a checkpoint,
        validating), so the whole run is inside the check."""
        with loader_workers_checked(self.loader):
            return self._fit(resume)

    def _fit(self, resume: bool) -> Path:
        if resume:
            self._restore(checkpoint_path(self.run_dir, "latest"))
        for callback in self.callbacks:
            callback.on_train_start(self)
        for epoch in range(self.epoch, self.num_epochs):
            self.epoch = epoch
            lr = self.scheduler.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            for callback in self.callbacks:
                callback.on_epoch_start(self, epoch)
            entry = {"epoch": epoch, "lr": lr, **self._train_epoch()}
            if self.val_cases:
                entry["val_loss"], dice = patch_validation(  # the bare model: ranks hold unequal patch counts
                    self.model, self.val_patches, self.coding, self.loss, self.device, self.config.data.batch_size, self.precision
                )
                entry.update({f"val_dice_{n}": d for n, d in zip(self.class_names, dice)})
                finite = [d for d in dice if not math.isnan(d)]
                entry["val_dice"] = float(np.mean(finite)) if finite else math.nan
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, entry)
            self.history.append(entry)
            self.epoch = epoch + 1
            self._end_of_epoch(entry)
        for callback in self.callbacks:
            callback.on_train_end(self)
        self._save("final")
        self._final_validation()
        return self.run_dir

    def _train_epoch(self) -> dict[str, float]:
        self.network.train()
        bar = tqdm(
            total=self.iters_per_epoch, desc=f"epoch {self.epoch}", unit="it", leave=False,
            disable=not (self.is_main and sys.stderr.isatty()),
        )
        losses: list[float] = []
        wait = 0.0
        start = time.perf_counter()
        batches = iter(self.loader)
        for _ in range(self.iters_per_epoch):
            t0 = time.perf_counter()
            images, labels = next(batches)
            wait += time.perf_counter() - t0
            loss = self._step(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
            if math.isfinite(loss):  # fp16 steps the scaler skipped do not count
                losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
        bar.close()
        elapsed = time.perf_counter() - start
        if self.device.type == "cuda" and wait / elapsed > DATA_WAIT_WARNING:
            self.log(f"the GPU waited for data {100 * wait / elapsed:.0f}% of epoch {self.epoch + 1} "
                     f"with {self.workers} loader workers; raise --workers if the CPUs allow")
        return {
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "epoch_time": elapsed,
            "sec_per_iter": elapsed / self.iters_per_epoch,
            "data_wait": wait / elapsed,
        }

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            outputs = self.network(images)
            if not self.config.loss.deep_supervision:
                outputs = first_output(outputs)
            loss = self.loss(outputs, self.coding.target(labels))
            for callback in self.callbacks:
                extra = callback.extra_loss(self, images, labels, outputs)
                if extra is not None:
                    loss = loss + extra
        value = loss.detach().float().reshape(1)
        if self.dist.enabled:  # every rank takes the same stop decision, so none waits forever in DDP
            value = all_reduce_sum(value.clone()) / self.dist.world_size
        if torch.isfinite(value).all():
            self._skipped = 0
        elif self.scaler.is_enabled() and self._skipped < MAX_SKIPPED_STEPS:
            self._skipped += 1  # fp16 overflow: backward gives non-finite gradients, the scaler skips the step
        else:
            raise TrainingError(self._nan_message())
        self.scaler.scale(loss).backward()
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        for callback in self.callbacks:
            callback.on_step_end(self, self.global_step, float(value))
        return float(value)

    def _nan_message(self) -> str:
        latest = checkpoint_path(self.run_dir, "latest")
        where = f"{latest} (after epoch {self.epoch - 1})" if latest.is_file() else "none yet (it failed in the first epoch)"
        return (
            f"the training loss became NaN/Inf at epoch {self.epoch}, step {self.global_step}"
            f"{f' ({MAX_SKIPPED_STEPS + 1} fp16 steps in a row)' if self.scaler.is_enabled() else ''}; nothing was saved "
            f"from this step. Last good checkpoint: {where}. Lower --lr, check the data with `lightseg verify`, "
            f"{'train in --precision bf16 or fp32, ' if self.scaler.is_enabled() else ''}or resume with --resume"
        )

    # ----- end of epoch, checkpoints ------------------------------------------------------------
    def _end_of_epoch(self, entry: dict[str, Any]) -> None:
        score = entry.get("val_dice", math.nan) if self.val_cases else -entry["train_loss"]
        if not math.isnan(score):
            self.ema = score if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * score
            entry["val_dice_ema" if self.val_cases else "train_loss_ema"] = self.ema if self.val_cases else -self.ema
        self._save("latest")
        if self.ema is not None and (self.best is None or self.ema > self.best):
            self.best = self.ema
            self._save("best")
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if isinstance(v, float) and k != "lr")
            self.log(f"epoch {entry['epoch'] + 1}/{self.num_epochs}: lr {entry['lr']:.3g}, {shown}")
            if self.epoch == self.num_epochs or time.monotonic() - self._last_plot > PLOT_INTERVAL_S:
                plot_progress(self.history, self.run_dir / "progress.png")
                self._last_plot = time.monotonic()

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "world_size": self.dist.world_size,
            "rng": rng_state(),
            "callbacks": [c.state_dict() for c in self.callbacks],
            "history": self.history,
            "best": self.best,
            "ema": self.ema,
        }

    def _save(self, which: str) -> None:
        if not self.is_main:
            return
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingError(f"weights are not finite after epoch {self.epoch - 1}; {checkpoint_path(self.run_dir, which)} kept as it was")
        save_checkpoint(checkpoint_path(self.run_dir, which), self._state())

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        try:
            self.model.load_state_dict(state["model"])
            self.replace_model(self.model)  # the state may change the parameter set (pruned branches)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: does not match this run's model or optimizer ({str(exc).splitlines()[0]})") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if len(state["callbacks"]) != len(self.callbacks):
            raise CheckpointError(f"{path}: saved with {len(state['callbacks'])} callbacks, this run has {len(self.callbacks)}")
        for callback, callback_state in zip(self.callbacks, state["callbacks"]):
            callback.load_state_dict(callback_state)
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history, self.best, self.ema = list(state["history"]), state["best"], state["ema"]
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} after epoch {self.epoch}")
        trained_on = int(state.get("world_size", self.dist.world_size))  # not recorded before 2026-12-05
        if trained_on != self.dist.world_size:
            batch = self.config.data.batch_size
            self.log(f"note: the run trained on {trained_on} process(es) and now goes on with {self.dist.world_size}: "
                     f"each step now takes {self.dist.world_size * batch} patches instead of {trained_on * batch} "
                     "(--batch is per process; the learning-rate schedule is unchanged)")

    def _final_validation(self) -> None:
        if not self.val_cases:
            self.log("no validation cases (val_fraction 0): validation/summary.json not written")
            return
        own = self.val_cases[self.dist.rank :: self.dist.world_size]
        keep = partial(save_validation_case, self.run_dir, self.config)  # each rank writes its own cases
        results = case_validation(inference_copy(self.model), self.config.data.cache_dir, own, self.coding, self.config.data.patch_size, self.device,
                                  self.precision, keep)
        if self.is_main:
            summary = summarise(results, self.class_names, "final")
            write_json(self.run_dir / "validation" / "summary.json", summary)
            self.log(f"validation (sliding window, {len(results)} cases, preprocessed grid): mean Dice {summary['mean_dice']}; "
                     f"predictions on the original grids in {self.run_dir / 'validation'}")
