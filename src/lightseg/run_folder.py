"""The run folder ``lightseg train -o RUN`` writes, and reading it back as a typed :class:`Run`.

This module owns the run vocabulary: ``config.json`` (the whole :class:`TrainConfig`),
``plan.json`` and ``dataset.json`` (copied from the preprocessed cache), ``checkpoint_final.pth``,
``checkpoint_best.pth`` and ``checkpoint_latest.pth``, ``architecture.json`` (the surviving
branches or widths of a pruned model) and the ONNX export's sidecar (``model.onnx.json``).
Prediction, export, the benchmarks, the demo and cross-validation read runs through it, so they
never import the trainer, its losses, callbacks, pruning or data loaders; the trainer writes the
same names. The configuration's schema (:mod:`lightseg.training.config`) is the one training
module read here, imported when a run is opened.

torch is imported by the functions that load tensors, not by the module: the ONNX backend names
its sidecar through :func:`sidecar_path` on a machine without torch.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lightseg.data.dataset import DatasetSpec, read_dataset_json
from lightseg.data.plan import Plan, load_plan
from lightseg.errors import CheckpointError
from lightseg.io import read_json

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from lightseg.training.config import TrainConfig

CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
DATASET_FILE = "dataset.json"
ARCHITECTURE_FILE = "architecture.json"
CHECKPOINTS = ("final", "best", "latest")
SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json


class Run(NamedTuple):
    """A run folder read back: the model (eval mode, on the requested device) and its parts.

    A named tuple, so ``model, config, plan, spec = load_run(...)`` reads as before."""

    model: nn.Module
    config: TrainConfig
    plan: Plan
    spec: DatasetSpec


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    if which not in CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint {which!r}; choose one of: {', '.join(CHECKPOINTS)}")
    return Path(run_dir) / f"checkpoint_{which}.pth"


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + SIDECAR_SUFFIX)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; anything unsafe, truncated or foreign is a CheckpointError."""
    import torch

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


def read_config(run_dir: str | Path) -> TrainConfig:
    """The run's ``config.json``; a folder without one is not a run folder."""
    from lightseg.training.config import TrainConfig

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); pass the folder `lightseg train -o` wrote")
    return TrainConfig.read(path)


def read_architecture(run_dir: str | Path) -> dict[str, Any] | None:
    """``architecture.json`` of a pruned run, ``None`` for a model built as configured."""
    path = Path(run_dir) / ARCHITECTURE_FILE
    if not path.is_file():
        return None
    architecture = read_json(path, CheckpointError, "copy it back from the run that pruned the model")
    if not isinstance(architecture, dict):
        raise CheckpointError(f"{path}: must be a JSON object of module names and branch ids")
    return architecture


def build_model_from_run(run_dir: str | Path, config: TrainConfig) -> nn.Module:
    """The run's architecture, untrained: the config's model and kwargs, plus ``architecture.json``
    (pruned models) as the builder's ``architecture=`` argument when present."""
    from lightseg.models import create_model

    kwargs = dict(config.model.kwargs)
    architecture = read_architecture(run_dir)
    if architecture is not None:
        kwargs["architecture"] = architecture
    return create_model(config.model.name, config.data.in_channels, config.data.num_classes, **kwargs)


def load_run(run_dir: str | Path, checkpoint: str = "final", device: str | torch.device = "cpu") -> Run:
    """Rebuild the run's model in eval mode with ``checkpoint``'s weights, with its config, plan and spec."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    plan = load_plan(run_dir / PLAN_FILE)
    spec = read_dataset_json(run_dir / DATASET_FILE)
    path = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(path, map_location=device)
    model = build_model_from_run(run_dir, config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {config.model.name!r} ({str(exc).splitlines()[0]})") from exc
    return Run(model.to(device).eval(), config, plan, spec)
