"""`lightseg predict --backend onnx`: the ONNX pipeline equals the PyTorch one, and it runs in a
process where torch cannot be imported (the engine's own tests: tests/test_window_engine.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from test_export import DATASET, make_run

from lightseg.cli import main
from lightseg.errors import PredictionError
from lightseg.inference.onnx_predictor import predict_onnx
from lightseg.inference.window import logits_to_probabilities

pytest.importorskip("onnxruntime")

SRC = Path(__file__).resolve().parent.parent / "src"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 1)).eval()



def _predict_without_torch(backend: str, deployed: Path, out: Path, *extra: str) -> None:
    """``lightseg predict --backend BACKEND`` on the exported pair in a process where `import torch`
    (and MONAI) fails; asserts it succeeded and never imported torch."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['monai'] = None\n"
        "from lightseg.cli import main\n"
        f"code = main(['predict', '--backend', {backend!r}, '-i', {str(deployed / 'in')!r}, '-o', {str(out)!r}, "
        f"'-m', {str(deployed / 'model.onnx')!r}, *{list(extra)!r}])\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
        "raise SystemExit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr

def test_probabilities_match_torch():
    logits = np.random.default_rng(1).normal(size=(3, 20, 4, 5)).astype(np.float32) * 5
    np.testing.assert_allclose(logits_to_probabilities(logits.copy(), False), torch.softmax(torch.from_numpy(logits), 0), atol=1e-6)
    np.testing.assert_allclose(logits_to_probabilities(logits.copy(), True), torch.sigmoid(torch.from_numpy(logits)), atol=1e-6)


def _write_case(folder: Path, name: str, shape=(30, 26, 20)) -> None:
    """Two channels of positive noise in an inner box (cropped by the plan), zero outside."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for c in range(2):
        data = np.zeros(shape, np.float32)
        data[3:-3, 2:-2, 2:-2] = rng.uniform(1, 100, (shape[0] - 6, shape[1] - 4, shape[2] - 4))
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}_{c:04d}.nii.gz")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A LightMedSeg run, its export, one scan, and the PyTorch backend's prediction of it."""
    root = tmp_path_factory.mktemp("onnx")
    run = make_run(root / "run", "lightmedseg", {}, (16, 16, 16))
    assert main(["export", str(run), "-o", str(root / "model.onnx")]) == 0
    _write_case(root / "in", "a")
    torch_out = root / "torch_out"
    assert main(["predict", "-i", str(root / "in"), "-o", str(torch_out), "-m", str(run), "--device", "cpu",
                 "--save-probabilities"]) == 0
    return root


def test_onnx_backend_equals_torch_backend(deployed, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "-i", str(deployed / "in"), "-o", str(out), "-m", str(deployed / "model.onnx"),
                 "--save-probabilities"]) == 0  # backend chosen from the .onnx suffix
    reference = deployed / "torch_out"
    labels = np.asarray(nib.load(out / "a.nii.gz").dataobj)
    expected = np.asarray(nib.load(reference / "a.nii.gz").dataobj)
    assert labels.dtype == np.uint8 and labels.shape == (30, 26, 20)
    assert np.array_equal(nib.load(out / "a.nii.gz").affine, nib.load(reference / "a.nii.gz").affine)
    assert (labels != expected).mean() < 1e-3  # only exact ties could differ
    probs = np.load(out / "a.npz", allow_pickle=False)["probabilities"].astype(np.float32)
    ref_probs = np.load(reference / "a.npz", allow_pickle=False)["probabilities"].astype(np.float32)
    assert len(np.unique(expected)) > 1
    np.testing.assert_allclose(probs, ref_probs, atol=2e-3)  # float16 files


def test_onnx_backend_runs_without_torch(deployed, tmp_path):
    """A process in which `import torch` (and MONAI) fails predicts from the exported pair."""
    out = tmp_path / "out"
    _predict_without_torch("onnx", deployed, out)
    labels = np.asarray(nib.load(out / "a.nii.gz").dataobj)
    assert (labels != np.asarray(nib.load(deployed / "torch_out" / "a.nii.gz").dataobj)).mean() < 1e-3


