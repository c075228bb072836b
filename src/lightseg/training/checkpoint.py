"""Checkpoints (safe to load, atomic to write) and rebuilding a model from a run folder.

A checkpoint is a dict of tensors and plain values: ``model``, ``optimizer``, ``scheduler``,
``scaler``, ``epoch`` (epochs finished), ``rng`` (torch, NumPy and Python generator states as
tensors and lists, plus the CUDA state of the current device only, so a resume with fewer
visible GPUs, or none, still loads it), ``callbacks`` (one JSON-like state per callback), ``history`` and
``best``. It is written through :func:`lightseg.io.atomic_write`, so a kill at any moment leaves
the previous complete file, and read with ``torch.load(weights_only=True)``, which refuses any
pickled object: a file carrying one is a :class:`CheckpointError`, never executed.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lightseg.data.dataset import DatasetSpec, read_dataset_json
from lightseg.data.plan import load_plan
from lightseg.errors import CheckpointError
from lightseg.io import atomic_write, read_json

CHECKPOINTS = ("final", "best", "latest")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise in memory first, then write atomically: a failed save never truncates ``path``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; anything unsafe, truncated or foreign is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train first or pick another checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused, the file holds pickled Python objects that weights_only loading does not "
            f"allow, or is no checkpoint at all ({str(exc).splitlines()[0]}); only load checkpoints written by lightseg"
        ) from exc
    except Exception as exc:  # a corrupt file fails anywhere in torch's reader (IndexError, KeyError, struct.error ...)
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}); it is corrupt or truncated: "
            "use another checkpoint of the run (--checkpoint best|latest) or retrain"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a lightseg checkpoint (no 'model' state dict)")
    return state


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


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    if which not in CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint {which!r}; choose one of: {', '.join(CHECKPOINTS)}")
    return Path(run_dir) / f"checkpoint_{which}.pth"


def build_model_from_run(run_dir: str | Path, config: Any) -> nn.Module:
    """The run's architecture, untrained: the config's model and kwargs, plus ``architecture.json``
    (pruned PSP-Seg models) as the builder's ``architecture=`` argument when present."""
    from lightseg.models import create_model

    kwargs = dict(config.model_kwargs)
    architecture = Path(run_dir) / "architecture.json"
    if architecture.is_file():
        kwargs["architecture"] = read_json(architecture, CheckpointError, "copy it back from the run that pruned the model")
        if not isinstance(kwargs["architecture"], dict):
            raise CheckpointError(f"{architecture}: must be a JSON object of module names and branch ids")
    return create_model(config.model, config.in_channels, config.num_classes, **kwargs)


def load_run(run_dir: str | Path, checkpoint: str = "final", device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any], DatasetSpec]:
    """Rebuild ``(model in eval mode, TrainConfig, plan, DatasetSpec)`` from a run folder."""
    from lightseg.training.config import TrainConfig

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.json); pass the folder `lightseg train -o` wrote")
    config = TrainConfig.read(run_dir / "config.json")
    plan = load_plan(run_dir / "plan.json").to_json()
    spec = read_dataset_json(run_dir / "dataset.json")
    path = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(path, map_location=device)
    model = build_model_from_run(run_dir, config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {config.model!r} ({str(exc).splitlines()[0]})") from exc
    return model.to(device).eval(), config, plan, spec
