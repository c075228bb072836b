"""Run an exported ``model.onnx`` (with its sidecar) in OpenVINO, without torch.

``lightseg predict --backend openvino`` reads the same pair as ``--backend onnx``: the sidecar,
the pipeline and the sliding-window engine are shared (:func:`lightseg.inference.onnx_predictor.
load_onnx_predictor`); only the network call differs. OpenVINO reads the ONNX file itself and
compiles it for the CPU.

Precision: fp32 by default, set explicitly (``INFERENCE_PRECISION_HINT`` f32), because on CPUs
with bf16 units (AVX512-BF16, AMX) OpenVINO would otherwise pick bf16 on its own. ``bf16`` only
on request (``--precision bf16``), and only after a check: the export's example input (a tile of
the training patch size drawn from N(0, 1), seed 0: the distribution of z-scored intensities) is
run at fp32 and at bf16, the share of voxels whose decision (argmax class, or each region's
sign) agrees is reported, and prediction is refused below :data:`MIN_AGREEMENT`. On a CPU
without bf16 units OpenVINO runs fp32 anyway; the report names the precision that runs.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lightseg.errors import PredictionError
from lightseg.inference.onnx_predictor import NetworkLoader, default_threads
from lightseg.inference.window import Network

OPENVINO_PIN = "openvino==2026.4.1"
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
"""``--precision`` of the OpenVINO backend and its ``INFERENCE_PRECISION_HINT``."""
MIN_AGREEMENT = 0.99
"""Smallest share of the example tile's voxels whose label must agree with fp32. A network
whose decisions flip on more than 1 % of voxels at reduced precision would shift Dice by about
as much, more than the differences between the models compared in docs/results.md."""


def import_openvino() -> Any:
    """The ``openvino`` module, or a :class:`PredictionError` with the command that installs it."""
    try:
        import openvino
    except ImportError as exc:
        raise PredictionError(
            f"--backend openvino needs the openvino package, which is not installed ({exc}); install it with "
            f"`pip install 'lightseg[openvino]'` (or `pip install {OPENVINO_PIN}`), or use --backend onnx"
        ) from exc
    return openvino


@functools.cache
def _core() -> Any:
    """The process's one OpenVINO ``Core``.

    Why one: each Core's CPU plugin gives the thread an alternate signal stack of its own and
    puts back the one before it when the Core is destroyed. Cores destroyed in another order
    than made (the fp32 reference and the bf16 network of :func:`openvino_loader`, freed as a
    frame's locals are) left the thread on a freed stack, and the next signal a Python handler
    takes (Ctrl-C, a DataLoader's SIGCHLD) killed the process with a segfault."""
    return import_openvino().Core()


def compile_network(onnx_path: Path, meta: dict[str, Any], precision: str = "fp32", threads: int | None = None) -> tuple[Network, str]:
    """``network(tiles)`` running ``onnx_path`` on the CPU at ``precision`` (a key of
    :data:`PRECISIONS`), and the inference precision OpenVINO reports it runs."""
    if precision not in PRECISIONS:
        raise PredictionError(f"--backend openvino runs --precision {' or '.join(PRECISIONS)}, not {precision!r}")
    core = _core()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads := default_threads(threads):
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        output = compiled.output(meta["output_name"])
    except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses
        raise PredictionError(f"{onnx_path}: OpenVINO cannot load it ({exc}); export the model again") from exc
    request = compiled.create_infer_request()
    input_name = meta["input_name"]

    def network(tiles: np.ndarray) -> np.ndarray:
        return request.infer({input_name: tiles.astype(np.float32, copy=False)})[output]  # a copy (share_outputs=False)

    return network, compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def example_input(meta: dict[str, Any]) -> np.ndarray:
    """A stand-in for the export's example input: one tile of the patch size, NumPy's N(0, 1), seed 0."""
    shape = (1, int(meta["in_channels"]), *(int(p) for p in meta["patch_size"]))
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def label_agreement(reference: Network, candidate: Network, example: np.ndarray, regions: bool) -> float:
    """Share of voxel decisions (argmax class; sign of each region) where ``candidate`` agrees with ``reference``."""
    first, second = reference(example), candidate(example)
    decide: Callable[[np.ndarray], np.ndarray] = (lambda x: x > 0) if regions else (lambda x: x.argmax(1))
    return float(np.mean(decide(first) == decide(second)))


def openvino_loader(precision: str = "fp32", threads: int | None = None) -> NetworkLoader:
    """A loader for :func:`~lightseg.inference.onnx_predictor.load_onnx_predictor`; a reduced
    ``precision`` is checked against fp32 first (reported on stderr, refused below :data:`MIN_AGREEMENT`)."""

    def load(onnx_path: Path, meta: dict[str, Any]) -> Network:
        network, runs_as = compile_network(onnx_path, meta, precision, threads)
        if precision == "fp32":
            return network
        reference, _ = compile_network(onnx_path, meta, "fp32", threads)
        agreement = label_agreement(reference, network, example_input(meta), meta["regions"] is not None)
        print(f"{onnx_path}: OpenVINO --precision {precision} (runs as {runs_as}) agrees with fp32 on {agreement:.2%} "
              f"of the example tile's voxel labels (at least {MIN_AGREEMENT:.0%} required)", file=sys.stderr)
        if agreement < MIN_AGREEMENT:
            raise PredictionError(f"{onnx_path}: at --precision {precision} OpenVINO agrees with fp32 on only {agreement:.2%} "
                                  f"of the example tile's voxel labels (at least {MIN_AGREEMENT:.0%} required); "
                                  "predict with --precision fp32")
        return network

    return load
