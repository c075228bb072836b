"""Training in each model's chosen memory format gives the contiguous format's gradients.

Every registered model (small test widths from test_model_contract), a fixed seed, one legal
input: the model as the trainer prepares it (:func:`prepare_for_training`), an untouched
contiguous copy and a float64 copy run the same forward, loss and backward; every parameter's
gradient is as close to the float64 one as the contiguous float32 copy's is, within 2x (float
rounding differs by reduction order). The float64 reference, not the contiguous float32 run,
because that run is not the accurate one everywhere: on an AVX-512 Xeon with one thread,
PyTorch's contiguous swinunetr patch-embedding weight gradient was 3.2e-7 from float64 and the
channels_last one 5.9e-8. (LUnet in channels_last_3d, through PyTorch's batch norm there,
missed the earlier bound, against the contiguous run, by 370x when measured, which is why it
trains contiguous.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_model_contract import IN_CHANNELS, MODELS, _build, _full_resolution, _input, _sizes

from lightseg.models import list_models
from lightseg.training.memory_format import TRAINING_CHANNELS_LAST, prepare_for_training, trains_channels_last


def _gradients(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    torch.manual_seed(3)  # dropout, where a model has it, draws the same masks in both runs
    loss = F.cross_entropy(_full_resolution(model(x)), target)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", MODELS)
def test_gradients_in_the_training_format_equal_the_contiguous_ones(name: str) -> None:
    reference = _build(name)
    prepared = prepare_for_training(copy.deepcopy(reference), name, "cpu")
    x = _input(_sizes(name, reference)[0], batch=2)
    target = torch.randint(0, 3, (2, *x.shape[2:]), generator=torch.Generator().manual_seed(2))
    if trains_channels_last(name, reference, "cpu"):
        assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in prepared.parameters() if p.dim() == 5)
    exact = _gradients(copy.deepcopy(reference).double(), x.double(), target)
    expected, got = _gradients(reference, x, target), _gradients(prepared, x, target)
    assert x.is_contiguous() and expected.keys() == got.keys() == exact.keys()
    largest = max(g.abs().max().item() for g in exact.values() if g is not None)
    for key, g in exact.items():
        assert (got[key] is None) == (g is None) == (expected[key] is None), key  # a head no output reaches has none
        if g is not None:  # as near float64 as the contiguous run, within 2x, or 1e-6 of the gradients' scale
            scale = g.abs().max().item() + 1e-2 * largest
            contiguous_error = (expected[key].double() - g).abs().max().item()
            error = (got[key].double() - g).abs().max().item()
            assert error <= 2 * contiguous_error + 1e-6 * scale, f"{name}: {key}: {error:.3g} vs {contiguous_error:.3g}"


def test_the_table_names_registered_models_and_the_hook_moves_the_input() -> None:
    assert set(TRAINING_CHANNELS_LAST) <= set(list_models())
    model = prepare_for_training(_build("lightmedseg"), "lightmedseg", "cpu")
    seen = []
    model.stem.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    prepare_for_training(model, "lightmedseg", "cpu")  # a second call registers no second hook
    assert len(model._forward_pre_hooks) == 1
    model(torch.randn(1, IN_CHANNELS, 16, 16, 16))
    assert seen == [True]
    assert not trains_channels_last("lightmedseg", model, "cuda")  # no CUDA measurement: the model's CUDA preference


def test_lightmedseg_bias_and_1x1x1_gradients_have_their_parameters_strides() -> None:
    """DistributedDataParallel compares each gradient's strides with its parameter's, unit dims
    included, and copies (with a warning on every torchrun step) where they differ: the biases of
    the grouped-sum convs once came back as strided views, the one-output conv's weight through a
    reshape with another unit-dim stride, the 1x1x1 weights in channels_last_3d with other unit-dim
    strides than the gradient's."""
    model = prepare_for_training(_build("lightmedseg"), "lightmedseg", "cpu")
    x = _input(_sizes("lightmedseg", model)[0], batch=2)
    target = torch.randint(0, 3, (2, *x.shape[2:]), generator=torch.Generator().manual_seed(2))
    _gradients(model, x, target)
    biases = [(n, p) for n, p in model.named_parameters() if p.dim() == 1 and p.grad is not None]
    assert biases and all(p.grad.stride() == p.stride() for _, p in biases), [n for n, p in biases if p.grad.stride() != p.stride()]
    one_output = model.lspm.gate[1].weight  # a grouped-sum conv with one group, reached through a view
    assert one_output.shape[0] == 1 and one_output.grad.stride() == one_output.stride()
    pointwise = [p for p in model.parameters() if p.dim() == 5 and p.shape[2:] == (1, 1, 1)]
    assert pointwise and all(p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last_3d) for p in pointwise)
