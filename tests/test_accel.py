"""The accelerator's one equivalence test: for every registered model, the accelerated model (what
``lightseg predict`` runs on the CPU) computes what the plain model computes, from the same state
dict, in both memory layouts, and labels a real demo case the same; plus its switch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_model_contract import IN_CHANNELS, MODELS, _build, _config, _input, _sizes

from lightseg.accel import accelerate
from lightseg.data.demo import demo_case, load_template
from lightseg.device import prefers_channels_last
from lightseg.models import create_model, list_models

CL = torch.channels_last_3d
DEMO_SIZE = (64, 64, 64)  # a multiple of every model's size divisor but UNETR's (fixed 32^3)


def _pair(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    return model.eval(), accelerate(copy.deepcopy(model).eval())


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("name", MODELS)
def test_accelerated_model_equals_the_plain_one(name: str, layout: torch.memory_format) -> None:
    """Same parameter names and values; outputs within float tolerance of the plain model's
    (run contiguous, where PyTorch's own group norm is accurate), for a batch of one (scales
    folded) and of two."""
    plain, fast = _pair(_build(name))
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    fast = fast.to(memory_format=layout)
    size = _sizes(name, plain)[0]
    for batch in (1, 2):
        x = _input(size, batch=batch, seed=batch)
        with torch.inference_mode():
            expected = plain(x)
            got = fast(x.contiguous(memory_format=layout))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs", [{"use_router": False}, {"shared_controller": False}, {"use_anchors": False, "use_lspm": False}],
    ids=["unrouted", "two-controllers", "no-anchors-no-lspm"],
)
def test_accelerated_lightmedseg_variants_equal_the_plain_one(kwargs: dict) -> None:
    """LightMedSeg's ablation switches change which forms run (the skips' composed convs only when
    routed, one controller per target or a shared one; no position terms): outputs still equal
    the plain model's, batch of one and two, in channels_last_3d."""
    torch.manual_seed(0)
    plain, fast = _pair(create_model("lightmedseg", IN_CHANNELS, 3, widths=(8, 8, 16, 16), router_width=16, **kwargs))
    fast = fast.to(memory_format=CL)
    for batch in (1, 2):
        x = _input((32, 32, 32), batch=batch, seed=batch)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x.contiguous(memory_format=CL)), plain(x), atol=1e-4, rtol=1e-4)


def _demo_image(size: tuple[int, int, int]) -> torch.Tensor:
    """A demo case (lightseg.data.demo, 2 mm), z-scored, centre-cropped or padded to ``size``."""
    image, _, _ = demo_case(load_template(), index=0, seed=0, spacing=2.0)
    image = image.astype(np.float32)
    image = (image - image.mean()) / image.std()
    out = np.zeros(size, np.float32)
    src = [slice(max(0, (n - s) // 2), max(0, (n - s) // 2) + min(n, s)) for n, s in zip(image.shape, size)]
    dst = [slice(max(0, (s - n) // 2), max(0, (s - n) // 2) + min(n, s)) for n, s in zip(image.shape, size)]
    out[tuple(dst)] = image[tuple(src)]
    return torch.from_numpy(out)[None, None]


@pytest.mark.parametrize("name", MODELS)
def test_accelerated_model_labels_a_demo_case_as_the_plain_one(name: str) -> None:
    """The labels (argmax) of a real demo case: plain, contiguous, against accelerated, in the
    layout ``predict`` picks; LightMedSeg at its full width. Agreement at least 99.99%."""
    kwargs = {} if name == "lightmedseg" else _config(name).get("kwargs", {})
    torch.manual_seed(0)
    plain, fast = _pair(create_model(name, 1, 4, **kwargs))
    size = (32, 32, 32) if name == "unetr" else DEMO_SIZE
    x = _demo_image(size)
    layout = CL if prefers_channels_last(fast) else torch.contiguous_format
    fast = fast.to(memory_format=layout)
    with torch.inference_mode():
        expected = plain(x).argmax(1)
        got = fast(x.contiguous(memory_format=layout)).argmax(1)
    agreement = (got == expected).double().mean().item()
    print(f"{name}: label agreement {agreement:.6f} on {got.numel()} voxels")
    assert agreement >= 0.9999


def test_switch_off_leaves_the_model_plain_and_contiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LIGHTSEG_ACCEL=0``: no module swapped; a model with group norms is marked to run in the
    contiguous layout (PyTorch's group norm is accurate there only). Off the CPU: untouched."""
    monkeypatch.setenv("LIGHTSEG_ACCEL", "0")
    model = create_model("lightmedseg", 1, 2)
    types = [type(m) for m in model.modules()]
    assert accelerate(model) is model
    assert [type(m) for m in model.modules()] == types
    assert not prefers_channels_last(model)
    monkeypatch.delenv("LIGHTSEG_ACCEL")
    assert [type(m) for m in accelerate(create_model("lightmedseg", 1, 2), "cuda").modules()] == types
    fast = accelerate(create_model("lightmedseg", 1, 2))
    assert [type(m) for m in fast.modules()] != types and prefers_channels_last(fast)


def test_every_registered_model_is_covered() -> None:
    assert {getattr(p, "values", [p])[0] for p in MODELS} == set(list_models())
