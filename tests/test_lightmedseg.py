"""LightMedSeg against the spec's parameter totals (specs/lightmedseg.md sections 3, 7, 8) and
its behaviour: shapes, ablations, channel/class counts, input-size errors, memory formats."""

from __future__ import annotations

import copy

import pytest
import torch

from lightseg.benchmark.flops import count_parameters
from lightseg.errors import ModelError
from lightseg.models import create_model, model_entry
from lightseg.accel import accelerate
from lightseg.accel.layers import GroupSumConv3d
from lightseg.accel.lightmedseg import position_terms
from lightseg.models.lightmedseg import LightMedSeg, anchor_offsets, position_ramp


def params(module: torch.nn.Module) -> int:
    return count_parameters(module)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 476_446),
        ({"variant": "standard"}, 657_562),
        ({"num_anchors": 16}, 486_262),
        ({"num_anchors": 32}, 505_894),
        ({"use_lspm": False}, 471_344),
        ({"use_anchors": False}, 460_726),
        ({"use_router": False}, 450_778),
    ],
)
def test_totals_match_the_spec(kwargs, expected):
    """Section 7 and 3.8: every total reproduced exactly (the paper: 0.48M, 0.66M, 0.49M at K=16)."""
    assert params(LightMedSeg(4, 4, **kwargs)) == expected


def test_paper_rounding():
    assert round(params(LightMedSeg(4, 4)) / 1e6, 2) == 0.48
    assert round(params(LightMedSeg(4, 4, variant="standard")) / 1e6, 2) == 0.66
    assert round(params(LightMedSeg(4, 4, num_anchors=16)) / 1e6, 2) == 0.49


def test_per_module_parameters_match_section_7():
    ghost, standard = LightMedSeg(4, 4), LightMedSeg(4, 4, variant="standard")
    assert params(ghost.stem) == 556 and params(standard.stem) == 880
    assert params(ghost.detector) == 8_640
    assert params(ghost.lspm) == 5_102
    assert [params(s) for s in ghost.encoder] == [2_560, 5_244, 14_452, 45_288]
    assert [params(s) for s in standard.encoder] == [3_316, 6_756, 20_932, 72_072]
    assert sum(params(s.film) for s in ghost.encoder) == 6_000
    assert params(ghost.skips) == 31_100
    router_core = sum(params(m) for m in ghost.skips.project) + params(ghost.skips.controllers)
    assert router_core == 24_644
    assert params(ghost.bottleneck) == 4_160
    assert [params(s) for s in ghost.decoder] == [240_571, 89_311, 23_155, 6_271]
    assert [params(s) for s in standard.decoder] == [350_299, 116_527, 29_851, 7_891]
    assert sum(params(s.up) for s in ghost.decoder) == 183_288
    assert sum(params(s.position) for s in ghost.decoder) == 1_080
    assert params(ghost.head) == 36


def test_one_channel_input_and_cost_per_anchor():
    """ACDC model (1 channel): 475,474 with a 7,992-parameter detector; each anchor costs 1,227."""
    model = LightMedSeg(1, 4)
    assert params(model) == 475_474 and params(model.detector) == 7_992
    assert params(LightMedSeg(4, 4, num_anchors=9)) - params(LightMedSeg(4, 4)) == 1_227


def test_two_controllers_variant_of_section_7():
    """Alternative "B" of the spec: two controllers and detail kernel 3 give 481,394 / 662,510."""
    assert params(LightMedSeg(4, 4, shared_controller=False, detail_kernel=3)) == 481_394
    assert params(LightMedSeg(4, 4, variant="standard", shared_controller=False, detail_kernel=3)) == 662_510


def test_registry_entry_and_recipe():
    model = create_model("lightmedseg", in_channels=4, num_classes=4, variant="standard")
    assert isinstance(model, LightMedSeg) and model.size_divisor == (16, 16, 16)
    recipe = model_entry("lightmedseg").recipe
    assert recipe == {
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "warmup_epochs": 5,
        "loss": "lightmedseg",
    }


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"variant": "standard"}, {"use_lspm": False}, {"use_anchors": False}, {"use_router": False}],
)
def test_forward_shape_on_non_cubic_input(kwargs):
    torch.manual_seed(0)
    model = LightMedSeg(2, 3, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, 16, 32, 48))
    assert out.shape == (2, 3, 16, 32, 48)
    assert torch.isfinite(out).all()


def test_any_channel_and_class_count():
    model = LightMedSeg(1, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 7, 32, 32, 32)


def test_wrong_size_or_channels_is_a_clear_error():
    model = LightMedSeg(4, 4)
    with pytest.raises(ModelError, match=r"multiple of \(16, 16, 16\).*\(32, 32, 32\)"):
        model(torch.randn(1, 4, 30, 32, 32))
    with pytest.raises(ModelError, match="built for 4"):
        model(torch.randn(1, 3, 32, 32, 32))


def test_bad_arguments_are_model_errors():
    with pytest.raises(ModelError, match="variant"):
        LightMedSeg(4, 4, variant="tiny")
    with pytest.raises(ModelError, match="num_anchors"):
        LightMedSeg(4, 4, num_anchors=0)


