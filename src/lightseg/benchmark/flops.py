"""Parameter and multiply-accumulate (MAC) counts for any model, in the two usual conventions.

Papers quote "FLOPs" that are mostly MACs counted as fvcore does: convolutions and linear
layers at one MAC per multiply-add (transposed convolutions per *input* voxel), plus the
normalisation layers at 5 operations per element (4 without affine parameters; eval-mode
BatchNorm at 2, or 1), and nothing for activations, pooling or interpolation. PyTorch's own
``torch.utils.flop_counter.FlopCounterMode`` counts the same convolutions and matrix products
(attention included) at 2 FLOPs per MAC and leaves normalisation out. :func:`count_macs`
reports both from one pass: ``conv_linear_macs`` (= FlopCounterMode's FLOPs / 2),
``norm_macs`` (fvcore's normalisation rule) and ``total_paper`` (their sum).

The pass runs under ``FakeTensorMode``: shapes propagate, nothing is computed or allocated, so
counting a 128^3 forward takes well under a second. Counts are for one forward in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward: conv/linear/matmul MACs, normalisation MACs, and per-module counts
    (keyed by the submodule's dotted name, ``""`` for the whole model)."""

    conv_linear_macs: int
    norm_macs: int
    per_module: Mapping[str, "MacCount"] = field(default_factory=dict, repr=False, compare=False)

    @property
    def total_paper(self) -> int:
        """The papers' (fvcore) convention: conv/linear MACs plus normalisation."""
        return self.conv_linear_macs + self.norm_macs

    @property
    def flop_counter_flops(self) -> int:
        """What ``FlopCounterMode`` reports: 2 FLOPs per conv/linear MAC, no normalisation."""
        return 2 * self.conv_linear_macs


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _norm(per_element_affine: int, per_element_plain: int, weight_index: int = 1):
    """A FlopCounterMode formula counting ``per_element`` MACs per input element, doubled so
    that every entry of the counter is in FLOPs (2 x MAC)."""

    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        affine = len(args) > weight_index and args[weight_index] is not None
        return 2 * _numel(args[0]) * (per_element_affine if affine else per_element_plain)

    return formula


_NORM_FORMULAS = {
    aten.native_group_norm: _norm(5, 4),
    aten.native_layer_norm: _norm(5, 4, weight_index=2),
    aten._native_batch_norm_legit: _norm(5, 4),
    aten._native_batch_norm_legit_no_training: _norm(2, 1),
}


def _is_norm(op: Any) -> bool:
    return getattr(op, "overloadpacket", op) in _NORM_FORMULAS


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> MacCount:
    """Count the MACs of ``model(torch.zeros(input_shape))`` in eval mode, without computing it.

    Works for any module whose forward runs on fake tensors (no ``.item()`` or data-dependent
    shapes); the model's train/eval mode is restored afterwards.
    """
    device = next(model.parameters(), torch.empty(0)).device
    counter = FlopCounterMode(display=False, custom_mapping=_NORM_FORMULAS)
    was_training = model.training
    model.eval()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            x = torch.empty(tuple(input_shape), device=device)
            with counter:
                model(x)
    finally:
        model.train(was_training)
    root = type(model).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name != "Global" and name != root and not name.startswith(root + "."):
            continue
        norm = sum(v for op, v in ops.items() if _is_norm(op)) // 2
        conv = sum(v for op, v in ops.items() if not _is_norm(op)) // 2
        key = "" if name in ("Global", root) else name[len(root) + 1 :]
        per_module[key] = MacCount(conv, norm)
    whole = per_module.get("", MacCount(0, 0))
    return MacCount(whole.conv_linear_macs, whole.norm_macs, per_module)
