"""The one sliding-window engine: settings checked once, nnU-Net's grid, MONAI's Gaussian and
blend, and the torch and NumPy (ONNX Runtime) executors giving the same logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from lightseg.errors import PredictionError
from lightseg.inference.export import onnx_bytes
from lightseg.inference.onnx_predictor import onnx_network
from lightseg.inference.sliding import TorchExecutor
from lightseg.inference.window import (
    NumpyExecutor,
    StageTimer,
    WindowSettings,
    gaussian_importance,
    sliding_window,
    tile_starts,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 1)).eval()


def _numpy_network(net: nn.Module):
    def network(tiles: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(tiles)).numpy()

    return network


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"tile": (8, 8)}, "tile"),
        ({"tile": (8, 0, 8)}, "tile"),
        ({"tile": (8, 8.5, 8)}, "tile"),
        ({"step": 0.0}, "step"),
        ({"step": 1.5}, "step"),
        ({"step": float("nan")}, "step"),
        ({"sigma_scale": 0.0}, "sigma_scale"),
        ({"sigma_scale": -1.0}, "sigma_scale"),
        ({"mirror_axes": (3,)}, "mirror_axes"),
        ({"mirror_axes": (0, 0)}, "mirror_axes"),
        ({"tiles_per_call": 0}, "tiles_per_call"),
        ({"tiles_per_call": 2.0}, "tiles_per_call"),
        ({"device": "gpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
    ],
)
def test_settings_refuse_bad_values_naming_them(changes, named):
    fields = {"tile": (8, 8, 8), **changes}
    with pytest.raises(PredictionError, match=f"sliding window: {named}"):
        WindowSettings(**fields)


def test_settings_build_the_predict_defaults():
    settings = WindowSettings.build([32, 32, 32], 1, tta=True, device="cuda:1")
    assert settings == WindowSettings((32, 32, 32), 0.5, 0.125, (0, 1, 2), 4, "cuda:1")
    assert len(settings.flips) == 8 and settings.flips[0] == ()
    assert WindowSettings.build((128, 128, 128), 4).tiles_per_call == 1
    assert WindowSettings((8, 8, 8), mirror_axes=(2, 0)).flips == [(), (2,), (4,), (2, 4)]
    with pytest.raises(PredictionError, match="step"):
        WindowSettings.build((8, 8, 8), 1, step=2.0)


def nnunet_steps(size: int, tile: int, step: float) -> list[int]:
    """nnU-Net v2's ``compute_steps_for_sliding_window`` along one axis, written from its definition."""
    target = tile * step
    num_steps = int(np.ceil((size - tile) / target)) + 1
    max_start = size - tile
    actual = max_start / (num_steps - 1) if num_steps > 1 else 99999999999
    return [int(np.round(actual * i)) for i in range(num_steps)]


