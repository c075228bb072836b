"""LightMedSeg's training forms (gate, squeeze-excitation, decoder stage): the plain modules' outputs
and gradients to float rounding, on channels_last_3d maps large enough for the kernels' threads."""

from __future__ import annotations

import copy

import pytest
import torch

from lightseg.accel import native
from lightseg.accel.training_lightmedseg import (
    DecoderInputFunction,
    _TrainingDecoderStage,
    _TrainingSqueezeExcite,
    softmax_weighted_sum,
    use_training_blocks,
)
from lightseg.models.blocks import GhostConv3d, SqueezeExcite
from lightseg.models.lightmedseg import DecoderStage, position_ramp, resize, weighted_sum

needs_kernels = pytest.mark.skipif(native.library() is None, reason="the C kernels are not built on this machine")
LAYOUT = torch.channels_last_3d


def _map(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).contiguous(memory_format=LAYOUT)


def _close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    return (got.double() - expected.double()).abs().max().item() <= rel * expected.abs().max().item()


@needs_kernels
@pytest.mark.parametrize("maps, channels", [(3, 8), (2, 16), (4, 8)])
def test_softmax_weighted_sum_equals_autograd_in_float64(maps: int, channels: int) -> None:
    size = (2, 34, 33, 32)  # 35,904 voxels: above the kernels' one-thread bound, not a multiple of 64
    logits = (3 * _map(2, maps, *size[1:], seed=0)).requires_grad_()
    inputs = [_map(2, channels, *size[1:], seed=k + 1).requires_grad_() for k in range(maps)]
    go = _map(2, channels, *size[1:], seed=9)
    y = softmax_weighted_sum(logits, inputs)
    assert y.grad_fn.name().startswith("SoftmaxWeightedSumFunction") and y.is_contiguous(memory_format=LAYOUT)
    y.backward(go)
    reference = [t.detach().double().requires_grad_() for t in (logits, *inputs)]
    expected = weighted_sum(torch.softmax(reference[0], dim=1), reference[1:])
    expected.backward(go.double())
    assert _close(y, expected)
    for got, ref in zip((logits, *inputs), reference):
        assert got.grad.is_contiguous(memory_format=LAYOUT) and _close(got.grad, ref.grad)


def test_softmax_weighted_sum_takes_pytorch_where_the_kernel_does_not_fit() -> None:
    maps = [_map(1, 6, 4, 4, 4, seed=k).requires_grad_() for k in range(3)]  # 6 channels: not a multiple of 8
    logits = _map(1, 3, 4, 4, 4, seed=5).requires_grad_()
    y = softmax_weighted_sum(logits, maps)
    assert not y.grad_fn.name().startswith("SoftmaxWeightedSumFunction")
    assert torch.allclose(y, weighted_sum(torch.softmax(logits, 1), maps))
    with torch.no_grad():
        assert torch.allclose(softmax_weighted_sum(logits, maps), y)


@needs_kernels
@pytest.mark.parametrize("channels, size, fused", [(8, (42, 40, 40), True), (16, (34, 33, 32), True), (8, (9, 10, 11), False)])
def test_squeeze_excite_training_form_keeps_outputs_and_gradients(channels: int, size: tuple, fused: bool) -> None:
    """The fused backward from SE_MIN_VALUES values per sample, autograd's below."""
    torch.manual_seed(0)
    plain = SqueezeExcite(channels).double()
    fast = use_training_blocks(copy.deepcopy(plain).float())
    assert isinstance(fast, _TrainingSqueezeExcite)
    x = (_map(2, channels, *size, seed=1) + 0.5).requires_grad_()
    go = _map(2, channels, *size, seed=2)
    y = fast(x)
    assert y.grad_fn.name().startswith("SqueezeExciteFunction") == fused
    y.backward(go)
    reference = x.detach().double().requires_grad_()
    expected = plain(reference)
    expected.backward(go.double())
    assert _close(y, expected) and _close(x.grad, reference.grad)
    for (name, got), ref in zip(fast.named_parameters(), plain.parameters()):
        assert _close(got.grad, ref.grad), name


@needs_kernels
@pytest.mark.parametrize("skip_side", [32, 16])  # the skip at the stage's size (S1-S3) and at half of it (S4)
def test_decoder_stage_training_form_keeps_outputs_and_gradients(skip_side: int) -> None:
    torch.manual_seed(0)
    plain = DecoderStage(16, 8, GhostConv3d, num_anchors=8)
    fast = use_training_blocks(copy.deepcopy(plain)).to(memory_format=LAYOUT)
    assert isinstance(fast, _TrainingDecoderStage) and isinstance(fast.se_out, _TrainingSqueezeExcite)
    x, skip = _map(2, 16, 16, 16, 16, seed=1), _map(2, 8, skip_side, skip_side, skip_side, seed=2)
    anchors = torch.rand(2, 8, 3, generator=torch.Generator().manual_seed(3))
    outputs = []
    for model in (plain, fast):
        inputs = [t.clone().requires_grad_() for t in (x, skip, anchors)]
        y = model(*inputs)
        y.backward(_map(*y.shape, seed=4))
        outputs.append((y, [t.grad for t in inputs], [p.grad for p in model.parameters()]))
    (y0, inputs0, params0), (y1, inputs1, params1) = outputs
    assert _close(y1, y0, 1e-4)
    for got, expected in zip(inputs1 + params1, inputs0 + params0):
        assert _close(got, expected, 1e-4)


@needs_kernels
@pytest.mark.parametrize("position, half", [(True, True), (False, True), (True, False)])
def test_decoder_input_equals_autograd_in_float64(position: bool, half: bool) -> None:
    size, skip_size = (18, 20, 22), (9, 10, 11)
    u = _map(2, 8, *size, seed=1).requires_grad_()
    skip = _map(2, 16, *(skip_size if half else size), seed=2).requires_grad_()
    offset = torch.randn(2, 8, requires_grad=True) if position else None
    slope = torch.randn(8, requires_grad=True) if position else None
    go = _map(2, 24, *size, seed=3)
    f = DecoderInputFunction.apply(u, skip, offset, slope)
    f.backward(go)
    leaves = [t for t in (u, skip, offset, slope) if t is not None]
    reference = [t.detach().double().requires_grad_() for t in leaves]
    ru, rskip = reference[:2]
    if position:
        ru = ru + reference[2][:, :, None, None, None] + reference[3][None, :, None, None, None] * position_ramp(size, ru)
    expected = torch.cat([ru, resize(rskip, size)], dim=1)
    expected.backward(go.double())
    assert _close(f, expected)
    for got, ref in zip(leaves, reference):
        assert _close(got.grad, ref.grad)


def test_swap_keeps_the_state_is_idempotent_and_leaves_other_maps_to_the_plain_forward() -> None:
    torch.manual_seed(0)
    stage = DecoderStage(16, 8, GhostConv3d, num_anchors=8)
    state = {k: v.clone() for k, v in stage.state_dict().items()}
    use_training_blocks(use_training_blocks(stage))
    assert type(stage).__mro__[2] is DecoderStage  # swapped once: the training class, the mixin, the plain class
    assert all(torch.equal(stage.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(1, 16, 8, 8, 8, requires_grad=True)  # contiguous: the plain forward
    assert stage.se_in(x).grad_fn.name() == "MulBackward0"
    assert stage(x[:, :, :4, :4, :4], torch.randn(1, 8, 8, 8, 8), torch.rand(1, 8, 3)).shape == (1, 8, 8, 8, 8)
