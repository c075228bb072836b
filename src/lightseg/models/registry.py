"""The model registry: ``create_model(name, in_channels, num_classes, **kwargs)``.

Every model module registers its builders with :func:`register_model`. A built model carries
``size_divisor`` (a tuple of three ints): every spatial input size must be a multiple of it. A
model whose deepest feature map goes through instance norm also sets
``min_bottleneck_voxels = 2``: instance norm needs more than one voxel to normalise, so a size
equal to the divisor on every axis (a 1-voxel bottleneck) fails inside torch. Other models keep
the default 1 (group norm, or no norm, run on one voxel). Batch norm runs on one voxel per
sample too, but in training it needs at least 2 values per channel across the batch, so a
1-voxel bottleneck needs a batch of 2. :func:`check_input_size` turns a bad size (given the
batch, for training) into a :class:`ModelError` that names a legal size, instead of an error
deep inside the network.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from lightseg.errors import ModelError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, a one-line description and its training recipe.

    ``recipe`` holds the trainer defaults the model's paper recommends (keys understood by the
    trainer's config, for example ``optimizer``, ``lr``, ``weight_decay``, ``schedule``).
    """

    name: str
    builder: Builder
    description: str
    recipe: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, recipe: dict[str, Any] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(in_channels, num_classes, **kwargs) -> nn.Module`` as ``name``."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, description, dict(recipe or {}))
        return builder

    return decorate


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered model (plain PyTorch; :func:`lightseg.accel.accelerate` makes it fast
    for CPU inference); unknown names or arguments are a :class:`ModelError`."""
    entry = model_entry(name)
    for what, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ModelError(f"model {name!r}: {what} must be a whole number >= 1, got {value!r}")
    try:
        model = entry.builder(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # ValueError: a value of the wrong type, e.g. {"width": "x"}
        raise ModelError(f"model {name!r}: invalid arguments {sorted(kwargs)} ({exc})") from exc
    if not hasattr(model, "size_divisor"):
        raise ModelError(f"model {name!r} does not declare size_divisor (a bug in its module)")
    return model


def check_input_size(model: nn.Module, spatial_shape: Sequence[int], training_batch: int | None = None) -> None:
    """Raise :class:`ModelError` if ``spatial_shape`` is not a multiple of ``model.size_divisor``
    or leaves fewer than ``model.min_bottleneck_voxels`` (default 1) voxels at the bottleneck, or,
    for a model with batch norm trained on batches of ``training_batch``, fewer than 2 values per
    channel at the bottleneck across the batch."""
    divisor = tuple(getattr(model, "size_divisor"))
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != len(divisor) or any(s % d for s, d in zip(shape, divisor)):
        legal = tuple(max(d, round(s / d) * d) for s, d in zip(shape, divisor))
        raise ModelError(
            f"{type(model).__name__}: input size {shape} is not a multiple of {divisor}; "
            f"use a multiple such as {legal}"
        )
    needed = int(getattr(model, "min_bottleneck_voxels", 1))
    bottleneck = math.prod(s // d for s, d in zip(shape, divisor))
    if bottleneck < needed:
        grown = [max(s, d) for s, d in zip(shape, divisor)]
        grown[-1] *= math.ceil(needed / math.prod(s // d for s, d in zip(grown, divisor)))
        legal = tuple(grown)
        raise ModelError(
            f"{type(model).__name__}: input size {shape} leaves {bottleneck} voxel(s) at the bottleneck (size divisor "
            f"{divisor}), but its instance norm needs at least {needed}; the smallest legal size is {legal} "
            "(or the same with another axis enlarged instead)"
        )
    batch_norm = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    if training_batch is not None and batch_norm and training_batch * bottleneck < 2:
        grown = list(shape)
        grown[-1] *= 2
        raise ModelError(
            f"{type(model).__name__}: a training batch of {training_batch} patch of {shape} leaves 1 value per "
            f"channel at the bottleneck (size divisor {divisor}), but its batch norm needs at least 2 in training; "
            f"train with a batch of 2 or more (--batch 2) or a larger patch such as {tuple(grown)}"
        )


def check_input(model: nn.Module, shape: Sequence[int]) -> None:
    """Raise :class:`ModelError` unless ``shape`` is ``(N, model.in_channels, *legal spatial size)``.

    Models call this first in ``forward``, so a wrong channel count or size is named in plain
    words instead of surfacing as a shape mismatch deep inside the network. A model without an
    ``in_channels`` attribute gets only the size check.
    """
    shape = tuple(int(s) for s in shape)
    name = type(model).__name__
    if len(shape) != 2 + len(tuple(getattr(model, "size_divisor"))):
        raise ModelError(f"{name}: expected an input of shape (N, C, X, Y, Z), got {shape}")
    expected = getattr(model, "in_channels", None)
    if expected is not None and shape[1] != expected:
        raise ModelError(
            f"{name}: input has {shape[1]} channels but the model was built for {expected}; "
            f"pass {expected}-channel images or build the model with in_channels={shape[1]}"
        )
    check_input_size(model, shape[2:])


def first_output(outputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-resolution output of a (possibly deep-supervised) network: a model in training
    mode may return one logits tensor per decoder level, the first at full resolution."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]
