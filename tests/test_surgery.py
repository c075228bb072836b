"""Channel surgery on the U-Net family: smaller networks computing the same function."""

from __future__ import annotations

import pytest
import torch

from lightseg.errors import ModelError
from lightseg.models import create_model
from lightseg.models.lunet import conv_units
from lightseg.models.surgery import channel_readers, remove_channels


def _silence(model: torch.nn.Module, unit_name: str, channels: list[int]) -> None:
    """Make ``channels`` of a unit output exactly zero: its norm's scale and shift are zero."""
    norm = next(m for m in conv_units(model)[unit_name] if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.GroupNorm, torch.nn.InstanceNorm3d)))
    with torch.no_grad():
        norm.weight[channels] = 0
        norm.bias[channels] = 0


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so a mis-sliced batch norm shows in the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


MODELS = [
    ("unet", {"width": 4, "levels": 3}),
    ("lunet", {"width": 4, "levels": 3, "block": "nnunet"}),
    ("plainunet", {"stages": 3, "width": 4, "max_width": 12}),
    ("plainunet", {"stages": 3, "width": 4, "max_width": 12, "deep_supervision": True}),
]


@pytest.mark.parametrize("name,kwargs", MODELS)
def test_removing_silent_channels_keeps_the_outputs(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = create_model(name, 1, 3, **kwargs).eval()
    _randomise_norms(model)
    x = torch.randn(2, 1, 16, 16, 16)
    units = list(conv_units(model))
    for unit in units:  # every unit: encoder ends (skips), the bottleneck, decoder ends, the head
        _silence(model, unit, [0, 2])
    with torch.no_grad():
        before = model(x)
    params = sum(p.numel() for p in model.parameters())
    widths = {n: u[0].out_channels for n, u in conv_units(model).items()}
    for unit in units:
        remove_channels(model, unit, [0, 2])
    with torch.no_grad():
        after = model(x)
    assert sum(p.numel() for p in model.parameters()) < params
    assert {n: u[0].out_channels for n, u in conv_units(model).items()} == {n: w - 2 for n, w in widths.items()}
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_removing_a_live_channel_changes_the_outputs() -> None:
    """The check above could fail: a channel that contributes does change the function."""
    torch.manual_seed(0)
    model = create_model("unet", 1, 2, width=4, levels=3).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = model(x)
        remove_channels(model, "encoders.0.1", [1])
        assert not torch.allclose(model(x), before, atol=1e-4)


def test_the_architecture_rebuilds_the_pruned_shape_and_weights_load() -> None:
    torch.manual_seed(0)
    model = create_model("unet", 1, 2, width=4, levels=3).eval()
    remove_channels(model, "encoders.2.1", [0, 1, 5])  # the bottleneck's output: read by the first transposed conv
    remove_channels(model, "encoders.1.1", [3])  # a skip: read by the next level and a decoder
    remove_channels(model, "decoders.1", [0])  # the last decoder unit: read by the head
    architecture = model.architecture()
    assert architecture["encoders.2.1"] == 13 and architecture["encoders.1.1"] == 7 and architecture["decoders.1"] == 3
    rebuilt = create_model("unet", 1, 2, width=4, levels=3, architecture=architecture).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    # A full-width model reshapes itself to the weights it is given (a checkpoint from before a pruning step).
    full = create_model("unet", 1, 2, width=4, levels=3).eval()
    full.load_state_dict(model.state_dict())
    assert full.architecture() == architecture


def test_readers_follow_the_topology() -> None:
    model = create_model("unet", 1, 2, width=4, levels=3)
    readers = channel_readers(model)
    assert readers["encoders.0.1"] == [model.encoders[1][0][0], model.decoders[1][0]]  # next level + skip
    assert readers["encoders.2.1"] == [model.ups[0]]  # the bottleneck feeds the first transposed conv
    assert readers["decoders.0.1"] == [model.ups[1]]
    assert readers["decoders.1"] == [model.head[0][0]]
    assert readers["head.0"] == [model.head[1]]


def test_bad_removals_are_refused() -> None:
    model = create_model("unet", 1, 2, width=4, levels=3)
    with pytest.raises(ModelError, match="at least one must stay"):
        remove_channels(model, "encoders.0.0", [0, 1, 2, 3])
    with pytest.raises(ModelError, match="no conv unit"):
        remove_channels(model, "encoders.9.0", [0])
    with pytest.raises(ModelError, match="unknown conv units"):
        create_model("unet", 1, 2, width=4, levels=3, architecture={"bottleneck": 3})
    with pytest.raises(ModelError, match="U-Net"):
        channel_readers(create_model("pspseg", 1, 2))
