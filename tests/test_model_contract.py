"""One contract for every registered model (a new model joins by being registered).

Each model is built with 2 input channels and 3 classes (neither is a default anywhere, so a
hard-coded count fails) and small test arguments from ``TEST_CONFIGS`` (default: the model's
own defaults and two sizes derived from its ``size_divisor``).
"""

from __future__ import annotations

import ast
import io
import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from lightseg.accel import accelerate
from lightseg.errors import ModelError
from lightseg.models import check_input, check_input_size, create_model, list_models, model_entry

IN_CHANNELS, NUM_CLASSES = 2, 3
RECIPE_KEYS = {"optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "loss"}

# Tiny widths keep the suite fast; "sizes" are legal spatial sizes whose deepest feature map has
# more than one voxel (instance norm in training mode needs that).
TEST_CONFIGS: dict[str, dict[str, Any]] = {
    "lunet": {"kwargs": {"width": 4}, "sizes": [(32, 32, 32), (16, 32, 48)]},
    "unet": {"kwargs": {"width": 2}, "sizes": [(32, 32, 32), (16, 32, 48)]},
    "pspseg": {"kwargs": {"channels": (4, 8, 8, 8, 8)}},
    "plainunet": {"kwargs": {"width": 4, "max_width": 16, "stages": 4}, "sizes": [(16, 16, 16), (8, 16, 24)]},
    "monai_unet": {"kwargs": {"channels": (4, 8, 16, 32, 64)}, "sizes": [(32, 32, 32), (16, 32, 48)]},
    "segresnet": {"kwargs": {"init_filters": 8}, "sizes": [(16, 16, 16), (8, 16, 24)]},
    # UNETR's position embedding fixes the input size: one legal size only.
    "unetr": {
        "kwargs": {"img_size": 32, "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4},
        "sizes": [(32, 32, 32)],
    },
    "swinunetr": {
        "kwargs": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 4},
        "sizes": [(64, 64, 64), (32, 64, 64)],
        "slow": True,
    },
}


@pytest.fixture(autouse=True, params=["plain", "accelerated"])
def accelerator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every contract holds for the plain model and for the accelerated one the predictor runs
    (:func:`lightseg.accel.accelerate`): each test runs once with each."""
    if request.param == "accelerated":
        monkeypatch.setitem(globals(), "create_model", lambda *args, **kwargs: accelerate(_create_plain(*args, **kwargs)))
    return request.param


_create_plain = create_model


def _config(name: str) -> dict[str, Any]:
    return TEST_CONFIGS.get(name, {})


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, IN_CHANNELS, NUM_CLASSES, **_config(name).get("kwargs", {}))


def _sizes(name: str, model: torch.nn.Module) -> list[tuple[int, ...]]:
    if "sizes" in _config(name):
        return [tuple(s) for s in _config(name)["sizes"]]
    d = tuple(model.size_divisor)
    return [tuple(2 * v for v in d), tuple(v * k for v, k in zip(d, (2, 3, 2)))]


def _input(size: tuple[int, ...], batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn((batch, IN_CHANNELS, *size), generator=torch.Generator().manual_seed(seed))


def _full_resolution(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Deep-supervised models return a list in training mode, full resolution first."""
    return output[0] if isinstance(output, (list, tuple)) else output


MODELS = [pytest.param(name, marks=pytest.mark.slow) if _config(name).get("slow") else name for name in list_models()]


def test_every_configured_model_is_registered() -> None:
    assert set(TEST_CONFIGS) <= set(list_models()), "TEST_CONFIGS names a model that is not registered"


@pytest.mark.parametrize("name", MODELS)
def test_declares_contract(name: str) -> None:
    model = _build(name)
    divisor = tuple(model.size_divisor)
    assert len(divisor) == 3 and all(isinstance(d, int) and d >= 1 for d in divisor)
    assert model.in_channels == IN_CHANNELS
    entry = model_entry(name)
    assert entry.description
    assert set(entry.recipe) == RECIPE_KEYS
    assert entry.recipe["optimizer"] in {"adamw", "sgd"} and entry.recipe["schedule"] in {"cosine", "poly"}


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape(name: str) -> None:
    model = _build(name).eval()
    with torch.inference_mode():
        for size in _sizes(name, model):
            check_input_size(model, size)
            out = model(_input(size))
            assert isinstance(out, torch.Tensor), "eval mode must return one tensor"
            assert out.shape == (1, NUM_CLASSES, *size)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_backward_gives_finite_gradients(name: str) -> None:
    model = _build(name).train()
    size = _sizes(name, model)[0]
    output = model(_input(size, batch=2))
    outputs = output if isinstance(output, (list, tuple)) else [output]
    assert outputs[0].shape == (2, NUM_CLASSES, *size)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outputs)]
    sum((o * w).mean() for o, w in zip(outputs, weights)).backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name}: parameter {pname} receives no gradient"
            assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient in {pname}"


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name: str) -> None:
    model = _build(name, seed=0)
    size = _sizes(name, model)[0]
    model.train()
    _full_resolution(model(_input(size, batch=2, seed=3)))  # moves running statistics off their defaults
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = _build(name, seed=1)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    clone.eval()
    x = _input(size)
    with torch.inference_mode():
        assert torch.equal(model(x), clone(x))


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic(name: str) -> None:
    model = _build(name).eval()
    x = _input(_sizes(name, model)[0])
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_pytorch(name: str, accelerator: str) -> None:
    if accelerator == "accelerated":
        pytest.skip("ONNX export runs on the plain model (lightseg.accel swaps are for eager CPU inference)")
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _build(name).eval()
    x = _input(_sizes(name, model)[0])
    with torch.inference_mode():
        expected = model(x).numpy()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        # The TorchScript exporter needs no extra package (the dynamo one needs onnxscript).
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["image"], output_names=["logits"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"image": x.numpy()})
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_wrong_size_is_a_clear_error(name: str) -> None:
    model = _build(name).eval()
    size = _sizes(name, model)[0]
    bad = (size[0] + 1, *size[1:])
    with pytest.raises(ModelError) as info:
        check_input_size(model, bad)
    legal = tuple(max(d, round(s / d) * d) for s, d in zip(bad, model.size_divisor))
    assert str(legal) in str(info.value)
    with pytest.raises(ModelError), torch.inference_mode():
        model(_input(bad))


