"""Inference: sliding-window prediction of NIfTI scans with a trained run folder.

Names are imported lazily, so a submodule that runs without torch (an ONNX Runtime predictor)
can be imported without pulling in the torch predictor.
"""

from __future__ import annotations

from lightseg.lazy import lazy_getattr

BATCH_TILES = 2
"""Default sliding-window tiles per network call, for both backends and ``lightseg predict``.

Two, not one: on CPU PyTorch runs a batch-1 convolution with few channels on a slow reference
path instead of oneDNN (docs/models.md); with two tiles per call every conv goes to oneDNN.
Measured with LightMedSeg on 2 threads: 5x faster per 32^3 tile, 1.09x per 128^3 tile, for
twice the activation memory of one tile (docs/prediction.md)."""

_NAMES = {
    "predict": "lightseg.inference.predictor",
    "load_predictor": "lightseg.inference.predictor",
    "find_input_cases": "lightseg.inference.predictor",
    "Predictor": "lightseg.inference.predictor",
    "StageTimer": "lightseg.inference.sliding",
    "sliding_window_logits": "lightseg.inference.sliding",
    "logits_to_labels": "lightseg.inference.sliding",
}

__all__ = sorted(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
