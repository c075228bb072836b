"""How a layer gets its training form: its class swapped for a subclass with a mixin in front.

Shared by :mod:`lightseg.accel.training_convs`, :mod:`lightseg.accel.training_norms` and
:mod:`lightseg.accel.training_lightmedseg`. The subclass is made once per (layer class, mixin) and
named after the layer; its module's name starts with ``lightseg.accel.training_``, which is how
:func:`lightseg.accel.accelerate` finds the plain class behind a training form.
"""

from __future__ import annotations

import functools

import torch.nn as nn


@functools.cache
def training_class(base: type, mixin: type) -> type:
    """``base`` with ``mixin`` in front (the mixin's ``forward`` first), made once."""
    return type(f"Training{base.__name__}", (mixin, base), {"__doc__": base.__doc__})


def swap_classes(model: nn.Module, mixins: dict[type, type]) -> nn.Module:
    """``model`` (in place) with every module that is an instance of a key of ``mixins`` given that
    key's mixin; a module that already has one of the mixins is left alone, so calling it again
    changes nothing."""
    for module in model.modules():
        if isinstance(module, tuple(mixins.values())):
            continue
        for plain, mixin in mixins.items():
            if isinstance(module, plain):
                module.__class__ = training_class(type(module), mixin)
                break
    return model
