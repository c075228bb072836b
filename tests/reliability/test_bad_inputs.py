"""Bad input through the CLI: a non-zero exit and one clear line naming the file and what to do.

Each case is a real broken file or folder handed to the verb that meets it first (``preprocess``
for a raw data set, ``predict`` for scans, ``train`` for a cache); an uncaught exception (a
traceback) fails the test. docs/reliability.md lists every case with the promised behaviour.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lightseg.errors import ModelError
from lightseg.io import load_nifti
from lightseg.models import create_model

from .conftest import TINY_TRAIN
from .helpers import cli, write_nifti

IMAGE = "imagesTr/case_tr001_0000.nii.gz"
IMAGE_1 = "imagesTr/case_tr001_0001.nii.gz"
LABEL = "labelsTr/case_tr001.nii.gz"
AFFINE = np.eye(4)


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _replace(path: Path, data: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> None:
    write_nifti(path, _data(path) if data is None else data, affine)


def _dataset_json(root: Path, text: str | None = None, **changes: object) -> None:
    path = root / "dataset.json"
    if text is not None:
        path.write_text(text)
        return
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps({k: v for k, v in obj.items() if v is not None}))


def _nan(path: Path, value: float) -> None:
    data = _data(path).astype(np.float32)
    data[3:6, 3:6, 3:6] = value
    _replace(path, data)


def _labels_all_empty(root: Path) -> None:
    for path in (root / "labelsTr").glob("*.nii.gz"):
        _replace(path, np.zeros_like(_data(path)))


# (id, mutation of the raw data set, text the error must contain besides the file name, file named)
DATASET_CASES = [
    ("truncated-nifti", lambda r: _truncate(r / IMAGE), "corrupt or truncated", IMAGE),
    ("not-nifti", lambda r: (r / IMAGE).write_bytes(b"this is a text file" * 20), "not a NIfTI file", IMAGE),
    ("gzip-not-nifti", lambda r: (r / IMAGE).write_bytes(gzip.compress(b"x" * 500)), "not a NIfTI file", IMAGE),
    ("4d-image", lambda r: _replace(r / IMAGE, np.stack([_data(r / IMAGE)] * 2, -1)), "convert-msd", IMAGE),
    ("channel-missing", lambda r: (r / IMAGE_1).unlink(), "not found", IMAGE_1),
    ("label-missing", lambda r: (r / LABEL).unlink(), "add it or remove the case", LABEL),
    ("channel-shapes-differ", lambda r: _replace(r / IMAGE_1, _data(r / IMAGE_1)[:-1]), "co-registered", IMAGE_1),
    ("channel-affines-differ", lambda r: _replace(r / IMAGE_1, affine=np.diag([1.0, 1.0, 1.2, 1.0])), "co-registered", IMAGE_1),
    ("label-shape-differs", lambda r: _replace(r / LABEL, _data(r / LABEL)[:, :-2]), "lightseg verify", LABEL),
    ("label-affine-differs", lambda r: _replace(r / LABEL, affine=np.diag([1.0, 1.0, 1.0, 1.0]) + np.eye(4, k=3)),
     "lightseg verify", LABEL),
    ("nan-voxels", lambda r: _nan(r / IMAGE, np.nan), "NaN or Inf", IMAGE),
    ("inf-voxels", lambda r: _nan(r / IMAGE, np.inf), "NaN or Inf", IMAGE),
    ("label-undeclared", lambda r: _replace(r / LABEL, np.where(_data(r / LABEL) == 2, 7, _data(r / LABEL)).astype(np.uint8)),
     "label_values", LABEL),
    ("label-not-integer", lambda r: _replace(r / LABEL, _data(r / LABEL).astype(np.float32) * 0.5), "integers", LABEL),
    ("all-labels-empty", _labels_all_empty, "foreground", "labelsTr"),
    ("dataset-json-not-json", lambda r: _dataset_json(r, "{'labels': oops"), "not valid JSON", "dataset.json"),
    ("dataset-json-binary", lambda r: (r / "dataset.json").write_bytes(b"\xff\xfe\x00\x01"), "not valid JSON", "dataset.json"),
    ("dataset-json-missing", lambda r: (r / "dataset.json").unlink(), "not found", "dataset.json"),
    ("dataset-json-missing-key", lambda r: _dataset_json(r, labels=None), "'labels'", "dataset.json"),
    ("dataset-json-wrong-type", lambda r: _dataset_json(r, numTraining="three"), "numTraining", "dataset.json"),
    ("dataset-json-bad-labels", lambda r: _dataset_json(r, labels={"background": 0, "a": "one"}), "label 'a'", "dataset.json"),
    ("zero-spacing", lambda r: [_replace(r / p, affine=np.diag([0.0, 1.0, 1.0, 1.0])) for p in (IMAGE, IMAGE_1, LABEL)],
     "not positive and finite", IMAGE),
    ("huge-spacing", lambda r: [_replace(r / p, affine=np.diag([1e5, 1.0, 1.0, 1.0])) for p in (IMAGE, IMAGE_1, LABEL)],
     "header's spacing is probably wrong", IMAGE),
]


@pytest.mark.parametrize("mutate,advice,named", [c[1:] for c in DATASET_CASES], ids=[c[0] for c in DATASET_CASES])
def test_bad_raw_data_set(raw_copy, tmp_path, mutate, advice, named):
    mutate(raw_copy)
    code, err = cli("preprocess", raw_copy, "-o", tmp_path / "cache", "--workers", "1")
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("lightseg preprocess: error:") and advice in line and str(Path(named)) in line, err


def test_non_consecutive_labels_are_flagged_by_verify_and_mapped_by_training(base, tmp_path):
    """nnU-Net needs labels 0..K-1: ``verify`` reports a gap (exit 1); training and prediction map
    the declared values to output channels and back, so a gap is never a wrong value."""
    raw = Path(shutil.copytree(base["raw"], tmp_path / "raw"))
    _dataset_json(raw, labels={"background": 0, "a": 1, "b": 5})
    for path in (raw / "labelsTr").glob("*.nii.gz"):
        _replace(path, np.where(_data(path) == 2, 5, _data(path)).astype(np.uint8))
    code, err = cli("verify", raw, "--workers", "1")
    assert code == 1
    code, err = cli("train", raw, "-o", tmp_path / "run", "--cache", tmp_path / "cache", *TINY_TRAIN)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["label_values"] == [0, 1, 5]
    code, err = cli("predict", "-i", raw / "imagesTs", "-o", tmp_path / "out", "-m", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    for path in (tmp_path / "out").glob("*.nii.gz"):
        assert set(np.unique(_data(path)).tolist()) <= {0, 1, 5}


def test_an_empty_label_map_is_a_case_without_foreground(raw_copy, tmp_path):
    """One empty label map is legal (a scan without the structure): it trains as background."""
    _replace(raw_copy / LABEL, np.zeros_like(_data(raw_copy / LABEL)))
    code, err = cli("train", raw_copy, "-o", tmp_path / "run", "--cache", tmp_path / "cache", *TINY_TRAIN)
    assert code == 0, err
    assert json.loads((tmp_path / "cache" / "cases" / "case_tr001.json").read_text())["classes_present"] == []


# ----- prediction inputs -------------------------------------------------------------------------
def _scans(base: dict[str, Path], folder: Path) -> Path:
    return Path(shutil.copytree(base["images"], folder))


SCAN = "case_ts000_0000.nii.gz"
SCAN_1 = "case_ts000_0001.nii.gz"
PREDICT_CASES = [
    ("truncated-nifti", lambda d: _truncate(d / SCAN), "corrupt or truncated", SCAN),
    ("not-nifti", lambda d: (d / SCAN).write_bytes(b"\x00" * 400), "not a NIfTI file", SCAN),
    ("4d-image", lambda d: [_replace(d / p, np.stack([_data(d / p)] * 3, -1)) for p in (SCAN, SCAN_1)], "convert-msd", SCAN),
    ("channel-missing", lambda d: (d / SCAN_1).unlink(), "needs [0, 1]", "case_ts000"),
    ("extra-channel", lambda d: shutil.copy(d / SCAN, d / "case_ts000_0002.nii.gz"), "needs [0, 1]", "case_ts000"),
    ("channel-shapes-differ", lambda d: _replace(d / SCAN_1, _data(d / SCAN_1)[1:]), "co-registered", SCAN_1),
    ("channel-affines-differ", lambda d: _replace(d / SCAN_1, affine=np.diag([1.0, 2.0, 1.0, 1.0])), "co-registered", SCAN_1),
    ("nan-voxels", lambda d: _nan(d / SCAN, np.nan), "NaN or Inf", SCAN),
    ("inf-voxels", lambda d: _nan(d / SCAN, -np.inf), "NaN or Inf", SCAN),
    ("zero-spacing", lambda d: [_replace(d / p, affine=np.diag([1.0, 0.0, 1.0, 1.0])) for p in (SCAN, SCAN_1)],
     "not positive and finite", SCAN),
    ("huge-spacing", lambda d: [_replace(d / p, affine=np.diag([1.0, 1.0, 1e6, 1.0])) for p in (SCAN, SCAN_1)],
     "probably wrong", SCAN),
    ("tiny-spacing", lambda d: [_replace(d / p, affine=np.diag([1e-4, 1e-4, 1e-4, 1.0])) for p in (SCAN, SCAN_1)],
     "probably wrong", SCAN),
]


@pytest.mark.parametrize("mutate,advice,named", [c[1:] for c in PREDICT_CASES], ids=[c[0] for c in PREDICT_CASES])
def test_bad_scan_fails_alone_and_the_other_case_is_predicted(base, tmp_path, mutate, advice, named):
    images = _scans(base, tmp_path / "in")
    mutate(images)
    out = tmp_path / "out"
    code, err = cli("predict", "-i", images, "-o", out, "-m", base["run"], "--device", "cpu")
    assert code == 1
    assert "1 of 2 cases failed" in err and advice in err and named in err, err
    assert sorted(p.name for p in out.iterdir()) == ["case_ts001.nii.gz"]


@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 12, 12), (12, 12, 1)])
def test_a_scan_smaller_than_the_patch_is_padded(base, tmp_path, shape):
    images = tmp_path / "in"
    for channel in range(2):
        source = _data(base["images"] / f"case_ts000_{channel:04d}.nii.gz").astype(np.float32)
        write_nifti(images / f"small_{channel:04d}.nii.gz", source[: shape[0], : shape[1], : shape[2]], AFFINE)
    code, err = cli("predict", "-i", images, "-o", tmp_path / "out", "-m", base["run"], "--device", "cpu")
    assert code == 0, err
    assert _data(tmp_path / "out" / "small.nii.gz").shape == shape



@pytest.mark.parametrize("form", ["plain-named-gz", "trailing-singleton-axis"])
def test_nifti_files_itk_reads_are_read_as_itk_reads_them(base, tmp_path, form):
    """A plain NIfTI file named .nii.gz (or a gzipped one named .nii) and an (X, Y, Z, 1) file: ITK,
    and so nnU-Net, reads them; lightseg refused them ("corrupt or truncated", "4 dimensions").
    The prediction equals the one of the file as written normally."""
    images = tmp_path / "in"
    images.mkdir()
    for channel in range(2):
        source = base["images"] / f"case_ts000_{channel:04d}.nii.gz"
        if form == "plain-named-gz":
            (images / source.name).write_bytes(gzip.decompress(source.read_bytes()))
        else:
            image = nib.load(source)
            nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[..., None], image.affine, image.header),
                     images / source.name)
    code, err = cli("predict", "-i", images, "-o", tmp_path / "out", "-m", base["run"], "--device", "cpu")
    assert code == 0, err
    expected = tmp_path / "expected"
    assert cli("predict", "-i", base["images"], "-o", expected, "-m", base["run"], "--device", "cpu")[0] == 0
    (written,) = (tmp_path / "out").iterdir()
    reference = nib.load(expected / "case_ts000.nii.gz")
    assert np.array_equal(_data(written), _data(expected / "case_ts000.nii.gz"))
    assert np.allclose(nib.load(written).affine, reference.affine)


def test_a_gzipped_nifti_named_nii_is_read(base, tmp_path):
    """The reverse of plain-named-gz (for data sets whose file_ending is .nii)."""
    source = base["images"] / "case_ts000_0000.nii.gz"
    renamed = tmp_path / "case_ts000_0000.nii"
    renamed.write_bytes(source.read_bytes())
    assert np.array_equal(load_nifti(renamed).get_fdata(), load_nifti(source).get_fdata())

# ----- checkpoints, models and run folders ------------------------------------------------------
class _Payload:
    """Unpickling this would run a shell command: a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _corrupt(run: Path, data: bytes) -> None:
    (run / "checkpoint_final.pth").write_bytes(data)


