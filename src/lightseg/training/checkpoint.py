"""Writing checkpoints atomically, and the generator states they carry.

A checkpoint is a dict of tensors and plain values: ``model``, ``optimizer``, ``scheduler``,
``scaler``, ``epoch`` (epochs finished), ``rng`` (torch, NumPy and Python generator states as
tensors and lists, plus the CUDA state of the current device only, so a resume with fewer
visible GPUs, or none, still loads it), ``callbacks`` (one JSON-like state per callback), ``history`` and
``best``. It is written through :func:`lightseg.io.atomic_write`, so a kill at any moment leaves
the previous complete file, and read by :func:`lightseg.run_folder.load_checkpoint` with
``torch.load(weights_only=True)``, which refuses any pickled object: a file carrying one is a
:class:`CheckpointError`, never executed. Their names are :func:`lightseg.run_folder.checkpoint_path`'s.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightseg.io import atomic_write


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise in memory first, then write atomically: a failed save never truncates ``path``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def rng_state() -> dict[str, Any]:
    """Every global generator's state as tensors and lists (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device: each rank uses one
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # a CPU resume of a GPU run keeps its CPU streams only
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible GPU's state
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu())