def test_position_bias_equals_conv_on_eq_14_offsets():
    """Eq. (14)'s offsets evaluated voxel by voxel against :func:`anchor_offsets`, and the
    accelerator's folded bias ``offset + slope * g`` against the 1x1 conv on them (Eq. 15)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 5, 1).double()
    anchors = torch.rand(2, 3, 3, dtype=torch.float64)
    size = (2, 3, 4)
    delta = torch.zeros(2, 3, *size, dtype=torch.float64)
    for b in range(2):
        for k in range(3):
            a = anchors[b, k]
            for i in range(2):
                for j in range(3):
                    for l in range(4):
                        delta[b, k, i, j, l] = (i / 1 - a[0]) + (j / 2 - a[1]) + (l / 3 - a[2])
    torch.testing.assert_close(anchor_offsets(anchors, size), delta, rtol=0, atol=1e-12)
    offset, slope = position_terms(conv, anchors)
    folded = offset[:, :, None, None, None] + slope[None, :, None, None, None] * position_ramp(size, anchors)
    torch.testing.assert_close(folded, conv(delta), rtol=0, atol=1e-12)


def test_fast_forward_matches_a_float64_reference():
    """The prediction path (accelerated, float32, channels_last_3d) against the same weights run
    plain in float64, contiguous: an independent slow evaluation of the same network."""
    torch.manual_seed(0)
    model = LightMedSeg(4, 4).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(x.double())
        fast = accelerate(model).to(memory_format=torch.channels_last_3d)
        out = fast(x.contiguous(memory_format=torch.channels_last_3d))
    assert (out.double() - reference).abs().max() <= 1e-4


def test_router_resizes_large_maps_before_projecting():
    """Eq. (11) as written (the plain router: every map projected at its own size, then resized)
    against the accelerated router (maps larger than both targets resized first): the same skips."""
    torch.manual_seed(0)
    plain = LightMedSeg(1, 2).eval().skips
    fast = accelerate(copy.deepcopy(plain))
    feats = [torch.randn(1, w, s, s, s) for w, s in zip((8, 16, 32, 64), (32, 16, 8, 4))]
    f0 = torch.randn(1, 8, 32, 32, 32)
    with torch.no_grad():
        for got, expected in zip(fast(f0, feats), plain(f0, feats)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_folded_se_scales_match_the_multiplied_ones():
    """The accelerated model folds the decoder's SE scales into the next convs' weights for a batch
    of one and multiplies them into the maps for a batch of two: each sample's logits agree."""
    torch.manual_seed(0)
    model = accelerate(LightMedSeg(4, 4).eval())
    x = torch.randn(2, 4, 32, 32, 32)
    with torch.no_grad():
        multiplied = model(x)
        folded = torch.cat([model(x[:1]), model(x[1:])])
    torch.testing.assert_close(folded, multiplied, atol=1e-5, rtol=1e-5)


def test_anchors_change_the_output():
    """The anchors reach the decoder: different anchors give different logits."""
    torch.manual_seed(0)
    model = LightMedSeg(1, 2).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        base = model(x)
        model.detector.fc2.bias.add_(3.0)
        moved = model(x)
    assert not torch.allclose(base, moved)


def test_channels_last_3d_matches_contiguous():
    torch.manual_seed(0)
    model = LightMedSeg(4, 4).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        out = model(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = LightMedSeg(1, 3)
    model(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("groups", [4, 1])  # three inputs per group; one dense single-output conv
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_group_sum_conv_is_the_grouped_conv(layout, groups):
    """Depthwise + per-group sum gives the grouped conv's outputs and gradients from the same
    state dict, and keeps the input's memory layout."""
    torch.manual_seed(0)
    grouped = torch.nn.Conv3d(12, groups, 3, padding=1, groups=groups)
    fast = accelerate(copy.deepcopy(grouped))
    assert type(fast) is GroupSumConv3d
    x = torch.randn(2, 12, 7, 8, 9).contiguous(memory_format=layout).requires_grad_()
    y_fast, y_ref = fast(x), grouped(x)
    assert groups == 1 or y_fast.is_contiguous(memory_format=layout)  # one output channel fits both layouts
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    grads_fast = torch.autograd.grad(y_fast.square().sum(), (fast.weight, fast.bias))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (grouped.weight, grouped.bias))
    torch.testing.assert_close(grads_fast, grads_ref, atol=1e-4, rtol=1e-4)


def test_decoder_grouped_branch_runs_as_group_sum():
    """Accelerated, every decoder's grouped branch (two inputs per output) uses the faster form;
    the plain model keeps PyTorch's grouped conv."""
    model = LightMedSeg(4, 4)
    assert all(type(stage.grouped.conv) is torch.nn.Conv3d for stage in model.decoder)
    assert all(type(stage.grouped.conv) is GroupSumConv3d for stage in accelerate(model).decoder)


def _strict_layout(t: torch.Tensor) -> str | None:
    """'channels_last' or 'contiguous' for a 5-D tensor that can only be one of them, else None."""
    if t.dim() != 5 or t.shape[1] == 1 or t.shape[2:].numel() == 1:
        return None
    cl = t.is_contiguous(memory_format=torch.channels_last_3d)
    return None if cl == t.is_contiguous() else ("channels_last" if cl else "contiguous")


@pytest.mark.parametrize("kwargs", [{}, {"variant": "standard"}, {"use_router": False}])
def test_channels_last_stays_channels_last(kwargs):
    """Accelerated, every module fed a channels_last_3d map returns one: PyTorch's own small-conv kernels return
    contiguous maps, and one of them turns the rest of the network into mixed-layout ops."""
    torch.manual_seed(0)
    model = accelerate(LightMedSeg(4, 4, **kwargs).eval()).to(memory_format=torch.channels_last_3d)
    lost = []

    def check(module, inputs, output):
        if isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
            if _strict_layout(inputs[0]) == "channels_last" and _strict_layout(output) == "contiguous":
                lost.append(type(module).__name__)

    for module in model.modules():
        module.register_forward_hook(check)
    with torch.inference_mode():
        model(torch.randn(1, 4, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d))
    assert lost == []
