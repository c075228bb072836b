"""The trainer side of the patch-size curricula: a callback that applies a :class:`Schedule`.

:class:`PGPSCallback` sets the sampler's patch and batch at the start of every epoch whose stage
differs from what the sampler holds. It touches nothing else: the LR schedule runs over the
whole budget unreset (PGPS spec section 3), validation and prediction keep the full patch (the
trainer validates at its configured patch; the sampler only feeds training), and the stage is
recomputed from the epoch, so a resumed run continues exactly where an uninterrupted one would
be (spec section 11 lists the published code's resume bugs this avoids).

:func:`curriculum_callback` builds one from the trainer's settings and the model's
``size_divisor``, probing for the smallest patch the model can *train* on: every lightseg U-Net
normalises with InstanceNorm, which refuses the 1x1x1 bottleneck V2 starts from (the V2 code
patched torch to allow it); such models start at V1's 2x1x1 bottleneck instead (``docs/pgps.md``).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from lightseg.errors import CheckpointError, LightsegError, ModelError, TrainingError
from lightseg.training.callbacks import Callback
from lightseg.training.curriculum import Patch, Schedule, Version, cap_batch, pgps_schedule, rpss_schedule

CURRICULA = ("none", "pgps-efficiency", "pgps-performance", "rpss")


class PGPSCallback(Callback):
    """Applies ``schedule`` (PGPS or RPSS) to ``trainer.sampler``, batches capped by ``cap_batch``.

    Adds ``patch_size`` (``[x, y, z]``, plotted in ``progress.png`` as its voxel count) and
    ``batch_size`` to every history entry, and logs each change of patch or batch, saying when
    the cap lowered the batch.
    """

    def __init__(self, schedule: Schedule, max_voxels: int | None = None, max_batch: int | None = None) -> None:
        self.schedule = schedule
        self.max_voxels = max_voxels
        self.max_batch = max_batch
        self._applied: tuple[Patch, int] | None = None  # what the sampler holds in this process

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        stage = self.schedule.stage_at(epoch)
        patch, wanted = self.schedule.patch_sizes[stage], self.schedule.batch_sizes[stage]
        batch = cap_batch(wanted, patch, self.max_voxels, self.max_batch)
        if (patch, batch) == self._applied:
            return
        trainer.sampler.set_patch_size(patch)
        trainer.sampler.set_batch_size(batch)
        self._applied = (patch, batch)
        message = (
            f"{self.schedule.label}: epoch {epoch + 1}/{trainer.num_epochs}, stage {stage + 1}/{self.schedule.num_stages}: "
            f"patch {_format(patch)}, batch {batch}"
        )
        if batch < wanted:
            message += f" (the schedule asks for {wanted}; capped by {self._limits()})"
        trainer.log(message)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        if self._applied is not None:
            patch, batch = self._applied
            metrics.update(patch_size=list(patch), batch_size=batch)

    def state_dict(self) -> dict[str, Any]:
        return {"label": self.schedule.label, "patch_sizes": [list(p) for p in self.schedule.patch_sizes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to resume under a different curriculum; the stage itself comes from the epoch."""
        if state and state != self.state_dict():
            raise CheckpointError(
                f"the checkpoint was trained with curriculum {state.get('label')!r} and sizes "
                f"{state.get('patch_sizes')}, this run builds {self.schedule.label!r} with "
                f"{self.state_dict()['patch_sizes']}; resume with the original settings"
            )

    def _limits(self) -> str:
        limits = []
        if self.max_voxels is not None:
            limits.append(f"the memory budget of {self.max_voxels:,} voxels per batch")
        if self.max_batch is not None:
            limits.append(f"max batch {self.max_batch}")
        return " and ".join(limits)


def _format(patch: Sequence[int]) -> str:
    return "x".join(str(p) for p in patch)


def smallest_trainable_patch(model: nn.Module, in_channels: int, candidates: Sequence[Patch], batch: int = 2) -> Patch:
    """The first of ``candidates`` on which ``model`` runs a training-mode forward pass.

    The probe runs on a copy (BatchNorm statistics of ``model`` stay untouched), without
    gradients, on zeros of batch ``batch``. A :class:`ModelError` names the last failure when no
    candidate works (for example a transformer with a fixed input size).
    """
    probe = copy.deepcopy(model).train()
    device = next(model.parameters()).device
    failure: Exception | None = None
    with torch.no_grad():
        for patch in candidates:
            try:
                probe(torch.zeros((batch, in_channels, *patch), device=device))
                return patch
            except (ValueError, RuntimeError, LightsegError) as exc:
                failure = exc
    raise ModelError(
        f"{type(model).__name__} cannot train on any small patch {list(candidates)} ({failure}); "
        "a patch-size curriculum needs a network that accepts variable input sizes; use --curriculum none"
    )


def curriculum_callback(
    name: str,
    model: nn.Module,
    in_channels: int,
    patch_size: Sequence[int],
    batch_size: int,
    num_epochs: int,
    version: Version = "v2",
    batch_memory: float = 1.0,
    max_batch: int | None = None,
    seed: int = 0,
) -> PGPSCallback | None:
    """The callback for ``--curriculum name`` (one of :data:`CURRICULA`), or None for ``"none"``.

    ``batch_memory`` sets the memory budget as a multiple of the voxels of the planned batch
    (``batch_size`` patches of ``patch_size``), which the configuration already proves fit; V2
    performance batches stay within 1.0 by construction, so the default budget only bites for
    V1 PGPS+ (its full-size batch is 2) or a smaller budget. ``max_batch`` caps the sample count.
    """
    if name not in CURRICULA or version not in ("v1", "v2"):
        raise TrainingError(f"curriculum {name!r} / PGPS version {version!r}: choose a curriculum of {CURRICULA} and version v1 or v2")
    if batch_memory <= 0 or (max_batch is not None and max_batch < 1):
        raise TrainingError(f"the batch cap needs batch_memory > 0 and max_batch >= 1, got {batch_memory} and {max_batch}")
    if name == "none":
        return None
    divisors: Patch = tuple(int(d) for d in model.size_divisor)  # type: ignore[assignment]
    start = divisors if version == "v2" else (2 * divisors[0], divisors[1], divisors[2])
    fallbacks = [start, (2 * divisors[0], divisors[1], divisors[2]), tuple(2 * d for d in divisors)]
    candidates = list(dict.fromkeys(tuple(min(c, p) for c, p in zip(cand, patch_size)) for cand in fallbacks))
    # probed at the smallest batch the schedule can use: batch norm needs 2 values per channel
    smallest_batch = min(batch_size, max_batch or batch_size)
    min_patch = smallest_trainable_patch(model, in_channels, candidates, batch=smallest_batch)  # type: ignore[arg-type]
    if name == "rpss":
        schedule = rpss_schedule(patch_size, divisors, batch_size, num_epochs, version=version, seed=seed, min_patch=min_patch)
    else:
        mode = "performance" if name == "pgps-performance" else "efficiency"
        schedule = pgps_schedule(patch_size, divisors, batch_size, num_epochs, mode=mode, version=version, min_patch=min_patch)
    max_voxels = int(batch_memory * batch_size * math.prod(patch_size))
    return PGPSCallback(schedule, max_voxels=max_voxels, max_batch=max_batch)
