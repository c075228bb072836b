"""LightMedSeg's CPU inference forms, swapped in by :func:`lightseg.accel.accelerate`.

Each class subclasses the plain module of :mod:`lightseg.models.lightmedseg` or
:mod:`lightseg.models.blocks` and overrides only how it computes, never its parameters: the
paper's equations stay in those modules, this one holds their faster equivalents (same outputs to
float rounding, tests/test_accel.py):

* the decoder's squeeze-excitation scales are folded into the next convs' weights
  (:func:`lightseg.accel.layers.folds_scales`) instead of multiplied into 8-64 channel maps;
* Eqs. (14)-(15) as ``P = offset + slope * g`` (:func:`position_terms`), and the decoder input
  (position bias, skip resizing, concatenation, SE means) in one fused pass;
* norm + SiLU and the decoder's three-branch gate in fused kernels; the ghost conv's cheap half;
* the LSPM's experts as two convs mixed in one pass (:class:`FastLSPM`), an encoder stage's blend
  and its SE means in one pass (:class:`FastEncoderStage`);
* the skip router's 1x1 convs composed: per encoder map one conv to the controller's hidden width
  and one to the decoder width, no 256-channel concatenation (:meth:`FastSkipPaths.routed_skip`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from lightseg.accel import native
from lightseg.accel.layers import (
    FastConvTranspose3d, folds_scales, gated_silu_sum, norm_silu, pointwise, takes_narrow_kernel, takes_up_kernel,
)
from lightseg.models.blocks import ConvNormAct, GhostConv3d
from lightseg.models.lightmedseg import (
    LSPM, DecoderStage, EncoderStage, LightMedSeg, SkipPaths, position_ramp, resize, weighted_sum,
)


class FastConvNormAct(ConvNormAct):
    """:class:`ConvNormAct` with the norm and SiLU in one pass where the kernels apply, and
    ``in_scale`` (:mod:`lightseg.accel.layers`)."""

    def pre_norm(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The conv's output, before ``norm`` and SiLU (for :func:`gated_silu_sum`)."""
        return self.conv(x, in_scale)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        return norm_silu(self.pre_norm(x, in_scale), self.norm)