CHECKPOINT_CASES = [
    ("random-bytes", lambda run: _corrupt(run, np.random.default_rng(0).bytes(4000)), "checkpoint_final.pth"),
    ("empty-file", lambda run: _corrupt(run, b""), "corrupt or truncated"),
    ("truncated", lambda run: _corrupt(run, (run / "checkpoint_final.pth").read_bytes()[:3000]), "corrupt or truncated"),
    ("missing", lambda run: (run / "checkpoint_final.pth").unlink(), "not found"),
    ("not-a-lightseg-checkpoint", lambda run: torch.save({"weights": torch.ones(2)}, run / "checkpoint_final.pth"),
     "not a lightseg checkpoint"),
    ("another-model", lambda run: torch.save({"model": create_model("lunet", 2, 3, width=3, levels=2).state_dict()},
                                             run / "checkpoint_final.pth"), "weights do not fit"),
    ("config-not-json", lambda run: (run / "config.json").write_text("{"), "config.json"),
    ("plan-not-json", lambda run: (run / "plan.json").write_text("{"), "plan.json: not valid JSON"),
    ("not-a-run-folder", lambda run: (run / "config.json").unlink(), "not a run folder"),
]


@pytest.mark.parametrize("mutate,advice", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_run_folder(base, run_copy, tmp_path, mutate, advice):
    mutate(run_copy)
    code, err = cli("predict", "-i", base["images"], "-o", tmp_path / "out", "-m", run_copy, "--device", "cpu")
    assert code == 1 and advice in err and err.startswith("lightseg predict: error:"), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_pickled_payload_is_refused_and_never_executed(base, run_copy, tmp_path):
    marker = tmp_path / "code-was-executed"
    state = torch.load(run_copy / "checkpoint_final.pth", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, run_copy / "checkpoint_final.pth")
    code, err = cli("predict", "-i", base["images"], "-o", tmp_path / "out", "-m", run_copy, "--device", "cpu")
    assert code == 1 and "refused" in err
    code, err = cli("train", base["cache"], "-o", run_copy, "--resume", *TINY_TRAIN)  # latest is fine, final is not read
    torch.save({**state, "extra": _Payload(marker)}, run_copy / "checkpoint_latest.pth")
    code, err = cli("train", base["cache"], "-o", run_copy, "--resume", *TINY_TRAIN)
    assert code == 1 and "refused" in err
    assert not marker.exists()


def test_a_finished_prediction_needs_no_checkpoint(base, run_copy, tmp_path):
    out = tmp_path / "out"
    assert cli("predict", "-i", base["images"], "-o", out, "-m", run_copy, "--device", "cpu")[0] == 0
    _corrupt(run_copy, b"broken after the prediction")
    code, text = cli("predict", "-i", base["images"], "-o", out, "-m", run_copy, "--device", "cpu")
    assert code == 0 and "0 cases predicted" in text


def test_wrong_number_of_input_channels_is_a_model_error():
    model = create_model("lunet", 2, 3, width=2, levels=2)
    with pytest.raises(ModelError, match="input has 3 channels but the model was built for 2"):
        model(torch.zeros(1, 3, 16, 16, 16))


def test_model_kwargs_that_do_not_fit_the_model(base, tmp_path):
    code, err = cli("train", base["cache"], "-o", tmp_path / "run", "--model", "lunet", "--model-kwargs", '{"depth": 3}',
                    "--workers", "0", "--device", "cpu")
    assert code == 1 and "invalid arguments" in err



def test_a_batch_norm_model_with_a_one_voxel_bottleneck_and_a_batch_of_one(base, tmp_path):
    """It failed on the first step with torch's "Expected more than 1 value per channel"; the advice works."""
    options = ["--model", "lunet", "--model-kwargs", '{"width": 2, "levels": 2}', "--patch", "2", "2", "2",
               "--epochs", "1", "--iters-per-epoch", "1", "--workers", "0", "--device", "cpu"]
    code, err = cli("train", base["cache"], "-o", tmp_path / "run", *options, "--batch", "1")
    assert code == 1 and "batch norm needs at least 2 in training" in err and "--batch 2" in err, err
    assert not (tmp_path / "run" / "config.json").exists()
    code, err = cli("train", base["cache"], "-o", tmp_path / "run", *options, "--batch", "2")
    assert code == 0, err

# ----- caches, paths, output folders -------------------------------------------------------------
def test_a_cache_whose_plan_was_edited_after_preprocessing_is_refused(base, tmp_path):
    cache = Path(shutil.copytree(base["cache"], tmp_path / "cache"))
    plan = json.loads((cache / "plan.json").read_text())
    (cache / "plan.json").write_text(json.dumps({**plan, "target_spacing": [2.0, 2.0, 2.0]}))
    code, err = cli("train", cache, "-o", tmp_path / "run", *TINY_TRAIN)
    assert code == 1 and "3 of 3 cases" in err and "lightseg preprocess" in err, err
    code, err = cli("preprocess", base["raw"], "-o", cache, "--workers", "1")  # the advice works
    assert code == 0, err
    assert cli("train", cache, "-o", tmp_path / "run", *TINY_TRAIN)[0] == 0


def test_a_cache_plan_that_is_not_json(base, tmp_path):
    cache = Path(shutil.copytree(base["cache"], tmp_path / "cache"))
    (cache / "plan.json").write_text("[" * 100_000)
    code, err = cli("train", cache, "-o", tmp_path / "run", *TINY_TRAIN)
    assert code == 1 and "plan.json: not valid JSON" in err


@pytest.mark.parametrize("verb", ["preprocess", "train", "predict-input", "predict-model", "verify", "info", "evaluate"])
def test_a_path_that_does_not_exist(base, tmp_path, verb):
    missing = tmp_path / "no-such-folder"
    argv = {
        "preprocess": ("preprocess", missing, "-o", tmp_path / "c"),
        "train": ("train", missing, "-o", tmp_path / "r"),
        "predict-input": ("predict", "-i", missing, "-o", tmp_path / "o", "-m", base["run"], "--device", "cpu"),
        "predict-model": ("predict", "-i", base["images"], "-o", tmp_path / "o", "-m", missing, "--device", "cpu"),
        "verify": ("verify", missing),
        "info": ("info", missing / "scan.nii.gz"),
        "evaluate": ("evaluate", missing, tmp_path),
    }[verb]
    code, err = cli(*argv)
    assert code == 1 and str(missing) in err, err


@pytest.mark.parametrize("verb", ["preprocess", "train", "predict"])
def test_an_output_folder_that_cannot_be_created(base, tmp_path, verb):
    """Works as root too (CI): a path below a regular file can never be a folder (ENOTDIR)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    argv = {
        "preprocess": ("preprocess", base["raw"], "-o", out, "--workers", "1"),
        "train": ("train", base["cache"], "-o", out, *TINY_TRAIN),
        "predict": ("predict", "-i", base["images"], "-o", out, "-m", base["run"], "--device", "cpu"),
    }[verb]
    code, err = cli(*argv)
    assert code == 1 and str(blocker) in err and "writable folder" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the ENOTDIR test covers root")
def test_a_read_only_output_folder(base, tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, err = cli("predict", "-i", base["images"], "-o", out, "-m", base["run"], "--device", "cpu")
    finally:
        out.chmod(0o755)
    assert code == 1 and "Permission denied" in err and "writable folder" in err


@pytest.mark.parametrize("verb", ["preprocess", "predict-input", "verify", "evaluate-gt", "evaluate-pred", "crossval"])
def test_a_file_where_a_folder_is_read_is_called_a_file(base, tmp_path, verb):
    """``predict -i scan.nii.gz`` said "input folder does not exist" of a file that exists."""
    scan = next(base["images"].glob("*.nii.gz"))
    labels = base["raw"] / "labelsTr"
    argv = {
        "preprocess": ("preprocess", scan, "-o", tmp_path / "c"),
        "predict-input": ("predict", "-i", scan, "-o", tmp_path / "o", "-m", base["run"], "--device", "cpu"),
        "verify": ("verify", scan),
        "evaluate-gt": ("evaluate", scan, labels),
        "evaluate-pred": ("evaluate", labels, scan),
        "crossval": ("crossval", scan, base["run"], "-o", tmp_path / "cv"),
    }[verb]
    code, text = cli(*argv)
    assert code == 1 and f"{scan}: is a file, not a folder" in text and "does not exist" not in text, text


def test_a_run_folder_given_as_the_data_is_named_a_run_folder(base, tmp_path):
    """``train RUN -o NEW`` read the run's dataset.json as a raw data set: "no training cases"."""
    code, err = cli("train", base["run"], "-o", tmp_path / "new", *TINY_TRAIN)
    assert code == 1 and f"{base['run']}: is a run folder" in err and "--resume" in err, err
    assert not (tmp_path / "new" / "config.json").exists()  # only the run folder's lock, as for every refused start


def test_a_folder_given_to_info_is_named_a_folder(base):
    code, err = cli("info", base["raw"] / "labelsTr")
    assert code == 1 and "is a folder, not a NIfTI file" in err and "*.nii.gz" in err, err
