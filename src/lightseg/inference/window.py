"""The one sliding-window engine of lightseg (torch-free), with stage timing and logits to labels.

Every path that turns a whole preprocessed scan into logits uses :func:`sliding_window` with a
:class:`WindowSettings`: ``lightseg predict`` with a run folder (the torch executor,
:mod:`lightseg.inference.sliding`), with an exported model in ONNX Runtime or OpenVINO (the
NumPy executor here) and training's final validation. The engine owns everything but the
network call:

* the grid is nnU-Net's (``compute_steps_for_sliding_window``): along each axis
  ``ceil((size - tile) / (tile * step)) + 1`` tiles, evenly spaced from 0 to ``size - tile``; a
  scan smaller than a tile is zero-padded symmetrically to the tile first. (MONAI's
  ``sliding_window_inference`` puts tiles every ``int(step * tile)`` voxels and moves the last
  one flush with the edge, so its last two tiles overlap more; it also needs torch, which the
  exported-model backends must not import.)
* the importance map is MONAI's ``compute_importance_map(mode="gaussian")`` in NumPy
  (exp(-x^2 / 2 sigma^2) per axis with sigma = ``sigma_scale`` x tile, centre 1, clamped below at
  max(min, 1e-3)); ``tests/test_window_engine.py`` checks it, and the blend, against MONAI.
* the blend is the importance-weighted average of the overlapping tiles, each the mean of its
  mirrored copies (nnU-Net's test-time mirroring over ``mirror_axes``).

An executor supplies the network call and the arrays the blend lives in (NumPy on the host, or
torch tensors on the blending device), so the blend is written once for both.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from lightseg.errors import PredictionError
from lightseg.inference import default_batch_tiles

SLAB = 16  # voxels along the first spatial axis converted at a time
SIGMA_SCALE = 0.125  # nnU-Net's and MONAI's Gaussian sigma as a fraction of the tile
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


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class WindowSettings:
    """How a scan is tiled, weighted, mirrored and batched; checked once, here, so that no
    executor or caller checks again.

    ``tile``: the tile in voxels (the training patch). ``step``: the stride as a fraction of the
    tile, in (0, 1] (nnU-Net's ``tile_step_size``; 0.5 = half-overlapping tiles). ``sigma_scale``:
    the Gaussian's sigma as a fraction of the tile, in (0, 10]. ``mirror_axes``: spatial axes
    (0, 1, 2) mirrored for test-time augmentation; every subset is run and averaged (all three:
    8x the network time). ``tiles_per_call``: tiles per network call, at least 1. ``device``:
    where the network runs: ``cpu``, ``cuda`` or ``cuda:N`` (the exported-model backends: ``cpu``).
    """

    tile: tuple[int, int, int]
    step: float = 0.5
    sigma_scale: float = SIGMA_SCALE
    mirror_axes: tuple[int, ...] = ()
    tiles_per_call: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        def refuse(name: str, value: Any, rule: str) -> None:
            raise PredictionError(f"sliding window: {name}={value!r:.80} is not valid; {rule}")

        tile = self.tile
        if not (isinstance(tile, (tuple, list)) and len(tile) == 3 and all(_is_int(t) and 0 < t <= 4096 for t in tile)):
            refuse("tile", tile, "give three integers in 1..4096 (the training patch size)")
        object.__setattr__(self, "tile", tuple(int(t) for t in tile))
        if not (isinstance(self.step, (int, float)) and not isinstance(self.step, bool) and 0.0 < self.step <= 1.0):
            refuse("step (--step)", self.step, "the stride is a fraction of the tile in (0, 1], e.g. 0.5")
        scale = self.sigma_scale
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0.0 < scale <= 10.0):
            refuse("sigma_scale", scale, "the Gaussian sigma is a fraction of the tile in (0, 10], nnU-Net's is 0.125")
        axes = self.mirror_axes
        if not (isinstance(axes, (tuple, list)) and all(a in (0, 1, 2) and _is_int(a) for a in axes)
                and len(set(axes)) == len(axes)):
            refuse("mirror_axes", axes, "give distinct spatial axes among 0, 1, 2 (() for no mirroring)")
        object.__setattr__(self, "mirror_axes", tuple(sorted(int(a) for a in axes)))
        if not (_is_int(self.tiles_per_call) and 1 <= self.tiles_per_call <= 4096):
            refuse("tiles_per_call (--batch-tiles)", self.tiles_per_call, "give an integer from 1 to 4096")
        device = self.device
        if not (isinstance(device, str) and (device in ("cpu", "cuda") or
                                             (device.startswith("cuda:") and device[5:].isdigit()))):
            refuse("device (--device)", device, "use 'cpu', 'cuda' or 'cuda:N'")

    @classmethod
    def build(cls, tile: Sequence[int], in_channels: int, step: float = 0.5, tta: bool = False,
              tiles_per_call: int | None = None, device: str = "cpu") -> "WindowSettings":
        """Settings as ``lightseg predict`` and validation ask for them: ``tta`` mirrors all three
        axes; ``tiles_per_call=None`` takes :func:`lightseg.inference.default_batch_tiles` for
        this tile, channel count and device."""
        if tiles_per_call is None:
            tiles_per_call = default_batch_tiles(in_channels, tile, str(device).split(":")[0])
        return cls(tuple(tile), step, SIGMA_SCALE, (0, 1, 2) if tta else (), tiles_per_call, device)  # type: ignore[arg-type]

    @property
    def flips(self) -> list[tuple[int, ...]]:
        """Axes of a ``(B, C, X, Y, Z)`` tile batch to flip: every subset of ``mirror_axes``, the identity first."""
        axes = [a + 2 for a in self.mirror_axes]
        return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def gaussian_importance(tile: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """MONAI's ``compute_importance_map(mode="gaussian")`` in NumPy (float32)."""
    weights = np.ones((), np.float32)
    for n in tile:
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2.0
        weights = weights[..., None] * np.exp(x**2 / np.float32(-2 * (n * sigma_scale) ** 2))
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def tile_starts(size: int, tile: int, step: float) -> list[int]:
    """Start offsets along one axis, nnU-Net's rule: ``ceil((size - tile) / (tile * step)) + 1``
    tiles evenly spaced from 0 to ``size - tile`` (rounded to whole voxels); ``size >= tile``."""
    count = math.ceil((size - tile) / (tile * step)) + 1
    if count == 1:
        return [0]
    spacing = (size - tile) / (count - 1)
    return [int(round(spacing * i)) for i in range(count)]


class Executor(Protocol):
    """Runs the network on tile batches and holds the arrays the blend is made in."""

    def run(self, tiles: np.ndarray) -> Any:
        """``(B, K, *tile)`` float32 logits of ``(B, C, *tile)`` float32 tiles, on the blending
        device, writable (the blend weights them in place)."""

    def flip(self, logits: Any, axes: tuple[int, ...]) -> Any:
        """``logits`` mirrored along ``axes``."""

    def begin(self, shape: tuple[int, ...]) -> None:
        """A scan of (padded) spatial ``shape`` starts: the executor may choose its blending device and threads."""

    def blend_arrays(self, channels: int, shape: tuple[int, ...], weights: np.ndarray) -> tuple[Any, Any, Any]:
        """Zeroed sums ``(channels, *shape)`` and weight totals ``shape``, and ``weights``, on the
        blending device; called once per scan, after :meth:`begin`."""

    def to_numpy(self, array: Any) -> np.ndarray:
        """A float32 host array (no copy where none is needed)."""


class NumpyExecutor:
    """A torch-free executor: ``network`` (ONNX Runtime, OpenVINO) takes and returns NumPy batches."""

    def __init__(self, network: Network) -> None:
        self.network = network

    def begin(self, shape: tuple[int, ...]) -> None:
        pass

    def run(self, tiles: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.network(tiles), np.float32)
        return logits if logits.flags.writeable else logits.copy()  # the blend weights it in place

    def flip(self, logits: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        return np.flip(logits, axes)

    def blend_arrays(self, channels: int, shape: tuple[int, ...], weights: np.ndarray) -> tuple[Any, Any, Any]:
        return np.zeros((channels, *shape), np.float32), np.zeros(shape, np.float32), weights

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return array


def sliding_window(executor: Executor, settings: WindowSettings, image: np.ndarray,
                   timer: StageTimer | None = None) -> np.ndarray:
    """Blended float32 logits ``(K, X, Y, Z)`` on the host for a preprocessed ``(C, X, Y, Z)`` image.

    Tiles are cut on the host; the executor runs them (``tiles_per_call`` at a time, each mirrored
    copy once) and the blend is made in its arrays. Network time (mirroring included) goes to
    ``timer``'s "network" stage; the rest of the call is tiling and blending.
    """
    timer = timer or StageTimer()
    tile = settings.tile
    # C order once for the whole image: tiles cut from a Fortran-ordered one (as NIfTI arrays and
    # resampling leave it) stay Fortran-ordered, and every tile's conversion to the executors'
    # layouts is then a cache-hostile transpose (60-190 ms per 4x128^3 tile against 60 ms for
    # the whole BraTS-size image, docs/benchmarks.md).
    image = np.ascontiguousarray(image, np.float32)
    pad = [(max(t - s, 0) // 2, max(t - s, 0) - max(t - s, 0) // 2) for t, s in zip(tile, image.shape[1:])]
    padded = np.pad(image, [(0, 0), *pad]) if any(map(any, pad)) else image
    shape = padded.shape[1:]
    corners = list(itertools.product(*(tile_starts(s, t, settings.step) for s, t in zip(shape, tile))))
    flips = settings.flips
    executor.begin(shape)
    total = norm = weights = None
    for first in range(0, len(corners), settings.tiles_per_call):
        windows = [tuple(slice(c, c + t) for c, t in zip(corner, tile))
                   for corner in corners[first : first + settings.tiles_per_call]]
        tiles = np.stack([padded[(slice(None), *w)] for w in windows])
        with timer.stage("network"):
            logits = None
            for axes in flips:
                out = executor.run(np.ascontiguousarray(np.flip(tiles, axes)) if axes else tiles)
                out = executor.flip(out, axes) if axes else out
                logits = out if logits is None else logits + out
            if len(flips) > 1:
                logits = logits / len(flips)
        if total is None:
            total, norm, weights = executor.blend_arrays(
                logits.shape[1], shape, gaussian_importance(tile, settings.sigma_scale))
        for w, out in zip(windows, logits):
            out *= weights  # in place, and views added into: `total[w] += x` would also write the view back
            region, weight = total[(slice(None), *w)], norm[w]
            region += out
            weight += weights
    total /= norm
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pad, image.shape[1:]))
    return executor.to_numpy(total[(slice(None), *crop)])


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
