"""Optimizers and learning-rate schedules.

Schedules are pure functions of the epoch (nnU-Net steps its LR once per epoch), so they are
tested without training and a resumed run recomputes the LR from the epoch alone.

* ``poly``: nnU-Net's ``lr * (1 - epoch / epochs) ** 0.9``.
* ``cosine``: linear warm-up from ``lr / warmup`` to ``lr`` over ``warmup_epochs``, then cosine
  annealing to ``min_lr`` over the remaining epochs (LightMedSeg spec section 5). The warm-up is
  capped at a tenth of the run so that a short run is not all warm-up (a choice; see
  ``docs/training.md``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from lightseg.errors import TrainingError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")


def poly_lr(epoch: int, num_epochs: int, lr: float, exponent: float = 0.9) -> float:
    return lr * (1 - epoch / num_epochs) ** exponent


def cosine_lr(epoch: int, num_epochs: int, lr: float, min_lr: float, warmup_epochs: int) -> float:
    warmup = min(warmup_epochs, num_epochs // 10)
    if epoch < warmup:
        return lr * (epoch + 1) / (warmup + 1)
    span = max(num_epochs - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (epoch - warmup) / span))


def schedule_lr(name: str, epoch: int, num_epochs: int, lr: float, min_lr: float = 0.0, warmup_epochs: int = 0) -> float:
    """The learning rate of ``epoch`` (0-based) under schedule ``name``."""
    if name == "poly":
        return poly_lr(epoch, num_epochs, lr)
    if name == "cosine":
        return cosine_lr(epoch, num_epochs, lr, min_lr, warmup_epochs)
    if name == "constant":
        return lr
    raise TrainingError(f"unknown LR schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, momentum: float = 0.99
) -> torch.optim.Optimizer:
    """``sgd``: SGD with Nesterov momentum (nnU-Net: 0.99); ``adamw``: AdamW, betas (0.9, 0.999).

    Both run PyTorch's fused implementation (one kernel over all parameters, on the CPU as on CUDA;
    the same update to float rounding): LightMedSeg's 226 parameter tensors took 13.8 ms per AdamW
    step one by one and 1.8 ms fused (2 threads), 8 % of its 2x1x32^3 training step."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, fused=True)
    raise TrainingError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


class EpochSchedule:
    """Sets the optimizer's LR at each epoch start from :func:`schedule_lr`.

    Its state is only the epoch, so it survives ``replace_model`` (a new optimizer is attached
    with :attr:`optimizer`) and loads with ``weights_only=True``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, num_epochs: int, lr: float, min_lr: float, warmup_epochs: int) -> None:
        schedule_lr(name, 0, num_epochs, lr, min_lr, warmup_epochs)  # validate the name now
        self.optimizer = optimizer
        self.name, self.num_epochs, self.lr, self.min_lr, self.warmup_epochs = name, num_epochs, lr, min_lr, warmup_epochs
        self.epoch = 0

    def lr_at(self, epoch: int) -> float:
        return schedule_lr(self.name, epoch, self.num_epochs, self.lr, self.min_lr, self.warmup_epochs)

    def set_epoch(self, epoch: int) -> float:
        """Apply the LR of ``epoch`` to every parameter group and return it."""
        self.epoch = epoch
        value = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = value
        return value

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))
