"""Patch-size curricula as pure schedules: PGPS (V1 and V2), its random baseline RPSS, and the batch cap.

Progressive Growing of Patch Size (Fischer et al., MICCAI 2024 = "V1"; journal extension,
arXiv 2510.23241 = "V2") trains at the smallest patch the network accepts and grows it in the
smallest legal steps, one axis at a time, through equally long phases until the planned patch is
reached; the last phase trains at full size. Nothing here trains: the functions map
(patch, divisors, batch, epochs) to the patch and batch of each epoch, so the trainer callback
(:mod:`lightseg.training.curriculum_callback`) only looks them up. The section numbers below
refer to the project's PGPS specification (``docs/pgps.md`` summarises it).

Choices where the published code is silent or broken (all in ``docs/pgps.md``):

* An axis whose start size already equals the planned size is done from the start (V2 would
  overshoot it); V1's doubled first axis is clamped to the planned size (spec section 2).
* More sizes than epochs (``int(E / n) == 0`` would divide by zero): keep ``E`` sizes spread
  evenly over the list, always the first and the full size, one epoch each.
* The stage index is clamped to the last size in both versions, so V1's appended extra batch
  entry and its out-of-range stages never occur (spec sections 4 and 11).
* RPSS draws a size per epoch, not per iteration (the sampler changes shape at epoch starts),
  from a generator seeded by ``(seed, epoch)``, so a resumed run draws the same sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from lightseg.errors import ModelError

Patch = tuple[int, int, int]
Mode = Literal["efficiency", "performance"]
Version = Literal["v1", "v2"]

# V1 computes its PGPS+ batches backwards from this batch at the full patch (spec section 4).
_V1_FULL_PATCH_BATCH = 2


@dataclass(frozen=True)
class Schedule:
    """The patch and batch of every stage and how epochs map to stages.

    ``seed is None``: stages follow each other in phases of ``phase_length`` epochs (PGPS).
    ``seed`` set: each epoch draws a stage uniformly at random (RPSS, spec section 7).
    """

    patch_sizes: tuple[Patch, ...]
    batch_sizes: tuple[int, ...]
    phase_length: int
    num_epochs: int
    label: str
    seed: int | None = None

    @property
    def num_stages(self) -> int:
        return len(self.patch_sizes)

    def stage_at(self, epoch: int) -> int:
        """The stage trained in ``epoch`` (0-based), computed from the epoch alone so resume needs no state.

        PGPS: a new phase starts at every positive multiple of ``phase_length``; the index is
        clamped at the last stage (spec section 3), so epochs past the budget stay at full size.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.seed is not None:
            return int(np.random.default_rng([self.seed, epoch]).integers(self.num_stages))
        return min(epoch // self.phase_length, self.num_stages - 1)

    def patch_at(self, epoch: int) -> Patch:
        return self.patch_sizes[self.stage_at(epoch)]

    def batch_at(self, epoch: int) -> int:
        return self.batch_sizes[self.stage_at(epoch)]


def _validate(final_patch: Sequence[int], divisors: Sequence[int], base_batch: int, num_epochs: int) -> tuple[Patch, Patch]:
    """The arguments' shape; ``final_patch`` fitting the model's size rule is the caller's to
    ensure (a training's patch is checked once, when its configuration is resolved)."""
    final = tuple(int(p) for p in final_patch)
    steps = tuple(int(d) for d in divisors)
    if len(final) != 3 or len(steps) != 3 or min(final + steps) < 1:
        raise ValueError(f"final_patch and divisors need three positive sizes, got {final} and {steps}")
    if base_batch < 1 or num_epochs < 1:
        raise ValueError(f"base_batch and num_epochs must be >= 1, got {base_batch} and {num_epochs}")
    return final, steps  # type: ignore[return-value]


def patch_sizes_v1(final_patch: Patch, divisors: Patch, start: Patch | None = None) -> list[Patch]:
    """V1 (MICCAI) sizes: start doubled on axis 0, grow axes round-robin 1, 2, 0, ... (spec section 2).

    An axis already at its maximum is skipped; the start is clamped to ``final_patch``.
    """
    size = [min(s, p) for s, p in zip(start or (2 * divisors[0], divisors[1], divisors[2]), final_patch)]
    sizes = [tuple(size)]
    counter = 1
    while tuple(size) != final_patch:
        axis = counter % 3
        counter += 1
        grown = min(size[axis] + divisors[axis], final_patch[axis])
        if grown != size[axis]:
            size[axis] = grown
            sizes.append(tuple(size))
    return sizes  # type: ignore[return-value]


def patch_sizes_v2(final_patch: Patch, divisors: Patch, start: Patch | None = None) -> list[Patch]:
    """V2 (journal) sizes: start at one step per axis; the axis whose enlarged size would be smallest grows next.

    Ties go to the lowest axis (spec section 2). Axes that start at their maximum are done from
    the start, a deliberate fix of the published code, which overshoots them (spec section 11).
    """
    size = [min(s, p) for s, p in zip(start or divisors, final_patch)]
    sizes = [tuple(size)]
    open_axes = [a for a in range(3) if size[a] < final_patch[a]]
    while open_axes:
        axis = min(open_axes, key=lambda a: (size[a] + divisors[a], a))
        size[axis] += divisors[axis]
        sizes.append(tuple(size))
        if size[axis] >= final_patch[axis]:
            open_axes.remove(axis)
    return sizes  # type: ignore[return-value]


def performance_batches_v2(patch_sizes: Sequence[Patch], base_batch: int) -> list[int]:
    """V2 performance mode: ``B_k = int(B0 * prod(P) / prod(S_k))``, voxels per batch ~ constant (spec section 4).

    Integer arithmetic gives exactly the floor the published float expression intends.
    """
    full = math.prod(patch_sizes[-1])
    return [base_batch * full // math.prod(size) for size in patch_sizes]


def performance_batches_v1(patch_sizes: Sequence[Patch], base_batch: int) -> list[int]:
    """V1 PGPS+: backwards from batch 2 at the full patch, ``B_k = int(B_{k+1} * prod(S_{k+1}) / prod(S_k))``.

    The truncation compounds (128^3 gives 24, 12, 6, 4, 3, 2, 2, 2, 2); each entry is then raised
    to at least ``base_batch``, after the whole recursion as in the published code (spec section 4).
    """
    batches = [_V1_FULL_PATCH_BATCH]
    for smaller, larger in zip(reversed(patch_sizes[:-1]), reversed(patch_sizes[1:])):
        batches.append(int(batches[-1] * math.prod(larger) / math.prod(smaller)))
    return [max(batch, base_batch) for batch in reversed(batches)]


def _size_pool(
    final_patch: Sequence[int],
    divisors: Sequence[int],
    base_batch: int,
    num_epochs: int,
    version: Version,
    min_patch: Sequence[int] | None,
) -> list[Patch]:
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    final, steps = _validate(final_patch, divisors, base_batch, num_epochs)
    start = None
    if min_patch is not None:
        start = tuple(int(s) for s in min_patch)
        if len(start) != 3 or any(s < d or s % d for s, d in zip(start, steps)):
            raise ModelError(f"min_patch {start} must be a positive multiple of the model's size divisor {steps}")
    grow = patch_sizes_v2 if version == "v2" else patch_sizes_v1
    return grow(final, steps, start)  # type: ignore[arg-type]


def _spread(items: Sequence, count: int) -> list:
    """``count`` items spread evenly over ``items``, always keeping the first and the last."""
    if count == 1:
        return [items[-1]]
    last = len(items) - 1
    return [items[round(k * last / (count - 1))] for k in range(count)]


def pgps_schedule(
    final_patch: Sequence[int],
    divisors: Sequence[int],
    base_batch: int,
    num_epochs: int,
    mode: Mode = "efficiency",
    version: Version = "v2",
    min_patch: Sequence[int] | None = None,
) -> Schedule:
    """The PGPS schedule for a planned ``final_patch`` and batch ``base_batch`` over ``num_epochs``.

    ``divisors`` is the smallest legal step per axis (nnU-Net: 2^pools; lightseg models: their
    ``size_divisor``). Efficiency mode keeps ``base_batch``; performance mode raises the batch at
    small patches (V2: voxel-constant; V1: PGPS+). Phases last ``int(E / n)`` epochs and the
    last one trains at full size (spec section 3). ``min_patch`` replaces the version's start
    (one step per axis in V2, V1's doubled axis 0) for networks that cannot train on it (spec
    section 6). See the module docstring for the edge cases.
    """
    if mode not in ("efficiency", "performance"):
        raise ValueError(f"mode must be 'efficiency' or 'performance', got {mode!r}")
    sizes = _size_pool(final_patch, divisors, base_batch, num_epochs, version, min_patch)
    if mode == "efficiency":
        batches = [base_batch] * len(sizes)
    elif version == "v2":
        batches = performance_batches_v2(sizes, base_batch)
    else:
        batches = performance_batches_v1(sizes, base_batch)
    if len(sizes) > num_epochs:
        sizes, batches = _spread(sizes, num_epochs), _spread(batches, num_epochs)
    return Schedule(
        patch_sizes=tuple(sizes),
        batch_sizes=tuple(batches),
        phase_length=num_epochs // len(sizes),
        num_epochs=num_epochs,
        label=f"pgps-{mode}-{version}",
    )


def rpss_schedule(
    final_patch: Sequence[int],
    divisors: Sequence[int],
    base_batch: int,
    num_epochs: int,
    version: Version = "v2",
    seed: int = 0,
    min_patch: Sequence[int] | None = None,
) -> Schedule:
    """Random patch-size sampling (RPSS, spec section 7): the PGPS size pool, one uniform draw per epoch.

    Same sizes as :func:`pgps_schedule` of ``version`` (the published RPSS used V1's), always at
    ``base_batch``; validation stays at the full patch as for PGPS.
    """
    sizes = _size_pool(final_patch, divisors, base_batch, num_epochs, version, min_patch)
    return Schedule(
        patch_sizes=tuple(sizes),
        batch_sizes=(base_batch,) * len(sizes),
        phase_length=1,
        num_epochs=num_epochs,
        label=f"rpss-{version}",
        seed=seed,
    )


def cap_batch(batch: int, patch: Sequence[int], max_voxels: int | None = None, max_batch: int | None = None) -> int:
    """``batch`` limited to ``max_voxels`` voxels per batch and ``max_batch`` samples (never below 1).

    A lightseg deviation from the papers, which never cap: performance mode asks for batches such
    as 1,575 patches of 8^3. Activation memory of a fully convolutional net grows with the voxels
    of a batch, so ``max_voxels`` is the memory budget; ``max_batch`` bounds what grows with the
    sample count instead (cropping and augmenting each patch on the host). ``None`` leaves a
    limit off.
    """
    capped = batch
    if max_voxels is not None:
        capped = min(capped, max_voxels // math.prod(patch))
    if max_batch is not None:
        capped = min(capped, max_batch)
    return max(1, capped)


def voxels_seen(schedule: Schedule, iters_per_epoch: int = 1, max_voxels: int | None = None, max_batch: int | None = None) -> int:
    """Input voxels the network sees over the schedule's epochs (after the cap), the PGPS cost measure (spec section 4)."""
    total = 0
    for epoch in range(schedule.num_epochs):
        patch = schedule.patch_at(epoch)
        total += iters_per_epoch * cap_batch(schedule.batch_at(epoch), patch, max_voxels, max_batch) * math.prod(patch)
    return total
