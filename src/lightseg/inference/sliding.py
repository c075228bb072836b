"""PyTorch sliding-window logits with optional mirror test-time augmentation.

MONAI's ``sliding_window_inference`` does the tiling and blending, with every default set
explicitly: Gaussian importance weights (sigma = 0.125 x tile size, nnU-Net's), overlap
``1 - step``, constant zero padding for scans smaller than a tile. Tiles run on the compute
device in the run's precision; they are blended there too when the blended volume fits
(:func:`lightseg.device.blend_device`: one device-to-host copy per scan, not one per tile),
else on the CPU, so GPU memory need not grow with the scan.
Mirror TTA (nnU-Net's) averages the logits of all 2^3 flips of each tile over the three
spatial axes: 8x the network time.

Logits to labels and probabilities (torch-free, shared with the ONNX Runtime backend) live in
:mod:`lightseg.inference.window` and are re-exported here.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference

from lightseg.device import autocast, blend_device
from lightseg.inference import window
from lightseg.inference.window import logits_to_labels, logits_to_probabilities, mirror_axes
from lightseg.models.registry import first_output

__all__ = ["StageTimer", "logits_to_labels", "logits_to_probabilities", "sliding_window_logits"]


class StageTimer(window.StageTimer):
    """Seconds per stage; waits for ``device`` (CUDA) at both ends of a stage so the split is honest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        super().__init__(partial(torch.cuda.synchronize, device) if device.type == "cuda" else None)


def sliding_window_logits(
    model: nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    step: float = 0.5,
    tta: bool = False,
    batch_tiles: int = 1,
    device: torch.device = torch.device("cpu"),
    timer: window.StageTimer | None = None,
    channels_last: bool = False,
    precision: str = "fp32",
    out_channels: int | None = None,
) -> torch.Tensor:
    """Blended float32 logits ``(K, X, Y, Z)`` on the CPU for a preprocessed ``(C, X, Y, Z)`` image.

    ``step`` is the tile stride as a fraction of the tile (nnU-Net's ``tile_step_size``).
    ``channels_last`` feeds tiles in ``channels_last_3d`` memory format (pair it with a model
    converted the same way). ``precision``: the network's autocast (``fp32``, ``fp16``, ``bf16``);
    blending is float32 always, on the GPU when ``out_channels`` (the model's) is given and the
    blended volume fits (else on the CPU). Network time goes to ``timer``'s "network" stage; the
    rest of the call is tiling and blending.
    """
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    flips = mirror_axes(tta)
    timer = timer or StageTimer(device)

    def network(tiles: torch.Tensor) -> torch.Tensor:
        with timer.stage("network"), autocast(device, precision):
            total = None
            if channels_last:
                tiles = tiles.contiguous(memory_format=torch.channels_last_3d)
            for axes in flips:
                x = torch.flip(tiles, axes) if axes else tiles
                y = first_output(model(x)).float()
                y = torch.flip(y, axes) if axes else y
                total = y if total is None else total.add_(y)
            return total.div_(len(flips))

    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    blend = blend_device(device, out_channels, image.shape[1:]) if out_channels else torch.device("cpu")
    with torch.no_grad():  # not inference_mode: the caller converts the logits in place
        logits = sliding_window_inference(
            inputs,
            roi_size=tuple(int(p) for p in patch_size),
            sw_batch_size=int(batch_tiles),
            predictor=network,
            overlap=1.0 - float(step),
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=0.0,
            sw_device=device,
            device=blend,
            progress=False,
            roi_weight_map=None,
            process_fn=None,
            buffer_steps=None,
            buffer_dim=-1,
            with_coord=False,
        )
    return logits[0].cpu()
