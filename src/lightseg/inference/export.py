"""Export a run folder to ONNX with a JSON sidecar: the pair a torch-free deployment predicts from.

``export_run(RUN_DIR, "model.onnx")`` rebuilds the run's model (:func:`load_run`, which also
rebuilds a pruned PSP-Seg from ``architecture.json``), exports it with PyTorch's TorchScript
exporter (it needs no package beyond ``onnx``) for tiles of the training patch size with a
dynamic batch axis, checks the file with ``onnx.checker`` and compares ONNX Runtime with PyTorch
on a random tile (maximum absolute difference at most ``tolerance``, 1e-4 by default). A failed
check is a :class:`ModelError` and leaves no file behind.

The sidecar ``model.onnx.json`` (the ONNX file's name plus ``.json``) holds everything
prediction needs, so the ONNX file is never read for metadata: the model name and arguments,
input channels and classes, the patch size and size divisor, ``label_values`` and whether the
outputs are sigmoid regions, the run's whole ``plan.json`` (spacing, normalisation, cropping)
and ``dataset.json`` (channel names, labels and regions, ``regions_class_order``, file ending).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightseg.errors import ModelError, OutputError
from lightseg.inference.onnx_graph import decompose_channel_softmax
from lightseg.inference.onnx_predictor import SIDECAR_FORMAT
from lightseg.io import atomic_write, check_output_file, write_json
from lightseg.run_folder import DATASET_FILE, load_run, read_architecture, sidecar_path

SIDECAR_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "image", "logits"
OPSET = 17


def onnx_bytes(model: torch.nn.Module, example: torch.Tensor, opset: int = OPSET) -> bytes:
    """The model as ONNX bytes (TorchScript exporter, dynamic batch axis), traced on ``example``,
    with channel softmaxes in the form ONNX Runtime runs fast (:mod:`lightseg.inference.onnx_graph`)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )  # fmt: skip
    return decompose_channel_softmax(buffer.getvalue())


def check_onnx(data: bytes, model: torch.nn.Module, example: torch.Tensor, tolerance: float = 1e-4) -> float:
    """Run ``onnx.checker`` and compare ONNX Runtime with PyTorch on ``example``; returns the
    maximum absolute difference, or raises :class:`ModelError` when it exceeds ``tolerance``."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the exported ONNX graph is invalid ({exc})") from exc
    with torch.inference_mode():
        expected = model(example).float().numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})
    difference = float(np.abs(actual - expected).max()) if actual.shape == expected.shape else float("inf")
    if not difference <= tolerance:
        raise ModelError(
            f"ONNX Runtime and PyTorch disagree on a random input (max |difference| {difference:.3g} > {tolerance}, "
            f"shapes {actual.shape} vs {expected.shape}); the export is not usable, report this model"
        )
    return difference


def check_export_target(output: Path) -> None:
    """Refuse a target that does not end in ``.onnx``, or that (or its sidecar) is a folder, a link or
    a special file, before any work. The suffix rule means an export can never overwrite a run's
    own files (``-o RUN/checkpoint_final.pth`` replaced the checkpoint with ONNX bytes), and it
    is what ``lightseg predict`` uses to pick the ONNX backend."""
    if output.suffix != ".onnx":
        raise OutputError(f"{output}: an ONNX export must be named *.onnx (for example {output.with_suffix('.onnx')}); "
                          "this also keeps it from overwriting a run's checkpoints or JSON files")
    check_output_file(output)
    check_output_file(sidecar_path(output))


def export_run(
    run_dir: str | Path, output: str | Path, checkpoint: str = "final", tolerance: float = 1e-4, opset: int = OPSET
) -> tuple[Path, Path, float]:
    """Write ``output`` (ONNX) and its sidecar for a run folder's model; returns both paths and
    the checked maximum difference to PyTorch."""
    run_dir, output = Path(run_dir), Path(output)
    check_export_target(output)
    model, config, plan, _ = load_run(run_dir, checkpoint, "cpu")
    model = model.float().eval()
    example = torch.randn((1, config.data.in_channels, *config.data.patch_size), generator=torch.Generator().manual_seed(0))
    data = onnx_bytes(model, example, opset)
    difference = check_onnx(data, model, example, tolerance)
    meta: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "model": config.model.name,
        "model_kwargs": config.model.kwargs,
        "architecture": read_architecture(run_dir),
        "in_channels": config.data.in_channels,
        "num_classes": config.data.num_classes,
        "patch_size": list(config.data.patch_size),
        "size_divisor": [int(d) for d in model.size_divisor],
        "label_values": list(config.data.label_values),
        "regions": [list(r) for r in config.data.regions] if config.data.regions is not None else None,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "opset": opset,
        "checked_max_difference": difference,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),  # predict refuses a model of another export
        "plan": plan.to_json(),
        "dataset": json.loads((run_dir / DATASET_FILE).read_text()),
    }  # fmt: skip
    with atomic_write(output, "wb") as handle:
        handle.write(data)
    write_json(sidecar_path(output), meta)
    return output, sidecar_path(output), difference