@pytest.mark.parametrize("name", MODELS)
def test_wrong_channel_count_is_a_clear_error(name: str) -> None:
    model = _build(name).eval()
    size = _sizes(name, model)[0]
    with pytest.raises(ModelError, match=f"built for {IN_CHANNELS}"):
        check_input(model, (1, IN_CHANNELS + 1, *size))
    with pytest.raises(ModelError, match=f"built for {IN_CHANNELS}"), torch.inference_mode():
        model(torch.zeros(1, IN_CHANNELS + 1, *size))


def _runs_or_names_a_legal_size(model: torch.nn.Module, size: tuple[int, ...]) -> None:
    """A size ``check_input_size`` accepts runs (eval, and training at batch 2); a refused one names
    a smallest legal size, which runs."""
    try:
        check_input_size(model, size)
    except ModelError as exc:
        match = re.search(r"smallest legal size is (\([0-9, ]+\))", str(exc))
        assert match, f"{size} refused without naming the smallest legal size: {exc}"
        legal = ast.literal_eval(match.group(1))
        assert math.prod(legal) == 2 * math.prod(size)  # one axis doubled, nothing larger
        _runs_or_names_a_legal_size(model, legal)
        return
    with torch.inference_mode():
        assert model.eval()(_input(size)).shape == (1, NUM_CLASSES, *size)
    _full_resolution(model.train()(_input(size, batch=2))).sum().backward()


@pytest.mark.parametrize("name", MODELS)
def test_the_size_divisor_itself_runs_or_is_refused_clearly(name: str) -> None:
    """At the divisor the bottleneck is one voxel: instance norm cannot take it (min_bottleneck_voxels)."""
    model = _build(name)
    _runs_or_names_a_legal_size(model, tuple(model.size_divisor))


@pytest.mark.parametrize("name", MODELS)
def test_a_training_batch_of_one_runs_or_is_refused_clearly(name: str) -> None:
    """Batch norm needs 2 values per channel in training, so at a 1-voxel bottleneck a batch of one
    patch fails inside torch: the check refuses it, naming a batch and a patch that train, and
    agrees with torch for every model."""
    model = _build(name)
    divisor = tuple(model.size_divisor)
    size = (*divisor[:-1], divisor[-1] * getattr(model, "min_bottleneck_voxels", 1))  # the smallest legal size
    if _config(name).get("sizes"):
        size = tuple(_config(name)["sizes"][0])
    try:
        check_input_size(model, size, training_batch=1)
    except ModelError as exc:
        match = re.search(r"needs at least 2 in training; .*--batch 2.* larger patch such as (\([0-9, ]+\))", str(exc))
        assert match, exc
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            _full_resolution(model.train()(_input(size)))
        check_input_size(model, size, training_batch=2)
        _full_resolution(model.train()(_input(size, batch=2))).sum().backward()
        size = ast.literal_eval(match.group(1))
        check_input_size(model, size, training_batch=1)
    _full_resolution(model.train()(_input(size))).sum().backward()


@pytest.mark.parametrize(
    "name, kwargs, refused",
    [("plainunet", {"width": 4, "max_width": 8, "stages": 3}, True), ("lunet", {"width": 2, "block": "nnunet"}, True),
     ("lunet", {"width": 2}, False), ("monai_unet", {"channels": (4, 8, 16, 32, 64), "norm": "BATCH"}, False)],
)
def test_instance_norm_bottlenecks_refuse_one_voxel(name: str, kwargs: dict[str, Any], refused: bool) -> None:
    model = create_model(name, IN_CHANNELS, NUM_CLASSES, **kwargs)
    size = tuple(model.size_divisor)
    if refused:
        with pytest.raises(ModelError, match=r"1 voxel\(s\) at the bottleneck .* smallest legal size is"):
            check_input_size(model, size)
    else:
        check_input_size(model, size)
    _runs_or_names_a_legal_size(model, size)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels, num_classes", [(0, 2), (1, 0), (1, -2), (1.5, 2), (True, 2), ("1", 2)])
def test_channel_and_class_counts_are_checked_for_every_model(name: str, in_channels: Any, num_classes: Any) -> None:
    """``create_model("lunet", 0, 3)`` built a model of empty convs; a negative class count was a
    RuntimeError from inside torch."""
    with pytest.raises(ModelError, match="must be a whole number >= 1"):
        create_model(name, in_channels, num_classes)


def test_check_input_rejects_wrong_rank() -> None:
    model = _build("lunet")
    with pytest.raises(ModelError, match=r"\(N, C, X, Y, Z\)"):
        check_input(model, (IN_CHANNELS, 32, 32, 32))
