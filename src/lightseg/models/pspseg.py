"""PSP-Seg: a U-Net of redundant modules whose branches are pruned during training.

Li et al., *Unified Start, Personalized End: Progressive Pruning for Efficient 3D Medical Image
Segmentation* (arXiv 2509.09267); spec: ``specs/psp-seg.md`` sections 2.1-2.3.

Every inner stage is a *redundant module* (RM): parallel (PRM, default) or sequential (SRM)
light bottleneck branches with different anisotropic kernels, each scaled by a learnable gate
that starts at zero. A branch can be *masked* (skipped, reversible) or *removed* (its module and
gate deleted, so the parameter count drops). :meth:`PSPSeg.architecture` names the surviving
branches of every module; passing it back as ``architecture=`` rebuilds the pruned network, and
:meth:`PSPSeg.load_state_dict` adapts the branches to the state dict it is given, so a
checkpoint taken before a later pruning still loads.

Choices where the published code differs (docs/pspseg.md lists them):

* No 1/16-resolution head: the 5-level published nets build one that is never used (771
  parameters at 3 classes), and the 6-level one returns a fifth output the loss ignores.
* A removed branch takes its gate with it (the published code keeps the full gate vector).
* A PRM whose branches are all masked still applies its activation, ``LReLU(x)``, the same
  function as branches whose gated outputs are zero (the published code returns ``x``).
* Modules are registered in topological order (the published L net registers level 4 last).
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.errors import ModelError
from lightseg.models.blocks import instance_norm
from lightseg.models.registry import check_input, register_model

Kernel = tuple[int, int, int]

#: Kernel sets of section 2.1, one branch per kernel; index = branch id in ``architecture``.
KERNEL_SETS: dict[int, tuple[Kernel, ...]] = {
    7: ((1, 1, 1), (1, 1, 3), (1, 3, 1), (3, 1, 1), (1, 3, 3), (3, 1, 3), (3, 3, 1)),
    4: ((1, 1, 1), (1, 3, 3), (3, 1, 3), (3, 3, 1)),
    1: ((1, 1, 1),),
}

#: Section 2.3: channels per level, branch expansion, branches per RM.
SIZES: dict[str, tuple[tuple[int, ...], float, int]] = {
    "S": ((16, 32, 64, 128, 256), 0.5, 4),
    "B": ((16, 32, 64, 128, 256), 2.0, 7),
    "L": ((16, 32, 64, 128, 256, 320), 2.0, 7),
}

Architecture = dict[str, list[int]]


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.01)


class ConvBlock(nn.Module):
    """Full-resolution block, never pruned: ``x + LReLU(IN(Conv3(x)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm = instance_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _lrelu(self.norm(self.conv(x)))


class DownSample(nn.Module):
    """Residual strided block: ``LReLU(Conv1_s2(x) + IN(Conv3(LReLU(IN(Conv3_s2(x))))))``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.skip = nn.Conv3d(in_channels, out_channels, 1, stride=2)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm1 = instance_norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = instance_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _lrelu(self.skip(x) + self.norm2(self.conv2(_lrelu(self.norm1(self.conv1(x))))))


class UpSample(nn.Module):
    """Nearest-neighbour x2, then a 1x1x1 conv (no norm)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Branch(nn.Module):
    """One light bottleneck branch (LNB) with its own zero-initialised gate.

    ``gate * IN(Conv_k(LReLU(IN(Conv1(x)))))``; the gate lives here so that removing a branch
    removes its gate, and the surviving parameters stay the same objects (optimizer state
    carries over).
    """

    def __init__(self, channels: int, kernel: Kernel, expansion: float) -> None:
        super().__init__()
        hidden = int(channels * expansion)
        self.reduce = nn.Conv3d(channels, hidden, 1)
        self.norm1 = instance_norm(hidden)
        self.conv = nn.Conv3d(hidden, channels, kernel, padding=tuple(k // 2 for k in kernel))
        self.norm2 = instance_norm(channels)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate * self.norm2(self.conv(_lrelu(self.norm1(self.reduce(x)))))


class RedundantModule(nn.Module):
    """An RM (section 2.1): parallel ``LReLU(x + sum_i g_i(x))`` or sequential ``x += g_i(x)``.

    ``branches`` are kept in a ``ModuleDict`` keyed by their index in the kernel set, so state
    dict keys do not change when other branches are removed. ``masked`` holds branch ids that
    are present but skipped (the reversible half of mask-then-prune); it travels in the state
    dict (``<module>._extra_state``, an int64 tensor of ids), so every checkpoint reloads the
    network it was validated as, masks included.
    """

    def __init__(
        self, channels: int, kernels: Sequence[Kernel], expansion: float, sequential: bool, keep: Iterable[int]
    ) -> None:
        super().__init__()
        self.channels, self.kernels, self.expansion, self.sequential = channels, tuple(kernels), expansion, sequential
        self.branches = nn.ModuleDict()
        self.masked: set[int] = set()
        self.set_branches(keep)

    def present(self) -> list[int]:
        """Ids of the branches that physically exist, ascending."""
        return sorted(int(k) for k in self.branches)

    def active(self) -> list[int]:
        """Ids of the branches that take part in the forward pass (present and not masked)."""
        return [i for i in self.present() if i not in self.masked]

    def set_branches(self, keep: Iterable[int]) -> None:
        """Make exactly ``keep`` present: remove the others, build missing ones freshly initialised."""
        keep = sorted(set(int(i) for i in keep))
        if any(not 0 <= i < len(self.kernels) for i in keep):
            raise ModelError(f"branch ids {keep} out of range for a module with {len(self.kernels)} kernels")
        for key in [k for k in self.branches if int(k) not in keep]:
            del self.branches[key]
        for i in keep:
            if str(i) not in self.branches:
                self.branches[str(i)] = _init_weights(Branch(self.channels, self.kernels[i], self.expansion))
        self.branches = nn.ModuleDict({str(i): self.branches[str(i)] for i in keep})
        self.masked &= set(keep)

    def set_masked(self, ids: Iterable[int]) -> None:
        """Mask exactly ``ids``; masked branches stop requiring gradients (DDP sees no unused ones)."""
        self.masked = set(int(i) for i in ids)
        unknown = sorted(self.masked - set(self.present()))
        if unknown:
            raise ModelError(f"cannot mask branches {unknown}: present are {self.present()}")
        for i in self.present():
            self.branches[str(i)].requires_grad_(i not in self.masked)

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(sorted(self.masked), dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.set_masked(int(i) for i in state.tolist())

    def remove(self, ids: Iterable[int]) -> None:
        """Physically delete branches ``ids`` (and their gates)."""
        drop = set(int(i) for i in ids)
        self.set_branches(i for i in self.present() if i not in drop)

    def forward_with(self, x: torch.Tensor, active: Sequence[int]) -> torch.Tensor:
        """The module's output with only the ``active`` branches (the pruning search calls this)."""
        if self.sequential:
            for i in active:
                x = x + self.branches[str(i)](x)
            return x
        out = x
        for i in active:
            out = out + self.branches[str(i)](x)
        return _lrelu(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.active())


def _init_weights(module: nn.Module) -> nn.Module:
    """Kaiming-normal conv weights (LeakyReLU slope 0.01), default biases, zero gates (section 2.1)."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, a=0.01)
    return module


def parse_architecture(architecture: Mapping[str, Sequence[int]] | str) -> Architecture:
    """Accept an architecture as a dict or a JSON string; return ``{module: [branch ids]}``."""
    if isinstance(architecture, str):
        try:
            architecture = json.loads(architecture)
        except json.JSONDecodeError as exc:
            raise ModelError(f"pspseg: architecture is not valid JSON ({exc})") from exc
    if not isinstance(architecture, Mapping):
        raise ModelError(f"pspseg: architecture must map module names to branch ids, got {type(architecture).__name__}")
    for name, ids in architecture.items():
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ModelError(f"pspseg: architecture module {name!r} must list integer branch ids, got {ids!r:.60}")
    return {str(name): sorted(int(i) for i in ids) for name, ids in architecture.items()}


class PSPSeg(nn.Module):
    """The redundant U-Net of section 2.2 with additive skips and deep supervision.

    In training mode (and ``deep_supervision=True``) the forward returns ``[out, ds1, ds2, ds3]``
    at resolutions 1, 1/2, 1/4, 1/8; in eval mode only ``out``. With ``record_features`` set, a
    training forward keeps the encoder features and the stage-1 decoder features in
    ``self.features`` for the functional-decoupling loss (section 3).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        size: str = "S",
        mode: str = "parallel",
        num_branches: int | None = None,
        channels: Sequence[int] | None = None,
        deep_supervision: bool = True,
        architecture: Mapping[str, Sequence[int]] | str | None = None,
    ) -> None:
        super().__init__()
        if size not in SIZES:
            raise ModelError(f"pspseg: unknown size {size!r}; choose one of {sorted(SIZES)}")
        if mode not in ("parallel", "sequential"):
            raise ModelError(f"pspseg: mode must be 'parallel' or 'sequential', got {mode!r}")
        default_channels, expansion, default_branches = SIZES[size]
        channels = tuple(channels or default_channels)
        num_branches = num_branches or default_branches
        if num_branches not in KERNEL_SETS:
            raise ModelError(f"pspseg: num_branches must be one of {sorted(KERNEL_SETS)}, got {num_branches}")
        if len(channels) < 3:
            raise ModelError(f"pspseg: need at least 3 levels, got channels {channels}")
        kernels = KERNEL_SETS[num_branches]
        levels = len(channels)
        self.in_channels = in_channels
        self.deep_supervision = deep_supervision
        self.record_features = False
        self.features: dict[str, torch.Tensor | list[torch.Tensor]] | None = None
        self.size_divisor = (2 ** (levels - 1),) * 3
        self.min_bottleneck_voxels = 2  # the bottleneck's instance norm (registry.check_input_size)

        def rm(c: int) -> RedundantModule:
            return RedundantModule(c, kernels, expansion, mode == "sequential", range(len(kernels)))

        self.stem = nn.Conv3d(in_channels, channels[0], 1)
        self.enc0 = ConvBlock(channels[0])
        self.down = nn.ModuleList(DownSample(channels[l - 1], channels[l]) for l in range(1, levels))
        self.rms = nn.ModuleDict()
        for l in range(1, levels - 1):
            self.rms[f"enc{l}"] = rm(channels[l])
        self.rms["bottleneck"] = rm(channels[-1])
        for l in range(levels - 2, 0, -1):
            self.rms[f"dec{l}"] = rm(channels[l])
        self.up = nn.ModuleList(UpSample(channels[l + 1], channels[l]) for l in range(levels - 1))
        self.dec0 = ConvBlock(channels[0])
        self.heads = nn.ModuleList(nn.Conv3d(channels[l], num_classes, 1) for l in range(min(4, levels - 1)))
        _init_weights(self)
        if architecture is not None:
            self.set_architecture(parse_architecture(architecture))

    def architecture(self) -> Architecture:
        """``{module: [surviving branch ids]}``, JSON-ready (``architecture.json``)."""
        return {name: rm.present() for name, rm in self.rms.items()}

    def set_architecture(self, architecture: Mapping[str, Sequence[int]]) -> None:
        """Make the present branches of every named module exactly those listed."""
        unknown = sorted(set(architecture) - set(self.rms))
        if unknown:
            raise ModelError(f"pspseg: architecture names unknown modules {unknown}; known: {list(self.rms)}")
        for name, ids in architecture.items():
            self.rms[name].set_branches(ids)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load weights after matching the present branches to those in ``state_dict``.

        A state dict carries its own architecture (its branch keys), so a checkpoint saved
        before a later pruning round loads into a model built from the newer ``architecture.json``.
        Only strict loads adapt (a partial, non-strict state dict cannot tell "removed" from "absent").
        The masks come with the state dict too; one written before masks were stored has none.
        """
        if strict:
            self.set_architecture(architecture_of_state_dict(state_dict, list(self.rms)))
            empty = torch.zeros(0, dtype=torch.int64)
            state_dict = {**{f"rms.{name}._extra_state": empty for name in self.rms}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input(self, x.shape)
        skips = self.encode(x)
        h = skips[-1]
        decoded: dict[int, torch.Tensor] = {}
        for l in range(len(skips) - 2, 0, -1):
            h = self.rms[f"dec{l}"](skips[l] + self.up[l](h))
            decoded[l] = h
        out = self.heads[0](self.dec0(skips[0] + self.up[0](h)))
        if self.training and self.record_features:
            self.features = {"encoder": skips, "decoder1": decoded[1]}
        if not (self.training and self.deep_supervision):
            return out
        return [out] + [self.heads[l](decoded[l]) for l in range(1, len(self.heads))]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features ``[enc0, enc1, ..., bottleneck]`` (the FD loss's masked pass)."""
        levels = len(self.down) + 1
        skips = [self.enc0(self.stem(x))]
        for l in range(1, levels):
            name = f"enc{l}" if l < levels - 1 else "bottleneck"
            skips.append(self.rms[name](self.down[l - 1](skips[-1])))
        return skips


def architecture_of_state_dict(state_dict: Mapping[str, torch.Tensor], modules: Sequence[str]) -> Architecture:
    """Branch ids present in ``state_dict`` for each RM name (keys ``rms.<name>.branches.<id>.*``)."""
    found: Architecture = {name: [] for name in modules}
    for key in state_dict:
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "rms" and parts[2] == "branches" and parts[1] in found:
            found[parts[1]].append(int(parts[3]))
    return {name: sorted(set(ids)) for name, ids in found.items()}


@register_model(
    "pspseg",
    description="PSP-Seg: redundant U-Net (S/B/L, parallel or sequential branches) for progressive pruning",
    recipe={
        "optimizer": "sgd",
        "lr": 1e-3,
        "weight_decay": 3e-5,
        "schedule": "poly",
        "warmup_epochs": 0,
        "loss": "dice_ce",
    },
)
def build_pspseg(in_channels: int, num_classes: int, **kwargs: object) -> PSPSeg:
    """``create_model("pspseg", 1, 3, size="S", mode="parallel", architecture=None, ...)``."""
    return PSPSeg(in_channels, num_classes, **kwargs)
