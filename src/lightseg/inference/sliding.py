"""Sliding-window logits with optional mirror test-time augmentation, and logits to labels.

MONAI's ``sliding_window_inference`` does the tiling and blending, with every default set
explicitly: Gaussian importance weights (sigma = 0.125 x tile size, nnU-Net's), overlap
``1 - step``, constant zero padding for scans smaller than a tile. Tiles run on the compute
device, but the blended output lives on the CPU, so GPU memory does not grow with the scan.
Mirror TTA (nnU-Net's) averages the logits of all 2^3 flips of each tile over the three
spatial axes: 8x the network time.

Logits become labels slab by slab along the first spatial axis (argmax, or sigmoid > 0.5 painted
in ``regions_class_order``) straight into uint8, so no ``(K, ...)`` int64 or probability volume
is ever allocated unless probabilities are asked for.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference

from lightseg.training.validation import first_output

SLAB = 16  # voxels along the first spatial axis converted at a time
MIRROR_AXES = (2, 3, 4)  # the spatial axes of a (B, C, X, Y, Z) tile


class StageTimer:
    """Seconds spent per stage, summed over cases; waits for the GPU so the split is honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def mirror_flips(tta: bool) -> list[tuple[int, ...]]:
    """Axis sets to flip: only the identity, or all 8 subsets of the three spatial axes."""
    if not tta:
        return [()]
    return [c for r in range(len(MIRROR_AXES) + 1) for c in itertools.combinations(MIRROR_AXES, r)]


def sliding_window_logits(
    model: nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    step: float = 0.5,
    tta: bool = False,
    batch_tiles: int = 1,
    device: torch.device = torch.device("cpu"),
    timer: StageTimer | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Blended float32 logits ``(K, X, Y, Z)`` on the CPU for a preprocessed ``(C, X, Y, Z)`` image.

    ``step`` is the tile stride as a fraction of the tile (nnU-Net's ``tile_step_size``).
    ``channels_last`` feeds tiles in ``channels_last_3d`` memory format (pair it with a model
    converted the same way). Network time goes to ``timer``'s "network" stage; the rest of the
    call is tiling and blending.
    """
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    flips = mirror_flips(tta)
    timer = timer or StageTimer(device)

    def network(tiles: torch.Tensor) -> torch.Tensor:
        with timer.stage("network"), torch.autocast(device.type, enabled=device.type == "cuda"):
            total = None
            if channels_last:
                tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
            for axes in flips:
                x = torch.flip(tiles, axes) if axes else tiles
                y = first_output(model(x)).float()
                y = torch.flip(y, axes) if axes else y
                total = y if total is None else total.add_(y)
            return total.div_(len(flips))

    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    with torch.no_grad():  # not inference_mode: the caller converts the logits in place
        logits = sliding_window_inference(
            inputs,
            roi_size=tuple(int(p) for p in patch_size),
            sw_batch_size=int(batch_tiles),
            predictor=network,
            overlap=1.0 - float(step),
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=0.0,
            sw_device=device,
            device=torch.device("cpu"),
            progress=False,
            roi_weight_map=None,
            process_fn=None,
            buffer_steps=None,
            buffer_dim=-1,
            with_coord=False,
        )
    return logits[0]


def logits_to_labels(
    logits: torch.Tensor, label_values: Sequence[int], regions_class_order: Sequence[int] | None = None
) -> np.ndarray:
    """uint8 label map from ``(K, X, Y, Z)`` logits.

    Softmax models: ``label_values[argmax]``. Region models (one sigmoid per region): each region
    with sigmoid > 0.5 (logit > 0) is painted as its ``regions_class_order`` value, in order, so a
    later (inner) region overwrites an earlier (outer) one (nnU-Net's region convention).
    """
    out = np.zeros(tuple(logits.shape[1:]), np.uint8)
    lut = torch.as_tensor(list(label_values), dtype=torch.uint8)
    for lo in range(0, logits.shape[1], SLAB):
        block = logits[:, lo : lo + SLAB]
        if regions_class_order is None:
            out[lo : lo + SLAB] = lut[block.argmax(0)].numpy()
        else:
            slab = out[lo : lo + SLAB]
            for channel, value in zip(block, regions_class_order):
                slab[(channel > 0).numpy()] = value
    return out


def logits_to_probabilities(logits: torch.Tensor, regions: bool) -> np.ndarray:
    """float32 probabilities, computed in place slab by slab: softmax over classes, or sigmoid per region."""
    for lo in range(0, logits.shape[1], SLAB):
        block = logits[:, lo : lo + SLAB]
        block.copy_(torch.sigmoid(block) if regions else torch.softmax(block, 0))
    return logits.numpy()
