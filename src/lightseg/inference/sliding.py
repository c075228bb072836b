"""The torch executor of the sliding-window engine (:mod:`lightseg.inference.window`).

Tiles run on the compute device in the run's precision (autocast), in ``channels_last_3d``
memory format when the model prefers it; the blend is made there too when the blended volume
fits (:func:`lightseg.device.blend_device`: one device-to-host copy per scan, not one per tile),
else on the CPU, so GPU memory need not grow with the scan. Everything else (grid, Gaussian
weights, mirroring, the blend itself) is the engine's.

Logits to labels and probabilities (torch-free, shared with the exported-model backends) live in
:mod:`lightseg.inference.window` and are re-exported here.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lightseg.device import autocast, blend_device
from lightseg.inference import window
from lightseg.inference.cpu_threads import FreeCpuMeter
from lightseg.inference.window import WindowSettings, logits_to_labels, logits_to_probabilities, sliding_window
from lightseg.models.registry import first_output

__all__ = ["StageTimer", "TorchExecutor", "WindowSettings", "logits_to_labels", "logits_to_probabilities",
           "sliding_window"]


class StageTimer(window.StageTimer):
    """Seconds per stage; waits for ``device`` (CUDA) at both ends of a stage so the split is honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        super().__init__(partial(torch.cuda.synchronize, device) if device.type == "cuda" else None)


class TorchExecutor:
    """Runs ``model`` (eval mode, no gradients) on ``settings.device`` in ``precision`` (``fp32``,
    ``fp16``, ``bf16``); ``channels_last`` feeds tiles in ``channels_last_3d`` (pair it with a
    model converted the same way). ``out_channels`` (the model's) lets the blend stay on the GPU
    when it fits; ``None`` blends on the CPU. Logits are float32 whatever the precision.
    ``free_cpus`` (CPU only): each image's tiles run on as many threads as it reports CPUs free
    before the image, at most PyTorch's count at construction; the count is set around each
    network call only, so the caller's own setting is left as it was
    (:mod:`lightseg.inference.cpu_threads`)."""

    def __init__(self, model: nn.Module, settings: WindowSettings, precision: str = "fp32",
                 channels_last: bool = False, out_channels: int | None = None,
                 free_cpus: FreeCpuMeter | None = None) -> None:
        self.model, self.precision, self.channels_last = model, precision, channels_last
        self.device = torch.device(settings.device)
        self.out_channels = out_channels
        self.blend = torch.device("cpu")
        self.free_cpus, self.max_threads = free_cpus, torch.get_num_threads()
        self.threads: int | None = None  # this image's thread count, where free_cpus chose one

    @torch.no_grad()  # not inference_mode: callers convert the blended logits in place
    def run(self, tiles: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(tiles).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        caller = torch.get_num_threads()
        if self.threads in (None, caller):
            return self._forward(x)
        torch.set_num_threads(self.threads)
        try:
            return self._forward(x)
        finally:
            torch.set_num_threads(caller)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return first_output(self.model(x)).float().to(self.blend)

    def flip(self, logits: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        return torch.flip(logits, axes)

    def begin(self, shape: tuple[int, ...]) -> None:
        self.blend = blend_device(self.device, self.out_channels, shape) if self.out_channels else torch.device("cpu")
        free = self.free_cpus() if self.free_cpus is not None else None
        if free is not None:
            self.threads = min(free, self.max_threads)

    def blend_arrays(self, channels: int, shape: tuple[int, ...], weights: np.ndarray) -> tuple[Any, Any, Any]:
        zeros = partial(torch.zeros, dtype=torch.float32, device=self.blend)
        return zeros((channels, *shape)), zeros(shape), torch.from_numpy(weights).to(self.blend)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        return array.cpu().numpy()
