"""Predict with an exported ``model.onnx`` + ``model.onnx.json`` through ONNX Runtime or OpenVINO, without torch.

The pipeline is :mod:`lightseg.inference.pipeline` (the one the PyTorch backend uses); the
network step is the sliding-window engine's NumPy executor (:mod:`lightseg.inference.window`)
around an ONNX Runtime session (here) or an OpenVINO compiled model
(:mod:`lightseg.inference.openvino_backend`); the sidecar is read here for both. Nothing
imported here needs torch: a deployment installs ``lightseg`` with numpy, scipy, nibabel, tqdm
and ``onnxruntime`` or ``openvino`` (``lightseg.data.preprocess``, ``lightseg.io`` and the
pipeline are torch-free).
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lightseg.allocator import reuse_freed_memory
from lightseg.data.dataset import parse_dataset_json
from lightseg.data.plan import parse_plan
from lightseg.environment import omp_threads
from lightseg.errors import PredictionError
from lightseg.inference.pipeline import Predictor, already_predicted, ensemble, predict_folder
from lightseg.inference.window import Network, NumpyExecutor, StageTimer, WindowSettings, sliding_window
from lightseg.run_folder import sidecar_path

SIDECAR_FORMAT = "lightseg-onnx"  # written by lightseg.inference.export (which needs torch)


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The sidecar of ``model.onnx`` (``model.onnx.json``), checked for the keys prediction needs."""
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise PredictionError(f"{path}: sidecar not found; export with `lightseg export RUN_DIR -o {Path(onnx_path).name}`, "
                              "which writes both files, and keep them side by side")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PredictionError(f"{path}: not valid JSON ({exc}); export the model again") from exc
    except RecursionError as exc:
        raise PredictionError(f"{path}: not valid JSON (nested too deeply); export the model again") from exc
    if not isinstance(meta, dict):
        raise PredictionError(f"{path}: not a lightseg ONNX sidecar (a JSON object is expected); export the model again")
    missing = {"format", "plan", "dataset", "patch_size", "label_values", "regions", "input_name", "output_name"} - set(meta)
    if missing:
        raise PredictionError(f"{path}: not a lightseg ONNX sidecar (missing {sorted(missing)}); export the model again")
    if meta["format"] != SIDECAR_FORMAT:
        raise PredictionError(f"{path}: not a lightseg ONNX sidecar (key 'format' is {meta['format']!r:.60}, "
                              f"not {SIDECAR_FORMAT!r}); export the model again")
    _check_sidecar_types(meta, path)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sidecar_types(meta: dict[str, Any], path: Path) -> None:
    """Each key of the sidecar with its type (those prediction reads are required); a wrong one is
    named. The plan and the data set inside are checked by their own parsers."""
    checks = {
        "patch_size": lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v),
        "in_channels": lambda v: _is_int(v) and v > 0,
        "label_values": lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and 0 <= x <= 255 for x in v),
        "regions": lambda v: v is None or (isinstance(v, list) and all(isinstance(r, list) and all(_is_int(x) for x in r) for r in v)),
        "input_name": lambda v: isinstance(v, str),
        "output_name": lambda v: isinstance(v, str),
        "plan": lambda v: isinstance(v, dict),
        "dataset": lambda v: isinstance(v, dict),
        "version": _is_int,
        "model": lambda v: isinstance(v, str),
        "model_kwargs": lambda v: isinstance(v, dict),
        "architecture": lambda v: v is None or isinstance(v, dict),
        "num_classes": lambda v: _is_int(v) and v > 0,
        "size_divisor": lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v),
        "opset": _is_int,
        "checked_max_difference": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "onnx_sha256": lambda v: isinstance(v, str) and len(v) == 64,
    }
    needed = {"patch_size", "in_channels", "label_values", "regions", "input_name", "output_name", "plan", "dataset"}
    for key, ok in checks.items():
        if (key in meta or key in needed) and not ok(meta.get(key)):
            raise PredictionError(f"{path}: key {key!r} has a wrong type or value ({meta.get(key)!r:.80}); "
                                  "export the model again")


def default_threads(threads: int | None) -> int:
    """``threads``, else ``OMP_NUM_THREADS`` if set, else 0 (the runtime's own choice)."""
    return threads or omp_threads() or 0


