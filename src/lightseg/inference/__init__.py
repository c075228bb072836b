"""Inference: sliding-window prediction of NIfTI scans with a trained run folder.

Names are imported lazily, so a submodule that runs without torch (an ONNX Runtime predictor)
can be imported without pulling in the torch predictor.
"""

from __future__ import annotations

from lightseg.lazy import lazy_getattr

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
