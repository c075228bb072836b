"""The run folder module: a typed run read back, and the readers of runs free of the trainer.

A run folder is written here by hand (config, plan, dataset, an untrained checkpoint), as
`lightseg train` writes one, so the tests need no training.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightseg.data.dataset import DatasetSpec, read_dataset_json
from lightseg.data.plan import Plan, load_plan
from lightseg.data.synthetic import make_synthetic_dataset
from lightseg.errors import CheckpointError
from lightseg.io import write_json
from lightseg.models import create_model
from lightseg.run_folder import Run, checkpoint_path, load_run, read_config, sidecar_path
from lightseg.training.checkpoint import save_checkpoint
from lightseg.training.config import TrainConfig, resolve_config
from cache_helper import make_cache

SRC = Path(__file__).resolve().parent.parent / "src"
MODEL_KWARGS = {"width": 4, "levels": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run_folder")
    raw = make_synthetic_dataset(root / "raw", num_cases=2, shape=(16, 16, 16), num_classes=2)
    cache = make_cache(raw, root / "cache")
    spec = read_dataset_json(cache / "dataset.json")
    config, _ = resolve_config("lunet", spec, (16, 16, 16), {}, {"model_kwargs": MODEL_KWARGS})
    run = root / "run"
    run.mkdir()
    write_json(run / "config.json", config.to_json())
    for name in ("plan.json", "dataset.json"):
        shutil.copy(cache / name, run / name)
    torch.manual_seed(0)
    net = create_model("lunet", config.data.in_channels, config.data.num_classes, **MODEL_KWARGS)
    save_checkpoint(checkpoint_path(run, "final"), {"model": net.state_dict()})
    return run


def _imported_training_modules(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the ``lightseg.training`` modules it imported."""
    code += "\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if m.split('.')[:2] == ['lightseg', 'training'])))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_reading_packages_do_not_import_training():
    imported = _imported_training_modules(
        "import lightseg.inference, lightseg.inference.predictor, lightseg.inference.export, lightseg.inference.sliding\n"
        "import lightseg.inference.onnx_predictor, lightseg.evaluation, lightseg.evaluation.crossval\n"
        "import lightseg.benchmark.profile, lightseg.demo, lightseg.run_folder\n"
    )
    assert imported == []


def test_predicting_from_a_run_reads_only_the_config_schema(run, tmp_path):
    images = run.parent / "raw" / "imagesTr"
    imported = _imported_training_modules(
        "from lightseg.inference.predictor import predict\n"
        f"written = predict({str(images)!r}, {str(tmp_path / 'out')!r}, {str(run)!r}, progress=False)\n"
        "assert len(written) == 2, written\n"
    )
    # the run's schema (and the recipe table its recipe name is checked against); no trainer, loss, loader
    assert imported == ["lightseg.training", "lightseg.training.config", "lightseg.training.recipes"]


def test_load_run_returns_the_typed_run(run):
    loaded = load_run(run, "final")
    assert isinstance(loaded, Run) and isinstance(loaded.plan, Plan) and isinstance(loaded.spec, DatasetSpec)
    assert isinstance(loaded.config, TrainConfig) and loaded.config == read_config(run)
    assert loaded.plan == load_plan(run / "plan.json") and not loaded.model.training
    model, config, plan, spec = loaded  # still unpacks as the four parts
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, config.data.num_classes, 16, 16, 16)


def test_a_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: not a run folder .*lightseg train -o"):
        load_run(tmp_path)


def test_sidecar_sits_beside_the_onnx_file(tmp_path):
    assert sidecar_path(tmp_path / "model.onnx") == tmp_path / "model.onnx.json"