def onnx_session(onnx_path: str | Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session with all graph optimisations and ``threads`` intra-op threads
    (default: ``OMP_NUM_THREADS`` if set, else ONNX Runtime's own choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = default_threads(threads)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise PredictionError(f"{onnx_path}: ONNX Runtime cannot load it ({exc}); export the model again") from exc


def onnx_network(onnx_path: Path, meta: dict[str, Any], threads: int | None = None) -> Network:
    """``network(tiles)`` for the NumPy executor: ``onnx_path`` in an ONNX Runtime session."""
    session = onnx_session(onnx_path, threads)
    input_name, output_name = meta["input_name"], meta["output_name"]

    def network(tiles: np.ndarray) -> np.ndarray:
        (logits,) = session.run([output_name], {input_name: tiles.astype(np.float32, copy=False)})
        return logits

    return network


NetworkLoader = Callable[[Path, dict[str, Any]], Network]
"""``load(onnx_path, sidecar)``: the exported network, ready for :class:`NumpyExecutor`."""


def _check_pair(onnx_path: Path, meta: dict[str, Any]) -> None:
    """Refuse a model and a sidecar of different exports: the sidecar's labels, plan and
    normalisation would be applied to another network's outputs, silently (exports since the
    sidecar recorded ``onnx_sha256``)."""
    if "onnx_sha256" not in meta:
        return
    digest = hashlib.sha256()
    with open(onnx_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != meta["onnx_sha256"]:
        raise PredictionError(f"{onnx_path}: does not match its sidecar {sidecar_path(onnx_path)} (another export's "
                              "model, or changed since the export); keep the two files of one export together, or export again")


def _output_checked(network: Network, onnx_path: Path, meta: dict[str, Any]) -> Network:
    """``network`` refusing outputs of another channel count than the sidecar's labels or regions
    need: the backstop for sidecars without ``onnx_sha256``; the check costs nothing per tile."""
    expected = len(meta["regions"]) if meta["regions"] is not None else len(meta["label_values"])

    def checked(tiles: np.ndarray) -> np.ndarray:
        logits = network(tiles)
        if logits.ndim != 5 or logits.shape[1] != expected:
            raise PredictionError(f"{onnx_path}: the model gives {logits.shape[1] if logits.ndim > 1 else 'no'} output "
                                  f"channels, its sidecar {sidecar_path(onnx_path)} describes {expected}: they are of "
                                  "different exports; keep the two files of one export together, or export again")
        return logits

    return checked


def load_onnx_predictor(
    onnx_path: str | Path, step: float = 0.5, tta: bool = False, batch_tiles: int | None = None,
    threads: int | None = None, network: NetworkLoader | None = None,
) -> Predictor:
    """A :class:`~lightseg.inference.pipeline.Predictor` running ``onnx_path`` with its sidecar
    in the sliding-window engine's NumPy executor (``batch_tiles=None``:
    :func:`lightseg.inference.default_batch_tiles` for its tile). ``network`` loads the runtime:
    ONNX Runtime (:func:`onnx_network`, default) or OpenVINO
    (:func:`lightseg.inference.openvino_backend.openvino_loader`)."""
    reuse_freed_memory()  # blending buffers and tiles reuse freed memory (the runtimes have their own arenas)
    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        target = onnx_path.with_name(onnx_path.name + ".onnx")
        raise PredictionError(f"{onnx_path}: a folder, not an ONNX file; predict from a run folder with --backend torch, "
                              f"or export it first (`lightseg export {onnx_path} -o {target}`) and pass -m {target}")
    if not onnx_path.is_file():
        raise PredictionError(f"{onnx_path}: ONNX model not found; create it with `lightseg export RUN_DIR -o {onnx_path}`")
    meta = read_sidecar(onnx_path)
    _check_pair(onnx_path, meta)
    patch_size = tuple(int(p) for p in meta["patch_size"])
    settings = WindowSettings.build(patch_size, int(meta["in_channels"]), step, tta, batch_tiles)
    load = network or partial(onnx_network, threads=threads)
    return Predictor(
        logits=partial(sliding_window, NumpyExecutor(_output_checked(load(onnx_path, meta), onnx_path, meta)), settings),
        plan=parse_plan(meta["plan"], f"{onnx_path}.json: plan"),
        spec=parse_dataset_json(meta["dataset"], f"{onnx_path}.json: dataset"),
        label_values=tuple(int(v) for v in meta["label_values"]),
        regions=meta["regions"] is not None,
        patch_size=patch_size,  # type: ignore[arg-type]
    )


def predict_onnx(
    images_dir: str | Path,
    output_dir: str | Path,
    onnx_path: str | Path | Sequence[str | Path],
    step: float = 0.5,
    tta: bool = False,
    save_probabilities: bool = False,
    batch_tiles: int | None = None,
    progress: bool = True,
    timer: StageTimer | None = None,
    threads: int | None = None,
    part: tuple[int, int] = (0, 1),
    backend: str = "onnx",
    precision: str = "fp32",
) -> list[Path]:
    """:func:`lightseg.inference.predictor.predict` with exported models instead of run folders
    (several: an ensemble), in ONNX Runtime (``backend="onnx"``, fp32) or OpenVINO (``"openvino"``,
    ``precision`` fp32 or a checked bf16: :mod:`lightseg.inference.openvino_backend`).

    A rerun where every case is done returns before the session is built (that takes seconds).
    """
    if backend == "openvino":
        from lightseg.inference.openvino_backend import PRECISIONS, openvino_loader

        if precision not in PRECISIONS:
            raise PredictionError(f"--backend openvino runs --precision {' or '.join(PRECISIONS)}, not {precision!r}")
        load: NetworkLoader = openvino_loader(precision, threads)
    elif backend == "onnx" and precision == "fp32":
        load = partial(onnx_network, threads=threads)
    else:
        raise PredictionError(f"backend {backend!r} at --precision {precision!r}: exported models run in 'onnx' "
                              "(ONNX Runtime, fp32) or 'openvino' (fp32, or bf16 after a check against fp32)")
    paths = [onnx_path] if isinstance(onnx_path, (str, Path)) else list(onnx_path)
    if sidecar_path(paths[0]).is_file():
        spec = parse_dataset_json(read_sidecar(paths[0])["dataset"], f"{paths[0]}.json: dataset")
        if already_predicted(images_dir, output_dir, spec, save_probabilities, part, progress):
            return []
    members = [load_onnx_predictor(path, step, tta, batch_tiles, network=load) for path in paths]
    predictor = members[0] if len(members) == 1 else ensemble(members, [str(p) for p in paths])
    return predict_folder(predictor, images_dir, output_dir, save_probabilities, progress, timer, part)
