"""PSP-Seg network: parameter totals (spec 2.3), masking vs removal, architecture round trip, ONNX."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightseg.errors import ModelError
from lightseg.models import create_model
from lightseg.models.pspseg import KERNEL_SETS, SIZES, PSPSeg


def _conv(cin: int, cout: int, volume: int) -> int:
    return cin * cout * volume + cout


def _published_count(size: str, in_channels: int = 1, num_classes: int = 3) -> tuple[int, int]:
    """(full total, non-prunable part) counted from the spec's description, not from the model."""
    channels, expansion, branches = SIZES[size]
    fixed = _conv(in_channels, channels[0], 1) + 2 * _conv(channels[0], channels[0], 27)
    for l in range(1, len(channels)):
        fixed += _conv(channels[l - 1], channels[l], 1) + _conv(channels[l - 1], channels[l], 27)
        fixed += _conv(channels[l], channels[l], 27) + _conv(channels[l], channels[l - 1], 1)
    fixed += sum(_conv(channels[l], num_classes, 1) for l in range(5))  # incl. the unused 1/16 head
    rm_channels = list(channels[1:-1]) * 2 + [channels[-1]]
    prunable = 0
    for c in rm_channels:
        hidden = int(c * expansion)
        for kernel in KERNEL_SETS[branches]:
            prunable += _conv(c, hidden, 1) + _conv(hidden, c, math.prod(kernel)) + 1
    return fixed + prunable, fixed


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size,paper_total,paper_fixed", [("S", 5.37e6, 3.63e6), ("B", 13.2e6, 3.63e6), ("L", 33.1e6, 8.77e6)])
def test_parameter_totals_match_spec(size, paper_total, paper_fixed):
    total, fixed = _published_count(size)
    assert total == pytest.approx(paper_total, rel=2e-3)
    assert fixed == pytest.approx(paper_fixed, rel=2e-3)
    head_1_16 = _conv(256, 3, 1)  # built but never used by the published code; we drop it
    assert _params(create_model("pspseg", 1, 3, size=size)) == total - head_1_16


def test_fully_pruned_count_is_the_non_prunable_part():
    model = PSPSeg(1, 3, size="S", architecture={name: [] for name in PSPSeg(1, 3).architecture()})
    assert _params(model) == _published_count("S")[1] - _conv(256, 3, 1)


def test_training_outputs_are_deep_supervision_list_eval_is_tensor():
    model = PSPSeg(1, 3, size="S", channels=(4, 8, 8, 8, 8)).train()
    outs = model(torch.randn(2, 1, 32, 32, 32))
    assert [tuple(o.shape[2:]) for o in outs] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]
    model.eval()
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    assert model.size_divisor == (16, 16, 16)
    assert PSPSeg(1, 2, size="L", channels=(2, 2, 2, 2, 2, 2)).size_divisor == (32, 32, 32)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_zero_gates_make_modules_trivial(mode):
    rm = PSPSeg(1, 2, mode=mode, channels=(4, 8, 8, 8, 8)).rms["enc1"]
    x = torch.randn(1, 8, 4, 4, 4)
    expected = x if mode == "sequential" else torch.nn.functional.leaky_relu(x, 0.01)
    assert torch.equal(rm(x), expected)


def _randomise_gates(model: PSPSeg) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_masked_branch_equals_removed_branch_and_removal_shrinks(mode):
    torch.manual_seed(0)
    model = PSPSeg(1, 3, size="B", mode=mode, channels=(4, 8, 8, 8, 8)).eval()
    _randomise_gates(model)
    x = torch.randn(1, 1, 32, 32, 32)
    full = model(x)
    for name in ("enc1", "bottleneck", "dec2"):
        model.rms[name].masked = {1, 4}
    masked = model(x)
    assert not torch.allclose(masked, full)
    before = _params(model)
    for name in ("enc1", "bottleneck", "dec2"):
        model.rms[name].remove([1, 4])
    assert torch.allclose(model(x), masked, atol=1e-6)
    assert _params(model) < before
    assert model.architecture()["enc1"] == [0, 2, 3, 5, 6]
    assert model.rms["enc1"].masked == set()


def test_architecture_round_trip_and_state_dict_adapts():
    torch.manual_seed(0)
    model = PSPSeg(1, 3, size="S", channels=(4, 8, 8, 8, 8)).eval()
    _randomise_gates(model)
    model.rms["enc2"].remove([0, 3])
    model.rms["dec1"].remove([1, 2, 3])
    arch = json.loads(json.dumps(model.architecture()))
    rebuilt = create_model("pspseg", 1, 3, size="S", channels=(4, 8, 8, 8, 8), architecture=json.dumps(arch))
    assert rebuilt.architecture() == arch
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    assert torch.equal(rebuilt(x), model(x))
    # An older, less pruned checkpoint still loads into the newer architecture.
    older = PSPSeg(1, 3, size="S", channels=(4, 8, 8, 8, 8))
    rebuilt.load_state_dict(older.state_dict())
    assert rebuilt.architecture() == older.architecture()


def test_bad_arguments_are_model_errors():
    with pytest.raises(ModelError, match="unknown modules"):
        PSPSeg(1, 3, architecture={"enc9": [0]})
    with pytest.raises(ModelError, match="out of range"):
        PSPSeg(1, 3, size="S", architecture={"enc1": [5]})
    with pytest.raises(ModelError, match="size"):
        PSPSeg(1, 3, size="XL")
    with pytest.raises(ModelError, match="JSON"):
        PSPSeg(1, 3, architecture="{not json")


def test_pruned_model_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = PSPSeg(1, 2, size="S", channels=(4, 8, 8, 8, 8)).eval()
    _randomise_gates(model)
    model.rms["bottleneck"].remove([0, 1])
    model.rms["enc1"].masked = {2}
    x = torch.randn(1, 1, 32, 32, 32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"], dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert got == pytest.approx(model(x).detach().numpy(), abs=1e-4)
