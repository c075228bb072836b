"""`lightseg export RUN_DIR -o model.onnx`: every registered model (pruned PSP-Seg included) through
a run folder and the CLI, checked against PyTorch on fresh inputs with ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_model_contract import MODELS, _build, _sizes

from lightseg.cli import main
from lightseg.data.dataset import parse_dataset_json
from lightseg.data.plan import ChannelNormalization, Plan, save_plan
from lightseg.io import write_json
from lightseg.models import create_model
from lightseg.run_folder import load_run
from lightseg.training.checkpoint import save_checkpoint
from lightseg.training.config import resolve_config

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DATASET = {
    "name": "export test",
    "channel_names": {"0": "T1", "1": "FLAIR"},
    "labels": {"background": 0, "a": 1, "b": 2},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def make_run(run: Path, model: str, kwargs: dict[str, Any], patch: tuple[int, int, int],
             architecture: dict[str, list[int]] | None = None, dataset: dict[str, Any] = DATASET) -> Path:
    """A run folder as `lightseg train` writes it (random weights): 1 mm, z-score, crop to nonzero."""
    spec = parse_dataset_json(dataset)
    plan = Plan(dataset_name=dataset["name"], channel_names=spec.channel_names, label_values=spec.label_values,
                target_spacing=(1.0, 1.0, 1.0), patch_size=patch,
                normalization=tuple(ChannelNormalization("zscore") for _ in spec.channel_names), crop_to_nonzero=True)
    config, _ = resolve_config(model, spec, patch, {}, {"model_kwargs": kwargs})
    run.mkdir(parents=True)
    write_json(run / "dataset.json", dataset)
    save_plan(plan, run / "plan.json")
    write_json(run / "config.json", config.to_json())
    extra = {"architecture": architecture} if architecture is not None else {}
    if architecture is not None:
        write_json(run / "architecture.json", architecture)
    torch.manual_seed(0)
    net = create_model(model, config.data.in_channels, config.data.num_classes, **kwargs, **extra)
    save_checkpoint(run / "checkpoint_final.pth", {"model": net.state_dict()})
    return run


def _run_kwargs(name: str) -> tuple[dict[str, Any], tuple[int, int, int]]:
    from test_model_contract import _config

    return dict(_config(name).get("kwargs", {})), tuple(_sizes(name, _build(name))[0])


def _assert_onnx_matches_run(onnx_path: Path, run: Path, batch: int = 2) -> dict[str, Any]:
    meta = json.loads(Path(f"{onnx_path}.json").read_text())
    model, config, _, _ = load_run(run)
    x = torch.randn((batch, config.data.in_channels, *config.data.patch_size), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = model(x).numpy()
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run([meta["output_name"]], {meta["input_name"]: x.numpy()})
    assert actual.shape == expected.shape == (batch, 3, *config.data.patch_size)
    assert np.abs(actual - expected).max() <= 1e-4
    return meta


@pytest.mark.parametrize("name", MODELS)
def test_every_model_exports_from_a_run_folder(tmp_path, name):
    kwargs, patch = _run_kwargs(name)
    run = make_run(tmp_path / "run", name, kwargs, patch)
    out = tmp_path / "deploy" / "model.onnx"
    assert main(["export", str(run), "-o", str(out)]) == 0
    meta = _assert_onnx_matches_run(out, run)  # batch 2: the batch axis is dynamic
    assert meta["model"] == name and meta["model_kwargs"] == json.loads(json.dumps(kwargs)) and meta["architecture"] is None
    assert tuple(meta["patch_size"]) == patch and meta["in_channels"] == 2 and meta["num_classes"] == 3
    assert meta["label_values"] == [0, 1, 2] and meta["regions"] is None
    assert meta["plan"] == json.loads((run / "plan.json").read_text())
    assert meta["dataset"] == DATASET
    assert all(p % d == 0 for p, d in zip(patch, meta["size_divisor"]))


def test_pruned_pspseg_exports_its_pruned_architecture(tmp_path):
    kwargs, patch = _run_kwargs("pspseg")
    full = create_model("pspseg", 2, 3, **kwargs).architecture()
    pruned = {module: branches[::2] for module, branches in full.items()}  # every other branch removed
    run = make_run(tmp_path / "run", "pspseg", kwargs, patch, architecture=pruned)
    out = tmp_path / "pruned.onnx"
    assert main(["export", str(run), "-o", str(out)]) == 0
    meta = _assert_onnx_matches_run(out, run)
    assert meta["architecture"] == pruned
    full_run = make_run(tmp_path / "full", "pspseg", kwargs, patch)
    assert main(["export", str(full_run), "-o", str(tmp_path / "full.onnx")]) == 0
    initializers = lambda path: sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)  # noqa: E731
    assert initializers(out) < initializers(tmp_path / "full.onnx")  # removed branches are gone from the graph


def test_export_errors_are_clear(tmp_path, capsys):
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.json").exists()
