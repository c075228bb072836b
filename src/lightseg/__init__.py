"""lightseg: efficient 3D medical image segmentation.

The public API is imported lazily so that ``import lightseg`` stays fast and works without
torch (an ONNX-only deployment predicts without it).
"""

from __future__ import annotations

from lightseg.lazy import lazy_getattr

__version__ = "0.1.0"

_API = {
    "benchmark_models": "lightseg.benchmark.profile",
    "convert_msd": "lightseg.data.msd",
    "create_model": "lightseg.models",
    "evaluate": "lightseg.evaluation",
    "list_models": "lightseg.models",
    "load_dataset": "lightseg.data",
    "make_demo_dataset": "lightseg.data.demo",
    "make_synthetic_dataset": "lightseg.data",
    "predict": "lightseg.inference",
    "preprocess_dataset": "lightseg.data.preprocess",
    "train": "lightseg.training.run",
    "verify_dataset": "lightseg.data.verify",
}

__all__ = sorted(_API)
__getattr__ = lazy_getattr(__name__, _API)