def test_missing_sidecar_is_a_clear_error(deployed, tmp_path):
    lone = tmp_path / "lone.onnx"
    lone.write_bytes((deployed / "model.onnx").read_bytes())
    with pytest.raises(PredictionError, match="sidecar not found"):
        predict_onnx(deployed / "in", tmp_path / "out", lone, progress=False)
    assert main(["predict", "--backend", "onnx", "-i", str(deployed / "in"), "-o", str(tmp_path / "o"), "-m", str(lone)]) == 1


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_a_model_and_a_sidecar_of_different_exports_are_refused(deployed, tmp_path, backend):
    """Another export's model beside this sidecar predicted with exit 0 (the sidecar's labels put on
    the other network's outputs); an older sidecar without the hash is caught by its output count."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    other = make_run(tmp_path / "other", "lunet", {"width": 2, "levels": 2}, (16, 16, 16))
    assert main(["export", str(other), "-o", str(tmp_path / "other.onnx")]) == 0
    mixed = tmp_path / "mixed.onnx"
    mixed.write_bytes((tmp_path / "other.onnx").read_bytes())
    sidecar = json.loads((deployed / "model.onnx.json").read_text())
    Path(f"{mixed}.json").write_text(json.dumps(sidecar))
    with pytest.raises(PredictionError, match="does not match its sidecar .*another export's model"):
        predict_onnx(deployed / "in", tmp_path / "out", mixed, progress=False, backend=backend)
    del sidecar["onnx_sha256"]  # as an older export wrote it, for a model of one more class
    sidecar["label_values"] = [*sidecar["label_values"], max(sidecar["label_values"]) + 1]
    Path(f"{mixed}.json").write_text(json.dumps(sidecar))
    with pytest.raises(PredictionError, match="gives 3 output channels, its sidecar .* describes 4"):
        predict_onnx(deployed / "in", tmp_path / "out", mixed, progress=False, backend=backend)
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_a_finished_onnx_prediction_builds_no_session(deployed, tmp_path):
    """The rerun skips every case, so it must not load the model: a broken model.onnx still succeeds."""
    model = tmp_path / "model.onnx"
    model.write_bytes((deployed / "model.onnx").read_bytes())
    sidecar = tmp_path / "model.onnx.json"
    sidecar.write_bytes((deployed / "model.onnx.json").read_bytes())
    out = tmp_path / "out"
    assert len(predict_onnx(deployed / "in", out, model, progress=False)) == 1
    before = (out / "a.nii.gz").stat().st_mtime_ns
    model.write_bytes(b"not an onnx model")
    assert predict_onnx(deployed / "in", out, model, progress=False) == []
    assert (out / "a.nii.gz").stat().st_mtime_ns == before
    with pytest.raises(PredictionError, match="does not match its sidecar"):  # work left: the model is read
        predict_onnx(deployed / "in", out, model, save_probabilities=True, progress=False)


def _labels(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(folder / "a.nii.gz").dataobj)


def test_openvino_backend_predicts_the_onnx_and_torch_labels_without_torch(deployed, tmp_path):
    """`--backend openvino` on the same exported pair, in a process where torch cannot be
    imported, gives the labels (and probabilities) of the ONNX Runtime and PyTorch backends."""
    pytest.importorskip("openvino")
    outputs = {}
    for backend in ("onnx", "openvino"):
        outputs[backend] = tmp_path / backend
        _predict_without_torch(backend, deployed, outputs[backend], "--save-probabilities")
    reference = _labels(deployed / "torch_out")
    assert len(np.unique(reference)) > 1
    assert (_labels(outputs["openvino"]) != _labels(outputs["onnx"])).mean() < 1e-3  # only exact ties could differ
    assert (_labels(outputs["openvino"]) != reference).mean() < 1e-3
    probs = np.load(outputs["openvino"] / "a.npz", allow_pickle=False)["probabilities"].astype(np.float32)
    ref_probs = np.load(deployed / "torch_out" / "a.npz", allow_pickle=False)["probabilities"].astype(np.float32)
    np.testing.assert_allclose(probs, ref_probs, atol=2e-3)  # float16 files


def test_a_missing_openvino_package_names_the_install_command(deployed, tmp_path, monkeypatch, capsys):
    from lightseg.inference import openvino_backend

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    monkeypatch.setattr(openvino_backend, "_core", lambda: openvino_backend.import_openvino().Core())  # not the cached one
    args = ["predict", "--backend", "openvino", "-i", str(deployed / "in"), "-o", str(tmp_path / "out"),
            "-m", str(deployed / "model.onnx")]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "needs the openvino package" in error and "pip install 'lightseg[openvino]'" in error
    assert "openvino==" in error and not (tmp_path / "out" / "a.nii.gz").exists()


def test_bad_precisions_are_refused_before_any_model_loads(tmp_path, capsys):
    missing = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "none.onnx")]
    with pytest.raises(SystemExit) as exit_info:  # not a precision at all: argparse
        main(["predict", "--backend", "openvino", "--precision", "int8", *missing])
    assert exit_info.value.code == 2 and "--precision" in capsys.readouterr().err
    for backend, precision in (("openvino", "fp16"), ("onnx", "bf16")):
        assert main(["predict", "--backend", backend, "--precision", precision, *missing]) == 1
        error = capsys.readouterr().err
        assert f"--backend {backend} runs the exported model on the CPU in fp32" in error and "not found" not in error
    with pytest.raises(PredictionError, match="runs --precision fp32 or bf16, not 'fp16'"):
        predict_onnx(tmp_path / "in", tmp_path / "out", tmp_path / "none.onnx", backend="openvino", precision="fp16")


def test_bf16_is_checked_against_fp32_and_refused_below_the_threshold(deployed, tmp_path, monkeypatch, capsys):
    """The agreement on the export's example is reported; a threshold above it refuses to predict."""
    pytest.importorskip("openvino")
    from lightseg.inference import openvino_backend

    assert predict_onnx(deployed / "in", tmp_path / "out", deployed / "model.onnx", progress=False,
                        backend="openvino", precision="bf16")
    report = capsys.readouterr().err
    assert "OpenVINO --precision bf16 (runs as" in report and "agrees with fp32 on" in report
    agreement = float(report.split("agrees with fp32 on ")[1].split("%")[0]) / 100
    assert openvino_backend.MIN_AGREEMENT <= agreement <= 1
    monkeypatch.setattr(openvino_backend, "MIN_AGREEMENT", 1.0001)
    with pytest.raises(PredictionError, match="predict with --precision fp32"):
        predict_onnx(deployed / "in", tmp_path / "out2", deployed / "model.onnx", progress=False,
                     backend="openvino", precision="bf16")
    assert not (tmp_path / "out2" / "a.nii.gz").exists()