@pytest.mark.parametrize("step", [0.25, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("tile", [1, 7, 16, 96, 128])
def test_tile_grid_is_nnunets(tile, step):
    for size in range(tile, tile * 4 + 3):
        starts = tile_starts(size, tile, step)
        assert starts == nnunet_steps(size, tile, step), (size, tile, step)
        assert len(starts) == math.ceil((size - tile) / (tile * step)) + 1
        assert starts[0] == 0 and starts[-1] == size - tile
        gaps = np.diff(starts)
        assert len(gaps) == 0 or (gaps.max() - gaps.min() <= 1 and gaps.max() <= math.ceil(tile * step))


def test_the_engine_runs_exactly_the_grids_tiles():
    seen = []

    def network(tiles: np.ndarray) -> np.ndarray:
        seen.extend(tiles[:, 0, 0, 0, 0].tolist())
        return np.zeros((len(tiles), 1, *tiles.shape[2:]), np.float32)

    image = np.zeros((1, 40, 8, 19), np.float32)
    image[0, :, 0, :] = np.arange(40)[:, None] * 100 + np.arange(19)[None, :]
    sliding_window(NumpyExecutor(network), WindowSettings((16, 8, 8), 0.5, tiles_per_call=3), image)
    expected = [x * 100 + z for x in nnunet_steps(40, 16, 0.5) for z in nnunet_steps(19, 8, 0.5)]
    assert sorted(seen) == sorted(expected)


def test_tiles_of_a_fortran_ordered_image_reach_the_executor_in_c_order():
    """NIfTI arrays and resampling leave images Fortran-ordered; tiles cut from them in that order
    make every executor's layout conversion a slow transpose per tile."""
    layouts = []

    def network(tiles: np.ndarray) -> np.ndarray:
        layouts.append(tiles.flags.c_contiguous)
        return tiles[:, :1] * 2

    image = np.asfortranarray(np.random.default_rng(0).random((2, 20, 12, 9), np.float32))
    logits = sliding_window(NumpyExecutor(network), WindowSettings((8, 8, 8), 0.5), image)
    assert layouts and all(layouts)
    np.testing.assert_allclose(logits[0], image[0] * 2, rtol=1e-6)


@pytest.mark.parametrize("tile", [(8, 8, 8), (6, 10, 4)])
def test_gaussian_importance_is_monais(tile):
    expected = compute_importance_map(tile, mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_allclose(gaussian_importance(tile), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "shape, tile, step, tta, batch",
    [((20, 16, 8), (8, 8, 8), 0.5, False, 1), ((5, 12, 8), (8, 8, 8), 0.5, True, 3), ((8, 8, 8), (8, 8, 8), 0.5, False, 2)],
)
def test_blend_equals_monais_where_the_grids_agree(shape, tile, step, tta, batch):
    """Shapes where MONAI's grid (every int(step * tile), the last flush) is nnU-Net's: the
    Gaussian blend, padding and mirroring then give MONAI's logits."""
    net = _net()
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)

    def torch_network(tiles: torch.Tensor) -> torch.Tensor:
        axes = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [()]
        return sum(torch.flip(net(torch.flip(tiles, a)), a) for a in axes) / len(axes)

    timer = StageTimer()
    settings = WindowSettings.build(tile, 2, step, tta, batch)
    actual = sliding_window(NumpyExecutor(_numpy_network(net)), settings, image, timer)
    with torch.inference_mode():
        expected = sliding_window_inference(
            torch.from_numpy(image)[None], tile, batch, torch_network, overlap=1 - step, mode="gaussian",
            sigma_scale=0.125, padding_mode="constant", cval=0.0,
        )[0].numpy()  # fmt: skip
    assert actual.shape == expected.shape == (3, *shape)
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    assert timer.seconds["network"] > 0


@pytest.mark.parametrize("shape, tta, batch", [((21, 13, 9), False, 1), ((5, 17, 11), True, 3)])
def test_torch_and_onnx_executors_give_the_same_logits(tmp_path, shape, tta, batch):
    """One model, exported to ONNX: the torch executor and the NumPy executor on ONNX Runtime
    blend the same logits (grids that are not MONAI's, padding and mirroring included)."""
    pytest.importorskip("onnxruntime")
    net = _net()
    path = tmp_path / "tiny.onnx"
    path.write_bytes(onnx_bytes(net, torch.zeros(1, 2, 8, 8, 8)))
    network = onnx_network(path, {"input_name": "image", "output_name": "logits"}, threads=1)
    settings = WindowSettings.build((8, 8, 8), 2, 0.4, tta, batch)
    image = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    from_torch = sliding_window(TorchExecutor(net, settings, out_channels=3), settings, image)
    from_onnx = sliding_window(NumpyExecutor(network), settings, image)
    assert from_torch.shape == from_onnx.shape == (3, *shape) and from_torch.dtype == np.float32
    assert from_torch.std() > 0.01
    np.testing.assert_allclose(from_onnx, from_torch, atol=1e-5)
