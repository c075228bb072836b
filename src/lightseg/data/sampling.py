"""Random training patches from the preprocessed cache, with nnU-Net's foreground oversampling.

The cache (``docs/formats.md``) is read with memory mapping, so a worker touches only the
voxels of the patches it cuts. :class:`PatchSampler` is an ``IterableDataset`` that yields whole
batches; a ``DataLoader`` with ``batch_size=None`` runs it in worker processes.

Sampling (nnU-Net v2's ``DataLoader3D``): each batch element picks a case at random; the last
``round(B * oversample_foreground)`` elements of a batch (nnU-Net forces the *last* third) are
centred on a random pre-sampled voxel of a random foreground class present in that case, the
others are uniform crops. A volume smaller than the patch is zero-padded (label: background).
With ``class_balanced=True`` a foreground element first draws the class uniformly over the
classes of the whole training set and then a case containing it, so rare classes are seen as
often as common ones. The data set's ignore label (``ignore_label``) is never a foreground
class to centre on, as in nnU-Net.

Randomness: batch ``i`` of epoch ``e`` on rank ``r`` draws from a generator seeded by
``(seed, r, e, i)``, so the stream is reproducible, independent of the number of workers, and
different on every rank of a distributed run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lightseg.errors import PlanError

Patch = tuple[int, int, int]
# (image (C, *crop), label (*crop), patch, spatial, seed) -> (image (C, *patch), label (*patch))
Augment = Callable[[np.ndarray, np.ndarray, Patch, bool, int], tuple[np.ndarray, np.ndarray]]


def cached_cases(cache_dir: str | Path) -> list[str]:
    """Names of the cases to train on: the data set's, as ``CACHE/cases.json`` lists them (cases
    removed from the data set stay in ``cases/`` but are not used), else every complete case."""
    folder = Path(cache_dir) / "cases"
    if not folder.is_dir():
        raise PlanError(f"{cache_dir}: no 'cases' folder; run `lightseg preprocess` to build the cache")
    manifest = Path(cache_dir) / "cases.json"
    if not manifest.is_file():
        return sorted(p.stem for p in folder.glob("*.json"))
    try:
        names = json.loads(manifest.read_text())["cases"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("'cases' must be a list of case names")
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{manifest}: not a case list ({exc}); run `lightseg preprocess` to rewrite it") from exc
    missing = [n for n in names if not (folder / f"{n}.json").is_file()]
    if missing:
        raise PlanError(f"{manifest}: cases {missing[:3]} are not preprocessed; run `lightseg preprocess` to finish the cache")
    return sorted(names)


@dataclass
class CachedCase:
    """One case of the cache, memory-mapped: image ``(C, X, Y, Z)``, label ``(X, Y, Z)``."""

    name: str
    image: np.ndarray
    label: np.ndarray
    locations: dict[int, np.ndarray]

    @classmethod
    def open(cls, cache_dir: str | Path, name: str) -> "CachedCase":
        base = Path(cache_dir) / "cases" / name
        try:
            image = np.load(f"{base}_image.npy", mmap_mode="r", allow_pickle=False)
            label = np.load(f"{base}_label.npy", mmap_mode="r", allow_pickle=False)
            with np.load(f"{base}_locations.npz", allow_pickle=False) as npz:
                locations = {int(k.split("_", 1)[1]): npz[k] for k in npz.files if len(npz[k])}
        except (OSError, ValueError) as exc:
            raise PlanError(f"{base}: cannot read cached case {name!r} ({exc}); rerun `lightseg preprocess`") from exc
        if image.ndim != 4 or image.shape[1:] != label.shape:
            raise PlanError(f"{base}: image {image.shape} and label {label.shape} do not match; rerun preprocess")
        return cls(name, image, label, locations)


def crop_bounds(shape: Sequence[int], patch: Sequence[int], center: Sequence[int] | None, rng: np.random.Generator) -> np.ndarray:
    """Lower corner of a patch: uniform, or centred on ``center``; may be negative (padding).

    As nnU-Net: when the volume is smaller than the patch the patch hangs over both sides
    equally, otherwise it stays inside the volume.
    """
    shape, patch = np.asarray(shape), np.asarray(patch)
    need = np.maximum(patch - shape, 0)
    low = -(need // 2)
    high = shape + need // 2 + need % 2 - patch
    if center is None:
        return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])
    return np.clip(np.asarray(center) - patch // 2, low, high)


def crop_padded(array: np.ndarray, lower: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[..., lower:lower+size]`` over the last three axes, zero-padded outside the volume."""
    lower, size = np.asarray(lower), np.asarray(size)
    shape = np.asarray(array.shape[-3:])
    lo, hi = np.maximum(lower, 0), np.minimum(lower + size, shape)
    region = array[(...,) + tuple(slice(a, b) for a, b in zip(lo, hi))]
    out = np.zeros(array.shape[:-3] + tuple(size), dtype=np.float32 if array.ndim == 4 else array.dtype)
    out[(...,) + tuple(slice(o, o + n) for o, n in zip(lo - lower, np.maximum(hi - lo, 0)))] = region
    return out


