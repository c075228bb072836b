"""Channel surgery for the U-Net family: take output channels out of a conv unit for good.

A conv unit is a 3x3x3 conv with its norm and activation (:func:`lightseg.models.lunet.conv_units`).
Removing its output channels slices the conv's filters and bias, the norm's affine parameters
and running statistics, and the matching input channels of every conv that reads the unit: the
next unit, the first decoder unit of its level when the unit ends an encoder level (the skip
leads the concatenation, so its channels come first there), the transposed conv after the
bottleneck or a decoder level, and the head. The network is then physically smaller; for
:class:`~lightseg.models.lunet.UNet3D` its ``architecture()`` names the new widths and rebuilds
the same shape (``architecture.json``).

Works on every network built like ``unet``/``lunet`` (``encoders``, ``ups``, ``decoders``,
``head``) or like ``plainunet`` (``heads`` instead of ``head``, strided convs instead of pooling).
The transposed convs are not narrowed: STAMP prunes conv filters only and removes just the
inputs of the transposed conv that reads them (lunet spec 2.1, step 3).

Unlike STAMP's ``prune_unet.py``, which copies only the batch norm's weight and starts its bias
and running statistics afresh, every surviving value is kept, so a removed channel that
contributed nothing leaves the outputs unchanged (``tests/test_surgery.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from lightseg.errors import ModelError
from lightseg.models.lunet import conv_units

NORMS = (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)


def _units(block: nn.Module) -> list[nn.Module]:
    """A block's conv units in order (a block may be one unit itself)."""
    return [block] if isinstance(block[0], nn.Conv3d) else list(block)


def channel_readers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """For every conv unit, the convs whose input starts with its output channels."""
    if not all(isinstance(getattr(model, name, None), nn.ModuleList) for name in ("encoders", "ups", "decoders")):
        raise ModelError(f"channel pruning needs a U-Net of the unet/lunet/plainunet family, not {type(model).__name__}")
    name_of = {id(unit): name for name, unit in conv_units(model).items()}
    readers: dict[str, list[nn.Module]] = {}

    def chain(units: list[nn.Module], after: list[nn.Module]) -> None:
        for unit, reader in zip(units, units[1:]):
            readers[name_of[id(unit)]] = [reader[0]]
        readers[name_of[id(units[-1])]] = after

    encoders, decoders = [_units(e) for e in model.encoders], [_units(d) for d in model.decoders]
    for level, units in enumerate(encoders):
        below = len(encoders) - 2 - level  # the decoder reading this level's skip
        chain(units, [model.ups[0]] if below < 0 else [encoders[level + 1][0][0], decoders[below][0][0]])
    if isinstance(getattr(model, "head", None), nn.Sequential):  # unet/lunet: a conv unit, then the 1x1x1 conv
        heads: dict[int, nn.Module] = {len(decoders) - 1: model.head[0][0]}
        chain([model.head[0]], [model.head[1]])
    else:  # plainunet: one 1x1x1 head per decoder level under deep supervision, else one at the end
        heads = dict(enumerate(model.heads)) if len(model.heads) == len(decoders) else {len(decoders) - 1: model.heads[0]}
    for i, units in enumerate(decoders):
        chain(units, ([model.ups[i + 1]] if i + 1 < len(decoders) else []) + ([heads[i]] if i in heads else []))
    return readers


def _select(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Keep ``keep`` along ``dim`` of a parameter or buffer (absent ones are skipped)."""
    value = getattr(module, name, None)
    if value is None:
        return
    sliced = value.detach().index_select(dim, keep.to(value.device)).clone()
    setattr(module, name, nn.Parameter(sliced, requires_grad=value.requires_grad) if isinstance(value, nn.Parameter) else sliced)


def remove_channels(model: nn.Module, unit_name: str, channels: Sequence[int]) -> None:
    """Take output ``channels`` (indices in the unit's current numbering) out of conv unit
    ``unit_name`` and the matching inputs out of its readers, in place.

    The model's parameters become new tensors: build a new optimizer afterwards.
    """
    units = conv_units(model)
    if unit_name not in units:
        raise ModelError(f"no conv unit {unit_name!r}; the model has {list(units)}")
    unit = units[unit_name]
    conv = unit[0]
    width = conv.out_channels
    drop = sorted({int(c) for c in channels})
    if not drop or drop[0] < 0 or drop[-1] >= width or len(drop) >= width:
        raise ModelError(f"{unit_name}: cannot remove channels {drop} of {width}; at least one must stay")
    keep = torch.tensor([c for c in range(width) if c not in drop], dtype=torch.long)
    _select(conv, "weight", 0, keep)
    _select(conv, "bias", 0, keep)
    conv.out_channels = len(keep)
    for norm in (m for m in unit if isinstance(m, NORMS)):
        if isinstance(norm, nn.GroupNorm):
            if norm.num_groups != norm.num_channels:
                raise ModelError(f"{unit_name}: a group norm of {norm.num_groups} groups over {norm.num_channels} channels cannot lose single channels")
            norm.num_groups = norm.num_channels = len(keep)
        else:
            norm.num_features = len(keep)
        for name in ("weight", "bias", "running_mean", "running_var"):
            _select(norm, name, 0, keep)
    for reader in channel_readers(model)[unit_name]:
        dim = 0 if isinstance(reader, nn.ConvTranspose3d) else 1  # transposed weights are (in, out, k...)
        total = reader.weight.shape[dim]
        _select(reader, "weight", dim, torch.cat([keep, torch.arange(width, total)]))
        reader.in_channels = total - len(drop)
