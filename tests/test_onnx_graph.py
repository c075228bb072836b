"""The exported graph's softmax rewrite: same numbers, no channel Softmax left, every opset form."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lightseg.inference.export import onnx_bytes
from lightseg.inference.onnx_graph import decompose_channel_softmax


class ChannelGate(torch.nn.Module):
    """A channel softmax over a 5-D map, one over the last axis (left alone), and a sum of both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x * 3.0, dim=1) * x + torch.softmax(x, dim=-1)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_channel_softmax_is_rewritten_exactly(opset):
    model = ChannelGate().eval()
    x = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 20  # large: needs the max shift
    data = onnx_bytes(model, x, opset)
    graph = onnx.load_from_string(data).graph
    softmax_axes = [a.i for n in graph.node if n.op_type == "Softmax" for a in n.attribute if a.name == "axis"]
    assert 1 not in softmax_axes and len(softmax_axes) == 1  # the last-axis one stays a Softmax
    assert sum(n.op_type == "Exp" for n in graph.node) == 1
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    (out,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_graph_without_channel_softmax_is_returned_unchanged():
    data = onnx_bytes(torch.nn.Conv3d(1, 2, 1).eval(), torch.randn(1, 1, 2, 2, 2))
    assert decompose_channel_softmax(data) == data
