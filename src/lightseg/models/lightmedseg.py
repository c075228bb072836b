"""LightMedSeg: lightweight 3D segmentation with learned spatial anchors (Tyagi et al., 2026).

Built from ``specs/lightmedseg.md`` sections 2-3; the paper's equation numbers are in the
comments. Data flow at 4x128^3 (spec 2): a stride-2 GhostConv3D stem (8x64^3); a global anchor
detector reading the raw input (K normalised (d, h, w) anchors); the LSPM (texture map T and a
mixed stem feature); four encoder stages (8, 16, 32, 64 channels, max-pooling after 1-3) with
anchor FiLM, texture-guided detail/smooth blending and SE; a learned skip router; four decoder
stages (64, 32, 16, 8 channels), each upsampling x2 with a 3x3x3 transposed conv, adding an
anchor position bias and mixing three branches with a per-voxel gate; a 1x1x1 head.

Defaults reproduce the spec's totals for 4 input channels and 4 classes: 476,446 parameters
(``variant="ghost"``), 657,562 (``variant="standard"``), 14.65 GMAC at 1x4x128^3.

Confidence tags as in the spec: [S] stated, [F] forced by the budgets, [I] inferred, [G] guess.
Guesses exposed as arguments: ``lspm_kernel`` (5) and ``lspm_hidden`` (16) [G], ``detail_kernel``
(5) [I], ``se_divisor`` (8) [I], ``shared_controller`` (True) [I]. Fixed guesses: SiLU after GN
in GhostConv3D and after the decoder branches 1 and 3 [G]; FiLM as ``(1 + gamma) * G + beta``
[G]; position offsets normalised by ``(N - 1)`` [G]; trilinear resizing with
``align_corners=False`` (ours; the spec does not say).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightseg.errors import ModelError
from lightseg.models.blocks import ConvBlock, ConvNormAct, GhostConv3d, SqueezeExcite, standard_conv3d
from lightseg.models.registry import check_input, register_model

Variant = Literal["ghost", "standard"]

# Spec 5: AdamW (0.9, 0.999), cosine after a warm-up [S]; the values were stripped, these are
# the spec's proposed defaults [G].
_RECIPE = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "warmup_epochs": 5,
    "loss": "lightmedseg",
}


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling to ``size`` (``align_corners=False``); a no-op when it already fits."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)


def position_ramp(size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``g(i, j, l) = i/(D-1) + j/(H-1) + l/(W-1)`` as a ``(1, 1, D, H, W)`` tensor, summed from three
    per-axis ramps by broadcasting. The voxel index is normalised by ``N - 1`` to share the
    anchors' [0, 1] range [G]."""
    terms = []
    for axis, n in enumerate(size):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = n
        terms.append((torch.arange(n, device=like.device, dtype=like.dtype) / max(n - 1, 1)).view(shape))
    return terms[0] + terms[1] + terms[2]


def weighted_sum(weights: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k weights[:, k] * maps[k]``: per-voxel softmax weights ``(B, K, D, H, W)`` over ``K``
    maps (Eqs. 5, 13 and 18)."""
    total = weights[:, 0:1] * maps[0]
    for k in range(1, len(maps)):
        total = total + weights[:, k : k + 1] * maps[k]
    return total


def anchor_offsets(anchors: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Eq. (14): ``delta_k = (i/(D-1) - a_k^D) + (j/(H-1) - a_k^H) + (l/(W-1) - a_k^W)`` for every
    anchor, ``(B, K, D, H, W)``; the per-axis differences sum to :func:`position_ramp` minus the
    anchor's coordinate sum, so no ``3 x K x D x H x W`` tensor is formed."""
    return position_ramp(size, anchors) - anchors.sum(2)[:, :, None, None, None]


class AnchorDetector(nn.Module):
    """Global anchor detector, Eq. (1), spec 3.2: three stride-2 conv units on the raw input,
    global average pooling, a two-layer MLP and a sigmoid give K anchors in [0, 1]^3.
    8,640 parameters for 4 input channels and K = 8."""

    def __init__(self, in_channels: int, num_anchors: int, width: int = 8, hidden: int = 128) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.features = nn.Sequential(
            ConvNormAct(in_channels, width, 3, stride=2),
            ConvNormAct(width, width, 3, stride=2),
            ConvNormAct(width, width, 3, stride=2),
        )
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, 3 * num_anchors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3, 4))
        return torch.sigmoid(self.fc2(F.silu(self.fc1(h)))).view(-1, self.num_anchors, 3)


