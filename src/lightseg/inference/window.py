"""Torch-free pieces of prediction: stage timing, a NumPy sliding window, logits to labels.

The ONNX Runtime backend (:mod:`lightseg.inference.onnx_predictor`) runs with NumPy alone, so
its sliding window lives here. It follows MONAI's ``sliding_window_inference`` as the torch
backend calls it (:mod:`lightseg.inference.sliding`): tile starts every ``int(step * tile)``
voxels with the last tile flush with the far edge, symmetric zero padding of a scan smaller than
a tile, Gaussian importance weights with sigma = 0.125 x tile (exp(-x^2 / 2 sigma^2) per axis,
scaled so the centre is 1, clamped below at max(min, 1e-3)), and the weighted average of the
overlapping tiles. ``tests/test_onnx_backend.py`` checks it against MONAI.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

SLAB = 16  # voxels along the first spatial axis converted at a time
Network = Callable[[np.ndarray], np.ndarray]
"""``network(tiles)``: ``(B, C, *tile)`` float32 in, ``(B, K, *tile)`` float32 logits out."""


class StageTimer:
    """Seconds spent per stage, summed over cases; ``sync`` (e.g. a CUDA synchronise) runs at
    both ends of a stage so that asynchronous work is charged to the stage that queued it."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync or (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start


def mirror_axes(tta: bool) -> list[tuple[int, ...]]:
    """Spatial axes to flip for a ``(B, C, X, Y, Z)`` tile: the identity, or all 8 subsets (nnU-Net's mirroring)."""
    if not tta:
        return [()]
    return [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)]


def gaussian_importance(tile: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's ``compute_importance_map(mode="gaussian")`` in NumPy (float32)."""
    weights = np.ones((), np.float32)
    for n in tile:
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2.0
        weights = weights[..., None] * np.exp(x**2 / np.float32(-2 * (n * sigma_scale) ** 2))
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def tile_starts(size: int, tile: int, step: float) -> list[int]:
    """Start offsets along one axis (MONAI's ``dense_patch_slices``): every ``int(step * tile)``
    voxels, the last one moved back to end at ``size``; one tile when ``tile == size``."""
    interval = tile if tile == size else max(int(tile * step), 1)
    count = next((d + 1 for d in range(math.ceil(size / interval)) if d * interval + tile >= size), 1)
    return [min(d * interval, size - tile) for d in range(count)]


def sliding_window(
    network: Network,
    image: np.ndarray,
    tile: Sequence[int],
    step: float = 0.5,
    tta: bool = False,
    batch_tiles: int = 1,
    timer: StageTimer | None = None,
) -> np.ndarray:
    """Blended float32 logits ``(K, X, Y, Z)`` for a preprocessed ``(C, X, Y, Z)`` image.

    ``network`` time goes to ``timer``'s "network" stage (flips included with ``tta``).
    """
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    timer = timer or StageTimer()
    tile = tuple(int(t) for t in tile)
    pad = [(max(t - s, 0) // 2, max(t - s, 0) - max(t - s, 0) // 2) for t, s in zip(tile, image.shape[1:])]
    padded = np.pad(np.asarray(image, np.float32), [(0, 0), *pad]) if any(map(any, pad)) else np.asarray(image, np.float32)
    shape = padded.shape[1:]
    weights = gaussian_importance(tile)
    corners = list(itertools.product(*(tile_starts(s, t, step) for s, t in zip(shape, tile))))
    total: np.ndarray | None = None
    norm = np.zeros(shape, np.float32)
    flips = mirror_axes(tta)
    for first in range(0, len(corners), batch_tiles):
        batch = corners[first : first + batch_tiles]
        windows = [tuple(slice(c, c + t) for c, t in zip(corner, tile)) for corner in batch]
        tiles = np.stack([padded[(slice(None), *w)] for w in windows])
        with timer.stage("network"):
            logits = sum(np.flip(network(np.ascontiguousarray(np.flip(tiles, a))), a) for a in flips) / len(flips)
        if total is None:
            total = np.zeros((logits.shape[1], *shape), np.float32)
        for w, out in zip(windows, logits):
            total[(slice(None), *w)] += out * weights
            norm[w] += weights
    assert total is not None
    total /= norm
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pad, image.shape[1:]))
    return total[(slice(None), *crop)]


def logits_to_labels(
    logits: np.ndarray, label_values: Sequence[int], regions_class_order: Sequence[int] | None = None
) -> np.ndarray:
    """uint8 label map from ``(K, X, Y, Z)`` logits (any array-like, a CPU tensor included).

    Softmax models: ``label_values[argmax]``. Region models (one sigmoid per region): each region
    with sigmoid > 0.5 (logit > 0) is painted as its ``regions_class_order`` value, in order, so a
    later (inner) region overwrites an earlier (outer) one (nnU-Net's region convention). Computed
    slab by slab along the first spatial axis, so no ``(K, ...)`` integer volume is allocated.
    """
    logits = np.asarray(logits)
    out = np.zeros(logits.shape[1:], np.uint8)
    lut = np.asarray(label_values, np.uint8)
    for lo in range(0, logits.shape[1], SLAB):
        block = logits[:, lo : lo + SLAB]
        if regions_class_order is None:
            out[lo : lo + SLAB] = lut[block.argmax(0)]
        else:
            slab = out[lo : lo + SLAB]
            for channel, value in zip(block, regions_class_order):
                slab[channel > 0] = value
    return out


def probabilities_as_logits(probs: np.ndarray, regions: bool) -> np.ndarray:
    """Scores whose softmax (or sigmoid per region) gives ``probs`` back: log p, or log(p / (1 - p)).

    Averaged probabilities of an ensemble then go through the same label and probability steps
    as one model's logits; argmax and the 0.5 threshold are unchanged. ``p`` is clipped to
    [1e-7, 1 - 1e-7] so no score is infinite."""
    p = np.clip(np.asarray(probs, np.float32), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p)) if regions else np.log(p)


def logits_to_probabilities(logits: np.ndarray, regions: bool) -> np.ndarray:
    """float32 probabilities computed in place slab by slab: softmax over classes, or sigmoid per region."""
    logits = np.asarray(logits)
    for lo in range(0, logits.shape[1], SLAB):
        block = logits[:, lo : lo + SLAB]
        if regions:
            block[...] = 1.0 / (1.0 + np.exp(-block))
        else:
            block -= block.max(0, keepdims=True)
            np.exp(block, out=block)
            block /= block.sum(0, keepdims=True)
    return logits
