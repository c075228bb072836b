"""The trainer's callback interface: how curricula (PGPS) and pruning (PSP-Seg) plug in.

A callback never edits the trainer; it reads and changes the trainer through these members,
which the trainer guarantees:

- ``trainer.model``: the bare model (not the DDP wrapper); ``trainer.optimizer``,
  ``trainer.scheduler``;
- ``trainer.sampler``: ``set_patch_size(tuple[int, int, int])`` and ``set_batch_size(int)``,
  applied from the next batch drawn;
- ``trainer.replace_model(model, optimizer=None)``: swap in a new (for example pruned) model,
  rewrapping DDP and rebuilding the optimizer (LR schedule position kept) when none is given;
- ``trainer.epoch``, ``trainer.num_epochs``, ``trainer.iters_per_epoch``, ``trainer.config``,
  ``trainer.run_dir``, ``trainer.device``, ``trainer.is_main`` (rank 0);
- ``trainer.log(message)``: a line in the console and ``training_log.txt`` (rank 0 only);
- ``trainer.history``: one dict per finished epoch; a callback may add keys in
  ``on_epoch_end`` (for example ``patch_size``, ``batch_size``, ``num_params``), which the
  trainer plots in ``progress.png`` when they are numeric.

``state_dict``/``load_state_dict`` must hold only JSON-like values (numbers, strings, lists,
dicts): they travel inside checkpoints, which load with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import torch


class Callback:
    """Base class: every hook is optional and does nothing by default."""

    def on_train_start(self, trainer: Any) -> None:
        """After the model, optimizer and sampler exist (and after a resume restored them)."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """Before the first batch of ``epoch`` is drawn (patch/batch changes take effect here)."""

    def extra_loss(self, trainer: Any, images: torch.Tensor, target: torch.Tensor, outputs: Any) -> torch.Tensor | None:
        """An additional training loss term for this step (added to the main loss), or None.

        ``images`` is the batch ``(B, C, *patch)`` on the device, ``target`` the raw label map
        ``(B, 1, *patch)`` (uint8, the values of ``dataset.json``), ``outputs`` what the network
        returned (a list, full resolution first, under deep supervision). Runs inside autocast.
        """
        return None

    def on_step_end(self, trainer: Any, step: int, loss: float) -> None:
        """After the optimizer step of global step ``step``."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        """After the epoch's validation; ``metrics`` is the epoch's history entry (mutable)."""

    def on_train_end(self, trainer: Any) -> None:
        """After the last epoch, before the final checkpoint and validation are written."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on ``--resume``)."""
