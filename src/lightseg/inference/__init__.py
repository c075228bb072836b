"""Inference: sliding-window prediction of NIfTI scans with a trained run folder.

Names are imported lazily, so a submodule that runs without torch (an ONNX Runtime predictor)
can be imported without pulling in the torch predictor.
"""

from __future__ import annotations

from typing import Sequence

from lightseg.lazy import lazy_getattr

SLOW_CONV_LIMIT = 20480
"""PyTorch (ATen) runs a batch-1 CPU convolution (not grouped, kernel at most 3) on its slow
reference path instead of oneDNN when the input's ``C x D x H`` is at most this."""


CUDA_BATCH_TILES = 4
"""Tiles per network call on a GPU: a forward of a few milliseconds makes per-call overheads
(launches, the tile gather and blend) weigh; chosen, not yet measured on a GPU
(``benchmarks/gpu_check.py`` times it)."""


def default_batch_tiles(in_channels: int, patch_size: Sequence[int], device: str = "cpu") -> int:
    """Sliding-window tiles per network call when none is asked for (both backends, ``lightseg
    predict``, validation): :data:`CUDA_BATCH_TILES` on a GPU; on the CPU 2 when a tile's own
    ``in_channels x D x H`` is at most :data:`SLOW_CONV_LIMIT`, else 1.

    Why: such a tile's ops are too small to keep two threads busy; two tiles per call amortise
    their overheads. (With one tile, PyTorch would also send its convs to its slow path;
    lightseg's own convs now go to oneDNN themselves, ``lightseg.accel.layers.takes_slow_path``, models from
    elsewhere still take it.) LightMedSeg, one channel, per tile at two per call against one:
    1.54x at 32^3, 1.11x at 64^3, 1.02x at 96^3 (before that routing: 5x, 2.1x, 1.7x). A
    four-channel 128^3 tile is over the limit: there two per call gain at most a few percent per
    tile for 0.7-1.4 GB more memory, so one stays the default (measurements in docs/prediction.md).
    """
    if device == "cuda":
        return CUDA_BATCH_TILES
    return 2 if in_channels * patch_size[0] * patch_size[1] <= SLOW_CONV_LIMIT else 1


_NAMES = {
    "predict": "lightseg.inference.predictor",
    "load_predictor": "lightseg.inference.predictor",
    "find_input_cases": "lightseg.inference.predictor",
    "Predictor": "lightseg.inference.predictor",
    "StageTimer": "lightseg.inference.sliding",
    "WindowSettings": "lightseg.inference.window",
    "sliding_window": "lightseg.inference.window",
    "logits_to_labels": "lightseg.inference.sliding",
}

__all__ = sorted(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