class LSPM(nn.Module):
    """Local Structural Prior Module, Eqs. (2)-(5), spec 3.3. Returns ``(T, F0')``.

    Texture ``T = sigmoid(Conv1x1(|F0 - DWConv_k(F0)|))`` (k = 5 [G]); a gate from two 3x3x3
    convs (hidden width 16 [G]) gives per-voxel softmax weights for two 1x1x1 experts, computed
    as one conv with twice the channels (same parameters as two). 5,102 parameters at 8 channels.
    """

    def __init__(self, channels: int, texture_kernel: int = 5, hidden: int = 16) -> None:
        super().__init__()
        self.smooth = nn.Conv3d(channels, channels, texture_kernel, padding=texture_kernel // 2, groups=channels)
        self.texture = nn.Conv3d(channels, 1, 1)
        self.gate = nn.Sequential(ConvNormAct(channels, hidden, 3), nn.Conv3d(hidden, 1, 3, padding=1), nn.Sigmoid())
        self.mix = nn.Conv3d(1, 2, 1)
        self.experts = nn.Conv3d(channels, 2 * channels, 1)

    def forward(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        texture = torch.sigmoid(self.texture(torch.abs(f0 - self.smooth(f0))))  # (2)-(3)
        alpha = torch.softmax(self.mix(self.gate(f0)), dim=1)  # (4)
        return texture, weighted_sum(alpha, self.experts(f0).chunk(2, dim=1))  # (5)


class EncoderStage(nn.Module):
    """Encoder stage, Eqs. (6)-(10), spec 3.4: conv unit, anchor FiLM, texture-guided blend of a
    depthwise detail path and a 1x1 smooth path, then SE. The two FiLM projections (gamma, beta)
    are one linear layer with twice the outputs (same parameters). Without a texture map
    (``use_lspm`` off, spec 3.8) the two paths are averaged."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        conv_block: ConvBlock,
        num_anchors: int,
        detail_kernel: int = 5,
        se_divisor: int = 8,
    ) -> None:
        super().__init__()
        self.conv = conv_block(in_channels, out_channels, 1)
        self.film = nn.Linear(3 * num_anchors, 2 * out_channels) if num_anchors else None
        self.detail = ConvNormAct(out_channels, out_channels, detail_kernel, groups=out_channels)
        self.smooth = nn.Conv3d(out_channels, out_channels, 1)
        self.se = SqueezeExcite(out_channels, se_divisor)

    def paths(self, x: torch.Tensor, anchors: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. (6)-(8): the conv unit, the anchor FiLM, then the detail and smooth paths."""
        f = self.conv(x)
        if self.film is not None and anchors is not None:
            gamma, beta = self.film(anchors.flatten(1))[:, :, None, None, None].chunk(2, dim=1)
            f = torch.addcmul(beta, f, 1 + gamma)  # (6) as (1 + gamma) * G + beta [G]
        return self.detail(f), self.smooth(f)  # (7), (8)

    @staticmethod
    def mix(detail: torch.Tensor, smooth: torch.Tensor, texture: torch.Tensor | None) -> torch.Tensor:
        """Eq. (9), ``T * Zdet + (1 - T) * Zsm``, or the average without a texture map."""
        if texture is None:
            return 0.5 * (detail + smooth)
        return smooth + resize(texture, detail.shape[2:]) * (detail - smooth)

    def forward(self, x: torch.Tensor, texture: torch.Tensor | None, anchors: torch.Tensor | None) -> torch.Tensor:
        return self.se(self.mix(*self.paths(x, anchors), texture))  # (10)


class SkipPaths(nn.Module):
    """The four decoder skips, spec 3.5. ``forward`` returns ``[S1, S2, S3, S4]``.

    Routed (default), Eqs. (11)-(13): every encoder map is projected to ``router_width`` at its
    own resolution, resampled to 16^3 and 32^3 (for 128^3 inputs) and mixed with per-voxel
    softmax weights from a controller shared by both targets [I]; a 1x1 conv maps each mix to
    the decoder width. Unrouted (``use_router=False``, spec 3.8): S1 and S2 are 1x1 projections
    of E4 and E3 (the maps one level below each target, which keeps the spec's 450,778 total),
    upsampled x2. S3 is a 1x1 projection of E1 and S4 a 1x1 projection of the stem output, in
    both cases; S4 is returned at the stem's resolution and upsampled x2 by the last decoder stage
    as it concatenates, so the full-size copy is written once.
    """

    def __init__(
        self,
        stem_width: int,
        widths: Sequence[int],
        decoder_widths: Sequence[int],
        routed: bool = True,
        router_width: int = 64,
        shared_controller: bool = True,
    ) -> None:
        super().__init__()
        self.routed = routed
        if routed:
            self.project = nn.ModuleList(nn.Conv3d(w, router_width, 1) for w in widths)
            n = len(widths)
            self.controllers = nn.ModuleList(
                nn.Sequential(nn.Conv3d(n * router_width, router_width, 1), nn.SiLU(), nn.Conv3d(router_width, n, 1))
                for _ in range(1 if shared_controller else 2)
            )
            self.out = nn.ModuleList(nn.Conv3d(router_width, decoder_widths[d], 1) for d in range(2))
        else:
            self.out = nn.ModuleList(nn.Conv3d(widths[3 - d], decoder_widths[d], 1) for d in range(2))
        self.high = nn.Conv3d(widths[0], decoder_widths[2], 1)
        self.full = nn.Conv3d(stem_width, decoder_widths[3], 1)

    def forward(self, f0: torch.Tensor, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        targets = (feats[2].shape[2:], feats[1].shape[2:])
        if self.routed:
            skips = self.routed_skips(feats, targets)
        else:
            skips = [resize(self.out[d](feats[3 - d]), size) for d, size in enumerate(targets)]
        return [*skips, self.high(feats[0]), self.full(f0)]

    def routed_skips(self, feats: Sequence[torch.Tensor], targets: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Eqs. (11)-(13) and the output convs: every encoder map projected once at its own
        resolution and resized to each target, mixed there by the controller's softmax weights."""
        projected = [project(e) for project, e in zip(self.project, feats)]  # (11)
        skips = []
        for d, size in enumerate(targets):
            resampled = [resize(p, size) for p in projected]
            controller = self.controllers[d % len(self.controllers)]
            weights = torch.softmax(controller(torch.cat(resampled, dim=1)), dim=1)  # (12)
            skips.append(self.out[d](weighted_sum(weights, resampled)))  # (13)
        return skips


class DecoderStage(nn.Module):
    """Decoder stage, Eqs. (14)-(21), spec 3.6: x2 transposed conv (k = 3 [F]), anchor position
    bias, SE over the concatenation with the skip (resized to the stage's size: S4 arrives at the
    stem's resolution), and a per-voxel softmax gate over three branches (grouped 3x3x3, conv
    unit, 1x1), followed by SE."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        conv_block: ConvBlock,
        num_anchors: int,
        se_divisor: int = 8,
    ) -> None:
        super().__init__()
        fused = 2 * out_channels
        self.up = nn.ConvTranspose3d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)
        self.position = nn.Conv3d(num_anchors, out_channels, 1) if num_anchors else None
        self.se_in = SqueezeExcite(fused, se_divisor)
        self.gate = nn.Conv3d(fused, 3, 1)
        self.grouped = ConvNormAct(fused, out_channels, 3, groups=out_channels)
        self.conv = conv_block(fused, out_channels, 1)
        self.pointwise = ConvNormAct(fused, out_channels, 1)
        self.se_out = SqueezeExcite(out_channels, se_divisor)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, anchors: torch.Tensor | None) -> torch.Tensor:
        u = self.up(x)
        if self.position is not None and anchors is not None:
            u = u + self.position(anchor_offsets(anchors, u.shape[2:]))  # (14)-(15)
        f = self.se_in(torch.cat([u, resize(skip, u.shape[2:])], dim=1))  # (16)
        gate = torch.softmax(self.gate(f), dim=1)  # (17)
        branches = (self.grouped(f), self.conv(f), self.pointwise(f))  # (19)-(21)
        y = weighted_sum(gate, branches)  # (18)
        return self.se_out(y)


class LightMedSeg(nn.Module):
    """LightMedSeg (spec sections 2-3, ablation switches of 3.8). Input sides: multiples of 16."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        variant: Variant = "ghost",
        num_anchors: int = 8,
        use_lspm: bool = True,
        use_anchors: bool = True,
        use_router: bool = True,
        widths: Sequence[int] = (8, 16, 32, 64),
        stem_width: int = 8,
        router_width: int = 64,
        shared_controller: bool = True,
        lspm_kernel: int = 5,
        lspm_hidden: int = 16,
        detail_kernel: int = 5,
        se_divisor: int = 8,
    ) -> None:
        super().__init__()
        blocks: dict[str, ConvBlock] = {"ghost": GhostConv3d, "standard": standard_conv3d}
        if variant not in blocks:
            raise ModelError(f"LightMedSeg: unknown variant {variant!r}; choose 'ghost' or 'standard'")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4:
            raise ModelError(f"LightMedSeg has four encoder stages; widths={widths} must have 4 entries")
        if use_anchors and num_anchors < 1:
            raise ModelError(f"LightMedSeg: num_anchors must be at least 1, got {num_anchors}")
        conv_block = blocks[variant]
        k = num_anchors if use_anchors else 0
        decoder_widths = widths[::-1]
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.size_divisor = (16, 16, 16)

        self.detector = AnchorDetector(in_channels, num_anchors) if use_anchors else None
        self.stem = conv_block(in_channels, stem_width, 2)
        self.lspm = LSPM(stem_width, lspm_kernel, lspm_hidden) if use_lspm else None
        self.encoder = nn.ModuleList(
            EncoderStage(cin, cout, conv_block, k, detail_kernel, se_divisor)
            for cin, cout in zip((stem_width, *widths[:-1]), widths)
        )
        self.pool = nn.MaxPool3d(2, 2)
        self.skips = SkipPaths(stem_width, widths, decoder_widths, use_router, router_width, shared_controller)
        self.bottleneck = nn.Conv3d(widths[-1], decoder_widths[0], 1)
        self.decoder = nn.ModuleList(
            DecoderStage(cin, cout, conv_block, k, se_divisor)
            for cin, cout in zip((decoder_widths[0], *decoder_widths[:-1]), decoder_widths)
        )
        self.head = nn.Conv3d(decoder_widths[-1], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        anchors, f0, feats = self.encode(x)
        return self.decode(feats[-1], self.skips(f0, feats), anchors)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
        """The anchors (Eq. 1), the stem output F0 and the encoder maps E1..E4 (Eqs. 2-10)."""
        check_input(self, x.shape)
        anchors = self.detector(x) if self.detector is not None else None
        f0 = self.stem(x)
        texture, h = self.lspm(f0) if self.lspm is not None else (None, f0)
        feats = []
        for i, stage in enumerate(self.encoder):
            e = stage(h, texture, anchors)
            feats.append(e)
            h = self.pool(e) if i < len(self.encoder) - 1 else e
        return anchors, f0, feats

    def decode(self, deepest: torch.Tensor, skips: Sequence[torch.Tensor], anchors: torch.Tensor | None) -> torch.Tensor:
        """The logits from E4 and the four skips: the 1x1 seed D0, four decoder stages, the head."""
        y = self.bottleneck(deepest)
        for stage, skip in zip(self.decoder, skips):
            y = stage(y, skip, anchors)
        return self.head(y)


@register_model(
    "lightmedseg",
    description="LightMedSeg (2026): ghost convs, learned spatial anchors, LSPM, skip router; 0.48M params",
    recipe=_RECIPE,
)
def lightmedseg(in_channels: int, num_classes: int, **kwargs) -> LightMedSeg:
    """Build :class:`LightMedSeg`; keyword arguments as its constructor."""
    return LightMedSeg(in_channels, num_classes, **kwargs)