class FastGhostConv3d(GhostConv3d):
    """:class:`GhostConv3d` with the cheap half and the concatenation in one kernel pass where it
    applies, the norm and SiLU fused, and ``in_scale``."""

    def pre_norm(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Both halves, before ``norm`` and SiLU (for :func:`gated_silu_sum`)."""
        return self.ghosts(self.primary(x, in_scale))

    def ghosts(self, primary: torch.Tensor) -> torch.Tensor:
        """The primary half and the cheap half made from it: for a half of 4 to 32 channels in one
        pass (:func:`lightseg.accel.native.ghost_expand`; 7.1 ms against 16.3 ms for oneDNN's
        depthwise conv and the concatenation at 1x4x128^3), else PyTorch's conv and concatenation."""
        if primary.shape[1] in native.GHOST_CHANNELS and native.applies(primary):
            return native.ghost_expand(primary, self.cheap.weight)
        return torch.cat([primary, self.cheap(primary)], dim=1)

    def forward(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        return norm_silu(self.pre_norm(x, in_scale), self.norm)


class FastLSPM(LSPM):
    """:class:`LSPM` with Eq. (5)'s two experts as two convs whose maps are dense, so the softmax
    gate mixes them in one pass (:func:`softmax_mix`) instead of a softmax, two products and a sum
    over strided halves of one 16-channel map; and Eq. (2)'s difference taken in place."""

    def forward(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        texture = torch.sigmoid(self.texture(self.smooth(f0).sub_(f0).abs_()))  # (2)-(3): |F0 - DW(F0)|
        logits = self.mix(self.gate(f0))  # (4)
        c = self.experts.out_channels // 2
        weight, bias = self.experts.weight.flatten(1), self.experts.bias
        experts = [pointwise(f0, weight[k * c : (k + 1) * c], bias[k * c : (k + 1) * c]) for k in range(2)]
        return texture, softmax_mix(logits, experts)  # (5)


class FastEncoderStage(EncoderStage):
    """:class:`EncoderStage` with Eq. (9)'s blend and Eq. (10)'s channel means in one pass
    (:func:`lightseg.accel.native.texture_blend`; a difference, a product, a sum and a mean in
    PyTorch) and the SE scale applied in place."""

    def forward(self, x: torch.Tensor, texture: torch.Tensor | None, anchors: torch.Tensor | None) -> torch.Tensor:
        detail, smooth = self.paths(x, anchors)  # (6)-(8)
        if texture is not None:
            texture = resize(texture, detail.shape[2:])
            if native.applies(smooth, detail, texture):
                z, pooled = native.texture_blend(smooth, detail, texture)  # (9)
                return z.mul_(self.se.scale(pooled)[:, :, None, None, None])  # (10)
        return self.se(self.mix(detail, smooth, texture))


class FastSkipPaths(SkipPaths):
    """:class:`SkipPaths` with the routed skips' 1x1 convs composed (:meth:`routed_skip`)."""

    def routed_skips(self, feats: Sequence[torch.Tensor], targets: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return [
            self.routed_skip(feats, size, self.controllers[d % len(self.controllers)], self.out[d])
            for d, size in enumerate(targets)
        ]

    def routed_skip(
        self, feats: Sequence[torch.Tensor], size: Sequence[int], controller: nn.Sequential, out: nn.Conv3d
    ) -> torch.Tensor:
        """Eqs. (11)-(13) and the output conv for one target ``size``, from per-map composed convs.

        The projection ``P_i`` of map ``E_i``, the controller's first conv (its slice ``H_i`` for
        map i) and the output conv ``O`` are 1x1 convs; 1x1 convs compose, commute with trilinear
        resizing (both linear, and resizing keeps constants), and the softmax weights ``a_i`` sum to
        one. So the controller's input ``sum_i H_i r_i`` is a sum of ``H_i P_i`` convs of the maps
        and the skip ``O sum_i a_i r_i + o`` is ``sum_i a_i (O P_i E_i + O p_i + o)``: per map one
        conv to the hidden width and one to the decoder width, straight from ``E_i`` (resized first
        where it is larger than the target, else its outputs resized). No concatenation of the
        four 64-channel maps and no mixing at 64 channels: at 1x4x128^3 the skips took 35.5 ms,
        now 22.2 (docs/models.md); same outputs to float rounding."""
        hidden_conv, activation, logits_conv = controller
        width = self.project[0].out_channels
        o = out.weight.flatten(1)
        hidden, parts = None, []
        for i, (project, e) in enumerate(zip(self.project, feats)):
            p, pb = project.weight.flatten(1), project.bias
            h = hidden_conv.weight.flatten(1)[:, i * width : (i + 1) * width]
            hb = h @ pb + (hidden_conv.bias if i == 0 else 0)
            larger = math.prod(e.shape[2:]) > math.prod(size)
            source = resize(e, size) if larger else e
            maps = [pointwise(source, h @ p, hb), pointwise(source, o @ p, o @ pb + out.bias)]
            if not larger:
                maps = [resize(m, size) for m in maps]
            hidden = maps[0] if hidden is None else hidden.add_(maps[0])
            parts.append(maps[1])
        logits = logits_conv(activation(hidden))
        return softmax_mix(logits, parts)


def softmax_mix(logits: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``weighted_sum(softmax(logits, 1), maps)`` (Eqs. 5, 13, 18): one pass through the kernel where
    it applies (:func:`lightseg.accel.native.softmax_weighted_sum`), else PyTorch's ops."""
    if len(maps) <= native.MAX_MAPS and maps[0].shape[1] % 8 == 0 and native.applies(logits, *maps):
        return native.softmax_weighted_sum(logits, maps)
    return weighted_sum(torch.softmax(logits, dim=1), maps)


def position_terms(conv: torch.nn.Conv3d, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. (14)-(15) as ``P = offset + slope * g`` per channel, ``g`` from :func:`position_ramp`:
    ``offset`` ``(B, C')`` and ``slope`` ``(C',)``.

    Eq. (14) is ``delta_k = g - s_k`` with ``s_k = a_k^D + a_k^H + a_k^W``; the 1x1 conv is linear,
    hence ``P_c = slope_c * g + offset_c`` with ``slope = W.sum(1)`` and ``offset = b - W s``. Same
    outputs (to float rounding) for ``C' * (K - 1)`` fewer MACs per voxel and no ``K x D x H x W``
    offsets (docs/models.md)."""
    weight = conv.weight.flatten(1)  # (C', K)
    return conv.bias - anchors.sum(2) @ weight.t(), weight.sum(1)


def decoder_input(
    up: nn.ConvTranspose3d, x: torch.Tensor, in_scale: torch.Tensor | None, skip: torch.Tensor,
    position: torch.nn.Conv3d | None, anchors: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. (14)-(16)'s input ``cat([u + P, skip resized to u])`` with ``u = up(x)`` (``in_scale``
    folded into ``up``), and its channel means.

    One pass through the fused kernel where it applies (the skip at ``u``'s size or half of it),
    instead of the bias's two passes, the resizing, the concatenation and two means; where ``up``
    also runs on the doubling kernel, in the same pass, ``u`` written straight into the
    concatenation (:func:`lightseg.accel.native.up_decoder_input`)."""
    biased = position is not None and anchors is not None
    terms = lambda: position_terms(position, anchors) if biased else (None, None)  # noqa: E731
    skip_size = tuple(skip.shape[2:])
    skip_fits = lambda size: skip_size == size or size == tuple(2 * n for n in skip_size)  # noqa: E731
    if (
        skip_fits(tuple(2 * n for n in x.shape[2:])) and native.applies(x, skip)
        and isinstance(up, FastConvTranspose3d) and takes_up_kernel(up, x, up.output_padding)
    ):
        return native.up_decoder_input(x, up.scaled_weight(in_scale), up.bias, skip, *terms())
    u = up(x, in_scale=in_scale)
    size = tuple(u.shape[2:])
    if skip_fits(size) and native.applies(u, skip):
        return native.decoder_input(u, skip, *terms())
    if biased:  # in place: a separate P would cost two more passes and come out contiguous
        offset, slope = position_terms(position, anchors)
        u = u.add_(offset[:, :, None, None, None]).addcmul_(slope[None, :, None, None, None], position_ramp(size, anchors))
    skip = resize(skip, size)
    # The channel means per part: PyTorch's channels_last mean over 16 channels at 128^3 is 2.8x
    # slower than two over 8.
    pooled = torch.cat([u.mean(dim=(2, 3, 4)), skip.mean(dim=(2, 3, 4))], dim=1)
    return torch.cat([u, skip], dim=1), pooled


class FastDecoderStage(DecoderStage):
    """:class:`DecoderStage` computed through :meth:`folded`."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor, anchors: torch.Tensor | None) -> torch.Tensor:
        y, scale = self.folded(x, skip, anchors)
        return y if scale is None else y * scale[:, :, None, None, None]

    def folded(
        self, x: torch.Tensor, skip: torch.Tensor, anchors: torch.Tensor | None, in_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(y, scale)``: where :func:`folds_scales` allows, the SE scales are not multiplied into
        the maps but folded into the next convs' weights: ``scale`` is the output SE's, for the
        next stage (``in_scale``) or the head; otherwise it is applied and ``None``."""
        f, pooled = decoder_input(self.up, x, in_scale, skip, self.position, anchors)  # (14)-(16)
        scale = self.se_in.scale(pooled)  # (16)
        fold = folds_scales(f)
        if not fold:
            f, scale = f * scale[:, :, None, None, None], None
        logits, maps = self.branch_maps(f, scale)
        del f  # free before the gate's output is allocated, which then reuses it (128 MB at 1x4x128^3)
        branches = [(m, unit.norm) for m, unit in zip(maps, (self.grouped, self.conv, self.pointwise))]
        y, pooled = gated_silu_sum(logits, branches)  # (17)-(21)
        scale = self.se_out.scale(pooled)
        return (y, scale) if fold else (y * scale[:, :, None, None, None], None)

    def branch_maps(self, f: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The gate's logits and the grouped, conv-unit and 1x1 branches before their norms.

        Where the ghost conv's primary conv runs on the narrow-output kernel
        (:func:`takes_narrow_kernel`), the 1x1 branch and the gate ride along on it: they
        read the input rows it has already rearranged instead of the whole 16x128^3 map twice more."""
        grouped = self.grouped.pre_norm(f, scale)
        if isinstance(self.conv, FastGhostConv3d) and takes_narrow_kernel(self.conv.primary, f):
            primary, (pointwise, logits) = native.conv3x3x3_narrow(
                f, self.conv.primary.scaled_weight(scale), self.conv.primary.bias,
                [(conv.scaled_weight(scale), conv.bias) for conv in (self.pointwise.conv, self.gate)], moments=True,
            )
            return logits, [grouped, self.conv.ghosts(primary), pointwise]
        return self.gate(f, scale), [grouped, self.conv.pre_norm(f, scale), self.pointwise.pre_norm(f, scale)]


class FastLightMedSeg(LightMedSeg):
    """:class:`LightMedSeg` whose decoder hands each output SE scale on to the next conv."""

    def decode(self, deepest: torch.Tensor, skips: Sequence[torch.Tensor], anchors: torch.Tensor | None) -> torch.Tensor:
        y, scale = self.bottleneck(deepest), None
        for stage, skip in zip(self.decoder, skips):
            y, scale = stage.folded(y, skip, anchors, scale)
        return self.head(y, scale)


SWAPS = {
    ConvNormAct: FastConvNormAct,
    GhostConv3d: FastGhostConv3d,
    SkipPaths: FastSkipPaths,
    LSPM: FastLSPM,
    EncoderStage: FastEncoderStage,
    DecoderStage: FastDecoderStage,
    LightMedSeg: FastLightMedSeg,
}
"""Plain LightMedSeg module type -> its fast form (:func:`lightseg.accel.accelerate`)."""
