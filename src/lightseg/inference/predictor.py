"""Predict a folder of NIfTI scans with a trained run folder (PyTorch backend).

The pipeline (inputs, outputs, preprocessing, labels, restoring, resuming, per-case failures) is
:mod:`lightseg.inference.pipeline`, shared with the ONNX Runtime backend
(:mod:`lightseg.inference.onnx_predictor`); this module supplies its network step: the run's
model in the sliding-window engine (:mod:`lightseg.inference.window`) through its torch executor
(:mod:`lightseg.inference.sliding`) on the chosen device.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from lightseg.accel import accelerate
from lightseg.allocator import reuse_freed_memory
from lightseg.data.dataset import read_dataset_json
from lightseg.device import check_precision, configure_backend, prefers_channels_last, runnable_precision
from lightseg.errors import PredictionError
from lightseg.inference.pipeline import (
    InputCase,
    Predictor,
    already_predicted,
    ensemble,
    find_input_cases,
    output_paths,
    predict_folder,
    read_channels,
)
from lightseg.inference.cpu_threads import FreeCpuMeter, adapts_threads
from lightseg.inference.sliding import StageTimer, TorchExecutor, WindowSettings, sliding_window
from lightseg.run_folder import DATASET_FILE, load_run

__all__ = ["InputCase", "Predictor", "default_device", "find_input_cases", "inference_form", "load_predictor", "output_paths", "predict",
           "prefers_channels_last", "read_channels"]


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise PredictionError(f"unknown device {name!r}; use 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictionError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def inference_form(model: nn.Module, device: str | torch.device, channels_last: bool | None = None) -> tuple[nn.Module, bool]:
    """``model`` (changed in place) as ``predict`` runs it, and whether that is in
    ``channels_last_3d``: eval mode, accelerated on the CPU (:func:`lightseg.accel.accelerate`;
    ``LIGHTSEG_ACCEL=0``: plain) and in ``channels_last`` or, for ``None``, the layout the
    accelerated model prefers on ``device`` (:func:`lightseg.device.prefers_channels_last`).
    Training's final validation runs its copy of the training model through it too."""
    model = accelerate(model.eval(), device)
    if channels_last is None:
        channels_last = prefers_channels_last(model, device)
    return model.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format), channels_last


def load_predictor(
    run_dir: str | Path, checkpoint: str = "final", step: float = 0.5, tta: bool = False,
    batch_tiles: int | None = None, device: str = "cpu", channels_last: bool | None = None,
    precision: str | None = None,
) -> Predictor:
    """Rebuild the run's model and plan (:func:`lightseg.run_folder.load_run`).

    ``channels_last`` runs the network in ``channels_last_3d`` memory format; ``None`` (default)
    takes the model's own preference on that device (:func:`lightseg.device.prefers_channels_last`).
    ``batch_tiles=None``: :func:`lightseg.inference.default_batch_tiles` for the run's tile and
    device. ``precision=None``: the run's training precision where the device runs it, else the
    fallback :func:`lightseg.device.runnable_precision` names (a GPU run on the CPU: fp32). On
    the CPU, unless ``OMP_NUM_THREADS`` is set, each case runs on as many threads as other
    processes leave free (:mod:`lightseg.inference.cpu_threads`).
    """
    reuse_freed_memory()  # tiles reuse the last tile's activations instead of faulting in fresh pages
    torch_device = _device(device)
    model, config, plan, spec = load_run(run_dir, checkpoint, torch_device)
    model, channels_last = inference_form(model, torch_device, channels_last)
    if precision is None:
        precision, _ = runnable_precision(config.runtime.precision, torch_device)
    else:
        check_precision(precision, torch_device)
    configure_backend(torch_device)
    patch_size = tuple(config.data.patch_size)
    settings = WindowSettings.build(patch_size, config.data.in_channels, step, tta, batch_tiles, device)
    meter = FreeCpuMeter() if torch_device.type == "cpu" and adapts_threads() else None
    executor = TorchExecutor(model, settings, precision, channels_last, config.data.num_classes, meter)
    return Predictor(
        logits=partial(sliding_window, executor, settings),
        plan=plan,
        spec=spec,
        label_values=tuple(config.data.label_values),
        regions=config.data.regions is not None,
        patch_size=patch_size,
        memory_errors=(MemoryError, torch.OutOfMemoryError),
        new_timer=partial(StageTimer, torch_device),
    )


def predict(
    images_dir: str | Path,
    output_dir: str | Path,
    run_dir: str | Path | Sequence[str | Path],
    checkpoint: str = "final",
    step: float = 0.5,
    tta: bool = False,
    save_probabilities: bool = False,
    device: str = "cpu",
    batch_tiles: int | None = None,
    progress: bool = True,
    timer: StageTimer | None = None,
    channels_last: bool | None = None,
    part: tuple[int, int] = (0, 1),
    precision: str | None = None,
) -> list[Path]:
    """Predict every case in ``images_dir`` (or its ``part``) into ``output_dir`` with a run folder, or
    with several as an ensemble (:func:`lightseg.inference.pipeline.ensemble`); returns the label
    files written (:func:`lightseg.inference.pipeline.predict_folder`). ``channels_last`` and
    ``precision``: see :func:`load_predictor`."""
    runs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    spec_path = Path(runs[0]) / DATASET_FILE
    if spec_path.is_file() and already_predicted(images_dir, output_dir, read_dataset_json(spec_path), save_probabilities,
                                                 part, progress):
        return []
    members = [load_predictor(run, checkpoint, step, tta, batch_tiles, device, channels_last, precision) for run in runs]
    predictor = members[0] if len(members) == 1 else ensemble(members, [str(r) for r in runs])
    return predict_folder(predictor, images_dir, output_dir, save_probabilities, progress, timer, part)


def default_device() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"
