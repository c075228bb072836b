"""The memory format each model trains in, and the model prepared for training in it.

Why: the layout decides which kernels PyTorch's CPU backward takes. LightMedSeg's depthwise and
grouped 3D convs fall onto slow backward paths in the contiguous format, so its training step at
2x1x64^3 ran 1.66x faster in ``channels_last_3d`` (3.10 s against 1.87 s, AMD EPYC Zen 3, 2
threads), while MONAI's UNet, whose convs are dense, ran 1.08x slower in it (docs/training.md,
"Training speed").

How: a per-model table measured on the CPU (:data:`TRAINING_CHANNELS_LAST`, by registry name),
not a measurement when training starts. A few timed steps at the run's patch size would cost
seconds to minutes before the first real step, and on a shared machine they swing by up to 3x,
so two runs of the same config could pick different layouts and so different float rounding.
A model the table does not name trains contiguous: the layout is a gain only where measured,
and it is not one for every model (PSP-Seg-S trained 1.59x slower in it). Models with batch norm
(LUnet, the lightseg U-Net) stay contiguous even where faster: PyTorch's channels_last CPU batch
norm sums in one float pass, and their gradients moved by up to 4 % of the largest one, not by
float rounding. On CUDA no measurement backs either layout, so the model's CUDA preference holds
(:func:`lightseg.device.prefers_channels_last`, contiguous by default). In the chosen layout the
gradients are the contiguous format's to float rounding for every registered model
(tests/test_training_memory_format.py).

The model's parameters are moved to the layout and a forward pre-hook moves its input, so the
trainer, its DDP wrapper, validation and the callbacks call the model as before, and state
dicts are unchanged (tensors keep their values; only strides differ).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lightseg.accel.training_convs import use_training_convs
from lightseg.accel.training_lightmedseg import use_training_blocks
from lightseg.accel.training_norms import use_training_norms
from lightseg.device import is_cuda, prefers_channels_last

# Training step (forward, cross-entropy, backward, AdamW) at 2x1x64^3, time in channels_last_3d /
# contiguous, medians of 3 interleaved steps, AMD EPYC Zen 3 (AVX2), 2 threads, 2026-12-03:
# lightmedseg 0.73 (load 1.5; 0.60 in an earlier quiet run), lunet 0.65 (batch norm: kept
# contiguous, see above), monai_unet 0.96 (1.08 quiet), plainunet 0.98, pspseg 1.59 (load 5-8).
TRAINING_CHANNELS_LAST: dict[str, bool] = {
    "lightmedseg": True,
    "lunet": False,
    "monai_unet": False,
    "plainunet": False,
    "pspseg": False,
}

_HOOK = "_lightseg_training_layout_hook"


def trains_channels_last(name: str, model: nn.Module, device: str | torch.device) -> bool:
    """Whether model ``name`` (its registry name) trains in ``channels_last_3d`` on ``device``."""
    if is_cuda(device):
        return prefers_channels_last(model, device)
    return TRAINING_CHANNELS_LAST.get(name, False)


def _input_to_channels_last(module: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    if isinstance(x, torch.Tensor) and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return (x, *rest)


def prepare_for_training(model: nn.Module, name: str, device: str | torch.device) -> nn.Module:
    """``model`` (in place) in its training layout (:func:`trains_channels_last`), its 5-D input
    moved to that layout on every call, and on the CPU with the faster backward of depthwise and
    few-output dense convs (:func:`lightseg.accel.training_convs.use_training_convs`) and of group
    norms on channels_last_3d maps (:func:`lightseg.accel.training_norms.use_training_norms`).
    Calling it again changes nothing.

    A 1x1x1 conv weight holds the same memory in both layouts, but ``channels_last_3d`` gives its
    unit dims other strides (C, 1, C, C, C) than the gradient PyTorch computes for it (C, 1, 1, 1,
    1); DistributedDataParallel compares the two and warned on every torchrun step ("Grad strides
    do not match bucket view strides"), copying each such gradient. Those weights keep the default
    strides, which are ``channels_last_3d``-contiguous too."""
    if not is_cuda(device):
        use_training_convs(model)
        use_training_norms(model)
        use_training_blocks(model)
    if not trains_channels_last(name, model, device):
        return model
    model.to(memory_format=torch.channels_last_3d)
    for parameter in model.parameters():  # 1x1x1 conv weights: one memory in both layouts (docstring)
        if parameter.dim() == 5 and parameter.shape[2:] == (1, 1, 1):
            parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)
    if not hasattr(model, _HOOK):
        setattr(model, _HOOK, model.register_forward_pre_hook(_input_to_channels_last))
    return model