def test_openvino_networks_freed_in_any_order_leave_signals_working(deployed):
    """Two networks (the bf16 check's pair), the first made freed first, then a signal that a Python
    handler takes (as Ctrl-C or a DataLoader's SIGCHLD): the process must run the handler, not
    segfault on an alternate signal stack OpenVINO freed (one Core per process prevents it)."""
    pytest.importorskip("openvino")
    code = (
        "import gc, json, os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from lightseg.inference.openvino_backend import compile_network\n"
        "onnx = Path(sys.argv[1]); meta = json.loads(Path(sys.argv[1] + '.json').read_text())\n"
        "first, _ = compile_network(onnx, meta, 'bf16')\n"
        "second, _ = compile_network(onnx, meta, 'fp32')\n"
        "del first; gc.collect(); del second; gc.collect()\n"
        "signal.signal(signal.SIGUSR1, lambda *args: print('handled', flush=True))\n"
        "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(deployed / "model.onnx")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "handled", (done.returncode, done.stderr[-2000:])


def test_label_agreement_counts_voxel_decisions():
    from lightseg.inference.openvino_backend import label_agreement

    logits = np.zeros((1, 3, 2, 2, 1), np.float32)
    logits[0, 1] = 1.0  # class 1 everywhere
    flipped = logits.copy()
    flipped[0, 2, 0, 0, 0] = 2.0  # one voxel of four becomes class 2
    assert label_agreement(lambda x: logits, lambda x: flipped, logits, regions=False) == 0.75
    # regions: each channel's sign counts; 1 of 12 region decisions changes
    assert label_agreement(lambda x: logits, lambda x: flipped, logits, regions=True) == pytest.approx(11 / 12)
