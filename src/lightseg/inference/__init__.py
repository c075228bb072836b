"""Inference: sliding-window prediction of NIfTI scans with a trained run folder.

Names are imported lazily, so a submodule that runs without torch (an ONNX Runtime predictor)
can be imported without pulling in the torch predictor.
"""

from __future__ import annotations

import math
from typing import Sequence

from lightseg.lazy import lazy_getattr

SMALL_TILE_VOXELS = 64**3


def default_batch_tiles(patch_size: Sequence[int]) -> int:
    """Sliding-window tiles per network call when none is asked for: 2 for tiles of at most
    :data:`SMALL_TILE_VOXELS` voxels, else 1 (both backends, ``lightseg predict``).

    Why: on CPU PyTorch runs a batch-1 convolution whose ``C x D x H`` is small on a slow
    reference path instead of oneDNN (docs/models.md); with two tiles per call every conv goes
    to oneDNN. In small tiles nearly every conv is such a conv: LightMedSeg's 32^3 tiles ran 5x
    faster at two per call. In 128^3 tiles few are, and two per call was 4-10 % slower in the
    whole-scan benchmark for 700 MB more memory (docs/prediction.md).
    """
    return 2 if math.prod(patch_size) <= SMALL_TILE_VOXELS else 1


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
