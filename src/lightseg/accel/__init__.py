"""The CPU accelerator: fast equivalents of the plain models' modules, swapped in for inference.

The models in :mod:`lightseg.models` are plain PyTorch, the paper's equations once. When the
predictor loads a model for CPU inference, :func:`accelerate` replaces its modules by faster
forms that subclass them and keep their parameters, so the state dict, parameter names and
outputs (to float rounding) stay the same (tests/test_accel.py):

* every ``nn.Conv3d`` / ``nn.ConvTranspose3d``: keeps ``channels_last_3d``, oneDNN where PyTorch
  would pick its slow kernel, fused C kernels where they fit; a conv with one output and several
  inputs per group runs as a depthwise conv and a sum (:mod:`lightseg.accel.layers`);
* every ``nn.GroupNorm``: statistics accurate in ``channels_last_3d``
  (:class:`lightseg.accel.layers.AccurateGroupNorm`), whatever network it sits in (MONAI's too);
* LightMedSeg's blocks: folded SE scales, fused decoder passes (:mod:`lightseg.accel.lightmedseg`).

A layer's training form (:data:`TRAINING_FORMS`) is taken for the layer, so a copy of a training
model (training's final validation) is accelerated like the plain model (a training form with no
fast form becomes its plain class).

Training, FLOP counting and ONNX export use the plain modules: the swaps are proven equal in
outputs, not in gradients. The C kernels are :mod:`lightseg.accel.native`.

One switch: ``LIGHTSEG_ACCEL=0`` or ``off`` (``accelerate(model, enable=False)`` in code) leaves the model
plain. A plain model's ``nn.GroupNorm`` is accurate only in the contiguous layout, so a plain
model is also marked to run contiguous (``channels_last = False``, read by
:func:`lightseg.device.prefers_channels_last`): the accelerator decides layout and accurate norm
together. ``LIGHTSEG_NATIVE=0`` keeps the module swaps and turns off only the C kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lightseg.accel.layers import AccurateGroupNorm, FastConv3d, FastConvTranspose3d, GroupSumConv3d
from lightseg.environment import switch

__all__ = ["accelerate", "enabled"]


def enabled() -> bool:
    """Whether the accelerator is on: unless ``LIGHTSEG_ACCEL=0`` (or ``off``; :mod:`lightseg.environment`)."""
    return switch("LIGHTSEG_ACCEL")


TRAINING_FORMS = "lightseg.accel.training_"
"""The prefix of the modules whose classes are training forms of plain layers (e.g.
:mod:`lightseg.accel.training_convs`): each subclasses its plain layer and, without a recorded
gradient, runs that layer's own forward."""


def _plain_type(kind: type) -> type:
    """``kind``, or for a training form (:data:`TRAINING_FORMS`) the plain class it derives from, so
    that a copy of a training model is accelerated like the plain model."""
    return next(k for k in kind.__mro__ if not k.__module__.startswith(TRAINING_FORMS))


def _fast_type(module: nn.Module) -> type[nn.Module] | None:
    from lightseg.accel.lightmedseg import SWAPS  # lazily: it imports the model zoo (MONAI), slow to load

    kind = _plain_type(type(module))
    if kind is nn.Conv3d:
        return GroupSumConv3d if GroupSumConv3d.fits(module) else FastConv3d
    if kind is nn.ConvTranspose3d:
        return FastConvTranspose3d
    if kind is nn.GroupNorm:
        return AccurateGroupNorm
    return SWAPS.get(kind)


def accelerate(model: nn.Module, device: str | torch.device = "cpu", enable: bool | None = None) -> nn.Module:
    """``model`` with every module that has a fast CPU form swapped for it, in place; returned.

    Only for inference on the CPU (``device``; elsewhere the model is returned as it is). When off
    (``enable``, default :func:`enabled`) the model stays plain and, if it has group norms, is
    marked to run in the contiguous layout, where PyTorch's group norm is accurate. Swapping
    changes a module's class, not its parameters or buffers, so the state dict is unchanged."""
    if torch.device(device).type != "cpu":
        return model
    if not (enabled() if enable is None else enable):
        if any(isinstance(m, nn.GroupNorm) for m in model.modules()):
            model.channels_last = False
        return model
    for module in model.modules():
        module.__class__ = _fast_type(module) or _plain_type(type(module))  # a training form without one: its plain class
    return model