class PatchSampler(IterableDataset):
    """Yields ``iters_per_epoch`` batches per epoch: ``(image (B, C, *patch) float32, label (B, 1, *patch) uint8)``.

    ``set_patch_size``/``set_batch_size``/``set_epoch`` take effect at the next ``iter()`` (the
    trainer starts a fresh loader iterator each epoch, so worker processes see the new values).
    ``augment`` (see :mod:`lightseg.data.augment`) receives a crop enlarged by its
    ``context(patch)`` when it will apply a spatial transform, and returns the final patch.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        cases: Sequence[str],
        patch_size: Sequence[int],
        batch_size: int,
        iters_per_epoch: int,
        oversample_foreground: float = 1 / 3,
        class_balanced: bool = False,
        augment: Any | None = None,
        seed: int = 0,
        rank: int = 0,
        ignore_label: int | None = None,
    ) -> None:
        if not cases:
            raise PlanError(f"{cache_dir}: no training cases to sample from")
        self.cache_dir = str(cache_dir)
        self.cases = list(cases)
        self.iters_per_epoch = int(iters_per_epoch)
        self.oversample_foreground = float(oversample_foreground)
        self.class_balanced = bool(class_balanced)
        self.augment = augment
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0
        self.ignore_label = ignore_label
        self.set_patch_size(patch_size)
        self.set_batch_size(batch_size)
        self._open: dict[str, CachedCase] = {}
        self._classes: dict[int, list[str]] | None = None

    def set_patch_size(self, patch_size: Sequence[int]) -> None:
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch size must be three positive ints, got {patch_size!r}")
        self.patch_size: Patch = patch  # type: ignore[assignment]

    def set_batch_size(self, batch_size: int) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in the worker, never pickled as arrays
        return state

    def case(self, name: str) -> CachedCase:
        if name not in self._open:
            case = CachedCase.open(self.cache_dir, name)
            case.locations.pop(self.ignore_label, None)
            self._open[name] = case
        return self._open[name]

    def _cases_by_class(self) -> dict[int, list[str]]:
        if self._classes is None:
            self._classes = {}
            for name in self.cases:
                for value in self.case(name).locations:
                    self._classes.setdefault(value, []).append(name)
        return self._classes

    def sample(self, rng: np.random.Generator, foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        """One patch (image ``(C, *patch)``, label ``(*patch)``), augmented when an augmenter is set."""
        by_class = self._cases_by_class() if foreground and self.class_balanced else None
        if by_class:
            value = sorted(by_class)[rng.integers(len(by_class))]
            case = self.case(by_class[value][rng.integers(len(by_class[value]))])
        else:
            case = self.case(self.cases[rng.integers(len(self.cases))])
            present = sorted(case.locations)
            value = present[rng.integers(len(present))] if foreground and present else None
        center = None
        if value is not None and value in case.locations:
            points = case.locations[value]
            center = points[rng.integers(len(points))]
        patch = np.asarray(self.patch_size)
        lower = crop_bounds(case.label.shape, patch, center, rng)
        spatial = self.augment is not None and self.augment.draw_spatial(rng)
        margin = np.asarray(self.augment.context(self.patch_size)) if spatial else np.zeros(3, int)
        image = crop_padded(case.image, lower - margin, patch + 2 * margin)
        label = crop_padded(case.label, lower - margin, patch + 2 * margin)
        if self.augment is not None:
            image, label = self.augment(image, label, self.patch_size, spatial, int(rng.integers(2**31)))
        return image, label

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of the current epoch (deterministic given seed, rank, epoch, index)."""
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, index])
        first_foreground = round(self.batch_size * (1 - self.oversample_foreground))
        pairs = [self.sample(rng, j >= first_foreground) for j in range(self.batch_size)]
        images = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32, copy=False))
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.uint8, copy=False))
        return images, labels[:, None]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(worker, self.iters_per_epoch, workers):
            yield self.batch(index)

    def __len__(self) -> int:
        return self.iters_per_epoch


def validation_patches(
    cache_dir: str | Path, cases: Sequence[str], patch_size: Sequence[int], per_case: int, seed: int,
    ignore_label: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed validation patches (no augmentation): per case, alternately foreground-centred and uniform.

    Drawn once per run from a generator seeded by ``seed``, so every epoch's patch Dice is
    measured on the same voxels and epochs are comparable.
    """
    if not cases:
        return []
    sampler = PatchSampler(cache_dir, cases, patch_size, 1, 0, seed=seed, ignore_label=ignore_label)
    rng = np.random.default_rng([seed, 7919])
    out = []
    for name in cases:
        sampler.cases = [name]
        out.extend(sampler.sample(rng, foreground=k % 2 == 0) for k in range(per_case))
    return out


def read_case_properties(cache_dir: str | Path, name: str) -> dict[str, Any]:
    """``cases/{name}.json`` of the cache."""
    path = Path(cache_dir) / "cases" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: cannot read case properties ({exc}); rerun `lightseg preprocess`") from exc
