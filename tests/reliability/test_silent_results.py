"""Cases that gave a silently wrong result or overwrote data, now refused with a clear line
(docs/reliability.md, "Silent results").

Each was exit 0 before: regions nobody declared, duplicate labels, ``predict -o`` = ``-i``,
``crossval``/``find-best`` into the ground truth or through a link or outside their output,
``convert-msd`` merging or reading outside the task, ``export`` over a checkpoint, ``evaluate -d``
scoring undeclared values as background.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightseg.data import make_synthetic_dataset

from .conftest import TINY_TRAIN
from .helpers import cli, write_nifti


def _edit_json(path: Path, **changes: object) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


# ----- 5. regions and 14. duplicate labels: refused by every reader of dataset.json, verify first ---------
@pytest.fixture(scope="module")
def regions_raw(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("regions") / "raw", num_cases=2, shape=(8, 8, 8), regions=True)


BAD_LABELS = [
    ("order-undeclared", {"regions_class_order": [1, 9]}, "'regions_class_order' values [9]"),
    ("order-background", {"regions_class_order": [0, 1]}, "'regions_class_order' values [0]"),
    ("region-with-background", {"labels": {"background": 0, "a": [0, 1, 2], "b": [2]}, "regions_class_order": [1, 2]},
     "contains the background 0"),
    ("duplicate-value", {"labels": {"background": 0, "a": 1, "b": 1}, "regions_class_order": None},
     "labels 'a' and 'b' have the same value 1"),
    ("duplicate-region", {"labels": {"background": 0, "a": [1, 2], "b": [2, 1]}, "regions_class_order": [1, 2]},
     "have the same value [1, 2]"),
]


@pytest.mark.parametrize("changes,words", [c[1:] for c in BAD_LABELS], ids=[c[0] for c in BAD_LABELS])
def test_bad_labels_are_refused_by_verify_and_preprocess_alike(regions_raw, tmp_path, changes, words):
    raw = Path(shutil.copytree(regions_raw, tmp_path / "raw"))
    obj = json.loads((raw / "dataset.json").read_text())
    obj.update(changes)
    (raw / "dataset.json").write_text(json.dumps({k: v for k, v in obj.items() if v is not None}))
    code, out = cli("verify", raw, "--workers", "1")
    assert code == 1 and words in out, out
    code, err = cli("preprocess", raw, "-o", tmp_path / "cache", "--workers", "1")
    assert code == 1 and words in err and "Traceback" not in err, err


# ----- 8. predict -o equal to -i ------------------------------------------------------------------------------
def test_predict_into_its_own_input_folder_is_refused(base, tmp_path):
    images = Path(shutil.copytree(base["images"], tmp_path / "images"))
    before = sorted(p.name for p in images.iterdir())
    for out in (images, tmp_path / "link"):
        if out != images:
            (tmp_path / "link").symlink_to(images)
        code, err = cli("predict", "-i", images, "-o", out, "-m", base["run"], "--device", "cpu")
        assert code == 1 and "the output folder is the input folder" in err, err
    assert sorted(p.name for p in images.iterdir()) == before


def test_a_one_channel_scan_folder_is_not_taken_for_finished_predictions(tmp_path):
    """One-channel scans are named {case}.nii.gz, the output's name: -o = -i looked finished (exit 0)."""
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=2, num_test=1, shape=(8, 8, 8))
    images = raw / "imagesTs"
    for path in images.glob("*_0000.nii.gz"):
        path.rename(path.with_name(path.name.replace("_0000", "")))
    (tmp_path / "run").mkdir()
    shutil.copy(raw / "dataset.json", tmp_path / "run")  # what the finished-check reads before any model
    code, err = cli("predict", "-i", images, "-o", images, "-m", tmp_path / "run", "--device", "cpu")
    assert code == 1 and "the output folder is the input folder" in err, err


# ----- crossval and find-best into their own inputs --------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("verb", ["crossval", "find-best"])
@pytest.mark.parametrize("target", ["labels", "run", "validation", "link-to-labels"])
def test_merged_folds_never_land_in_an_input_folder(base, raw_copy, run_copy, tmp_path, verb, target):
    """``crossval -o labelsTr`` replaced the ground truth with the predictions and scored them 1.0
    (exit 0); ``-o RUN/validation`` was a SameFileError."""
    labels = raw_copy / "labelsTr"
    out = {"labels": labels, "run": run_copy, "validation": run_copy / "validation", "link-to-labels": tmp_path / "link"}[target]
    if target == "link-to-labels":
        out.symlink_to(labels)
    before = {folder: _files(folder) for folder in (labels, run_copy, run_copy / "validation")}
    runs = ("-m", "a", run_copy) if verb == "find-best" else (run_copy,)
    code, err = cli(verb, labels, *runs, "-o", out, "--workers", "1")
    refused = f"{out}: is " in err or f"{out}: holds a run folder" in err  # a run folder is refused by its kind first
    assert code == 1 and refused and "choose a new folder" in err and "Traceback" not in err, err
    assert {folder: _files(folder) for folder in before} == before


def test_a_link_among_the_merged_files_is_never_written_through(base, run_copy, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's")
    case = next((run_copy / "validation").glob("*.nii.gz")).name
    (out / case).symlink_to(victim)
    code, err = cli("crossval", base["raw"] / "labelsTr", run_copy, "-o", out, "--workers", "1")
    assert code == 1 and f"{out / case}: is a symbolic link" in err, err
    assert victim.read_text() == "the user's"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".", "..", "a+b", "a b", "ensemble(a)", "_"])
def test_a_find_best_model_name_that_is_not_a_plain_name(base, tmp_path, name):
    """``-m ../escape`` wrote its merged folds outside the output folder; ``a+b`` broke the
    ensemble names that '+' joins."""
    out = tmp_path / "deep" / "out"
    code, err = cli("find-best", base["raw"] / "labelsTr", "-m", name, base["run"], "-o", out, "--workers", "1")
    assert code == 1 and f"model name {name!r}" in err and "Traceback" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [], "nothing written"


# ----- 9. convert-msd -----------------------------------------------------------------------------------------
def _msd(tmp_path: Path) -> tuple[Path, dict]:
    """A two-case, one-channel MSD task folder and its dataset.json."""
    task, rng, training = tmp_path / "Task01_Tiny", np.random.default_rng(0), []
    for case in ("brain_001", "brain_002"):
        write_nifti(task / "imagesTr" / f"{case}.nii.gz", rng.normal(size=(6, 6, 6)).astype(np.float32), np.eye(4))
        write_nifti(task / "labelsTr" / f"{case}.nii.gz", rng.integers(0, 3, (6, 6, 6)).astype(np.uint8), np.eye(4))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    obj = {"name": "Tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "edema", "2": "tumour"},
           "numTraining": 2, "training": training, "test": []}
    (task / "dataset.json").write_text(json.dumps(obj))
    return task, obj


def test_convert_msd_refuses_two_entries_with_one_case_name(tmp_path):
    task, obj = _msd(tmp_path)
    (task / "imagesTr" / "more").mkdir()
    shutil.copy(task / "imagesTr" / "brain_001.nii.gz", task / "imagesTr" / "more" / "brain_001.nii.gz")
    obj["training"].append({"image": "./imagesTr/more/brain_001.nii.gz", "label": "./labelsTr/brain_002.nii.gz"})
    (task / "dataset.json").write_text(json.dumps(obj))
    code, err = cli("convert-msd", task, tmp_path / "out", "--workers", "1")
    assert code == 1 and "give the same case name 'brain_001'" in err, err
    assert not (tmp_path / "out" / "imagesTr").exists()


def test_convert_msd_refuses_one_name_for_two_label_values(tmp_path):
    task, obj = _msd(tmp_path)
    obj["labels"] = {"0": "background", "1": "tumour", "2": "tumour"}
    (task / "dataset.json").write_text(json.dumps(obj))
    code, err = cli("convert-msd", task, tmp_path / "out", "--workers", "1")
    assert code == 1 and "['tumour'] are given to several values" in err, err


@pytest.mark.parametrize("entry", ["../outside.nii.gz", "/tmp/outside.nii.gz", "./imagesTr/../../outside.nii.gz"])
def test_convert_msd_never_reads_outside_the_task_folder(tmp_path, entry):
    task, obj = _msd(tmp_path)
    shutil.copy(task / "imagesTr" / "brain_001.nii.gz", tmp_path / "outside.nii.gz")
    obj["training"][0]["image"] = entry
    (task / "dataset.json").write_text(json.dumps(obj))
    code, err = cli("convert-msd", task, tmp_path / "out", "--workers", "1")
    assert code == 1 and "points outside the task folder" in err, err
    assert not (tmp_path / "out" / "imagesTr").exists()


# ----- 10. export onto the run's own files ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["checkpoint_final.pth", "config.json", "model"])
def test_export_never_overwrites_a_run_file(run_copy, name):
    target = run_copy / name
    before = target.read_bytes() if target.is_file() else None
    code, err = cli("export", run_copy, "-o", target)
    assert code == 1 and "must be named *.onnx" in err, err
    assert (target.read_bytes() if target.is_file() else None) == before


def test_predict_with_onnx_backend_on_a_run_folder_gives_advice_that_works(base, tmp_path):
    code, err = cli("predict", "--backend", "onnx", "-i", base["images"], "-o", tmp_path / "out", "-m", base["run"])
    assert code == 1 and "a folder, not an ONNX file" in err, err
    target = f"{base['run']}.onnx"
    assert f"lightseg export {base['run']} -o {target}" in err
    run = Path(shutil.copytree(base["run"], tmp_path / "run"))
    assert cli("export", run, "-o", f"{run}.onnx")[0] == 0  # the advice, followed
    code, err = cli("predict", "--backend", "onnx", "-i", base["images"], "-o", tmp_path / "out", "-m", f"{run}.onnx")
    assert code == 0, err


# ----- 13. evaluate -d and undeclared predicted values --------------------------------------------------------
def test_evaluate_refuses_predicted_values_the_data_set_does_not_declare(base, tmp_path):
    raw = base["raw"]
    pred = tmp_path / "pred"
    for path in (raw / "labelsTr").glob("*.nii.gz"):
        data = np.asarray(nib.load(path).dataobj).copy()
        data[: data.shape[0] // 2, : data.shape[1] // 2][data[: data.shape[0] // 2, : data.shape[1] // 2] == 0] = 7
        write_nifti(pred / path.name, data, nib.load(path).affine)
    code, err = cli("evaluate", raw / "labelsTr", pred, "-d", raw / "dataset.json")
    assert code == 1 and "holds label values [7] that" in err and "dataset.json does not declare" in err, err
    assert not (pred / "summary.json").exists()
    code, err = cli("evaluate", raw / "labelsTr", pred)  # without -d every value is a class: scored, not hidden
    assert code == 0 and "[7]" in err, err


# ----- evaluate onto the user's files, and a folder scored against itself -------------------------------------
@pytest.mark.parametrize("target", ["labels/case", "dataset.json", "no-suffix", "training-summary"])
def test_evaluate_never_replaces_a_file_that_is_not_its_summary(base, raw_copy, run_copy, tmp_path, target):
    """``evaluate -o labelsTr/case.nii.gz`` overwrote a ground-truth file with the summary (exit 0)."""
    labels = raw_copy / "labelsTr"
    case = next(labels.glob("*.nii.gz"))
    out = {"labels/case": case, "dataset.json": raw_copy / "dataset.json", "no-suffix": tmp_path / "summary",
           "training-summary": run_copy / "validation" / "summary.json"}[target]
    before = out.read_bytes() if out.exists() else None
    code, err = cli("evaluate", labels, run_copy / "validation", *(() if target == "training-summary" else ("-o", out)))
    assert code == 1 and str(out) in err and "Traceback" not in err, err
    assert (out.read_bytes() if out.exists() else None) == before
    if target == "training-summary":  # the advice works
        assert cli("evaluate", labels, run_copy / "validation", "-o", out.with_name("evaluation.json"))[0] == 0
        assert cli("evaluate", labels, run_copy / "validation", "-o", out.with_name("evaluation.json"))[0] == 0  # rerun


def test_evaluate_refuses_a_folder_scored_against_itself(raw_copy, tmp_path):
    labels = raw_copy / "labelsTr"
    (tmp_path / "link").symlink_to(labels)
    for pred in (labels, tmp_path / "link"):
        code, err = cli("evaluate", labels, pred)
        assert code == 1 and "is the ground-truth folder" in err, err
    assert not (labels / "summary.json").exists()


# ----- an output folder that holds a data set, a cache or a run of its own ------------------------------------
KIND_VERBS = {
    "preprocess": lambda base, out: ("preprocess", base["raw"], "-o", out, "--workers", "1"),
    "train": lambda base, out: ("train", base["cache"], "-o", out, *TINY_TRAIN),
    "predict": lambda base, out: ("predict", "-i", base["images"], "-o", out, "-m", base["run"], "--device", "cpu"),
    "crossval": lambda base, out: ("crossval", base["raw"] / "labelsTr", base["run"], "-o", out, "--workers", "1"),
}
OTHER_KINDS = {"preprocess": ["raw", "run"], "train": ["raw", "cache"], "predict": ["raw", "cache", "run"],
               "crossval": ["raw", "cache", "run"]}


@pytest.mark.parametrize("verb, kind", [(v, k) for v, kinds in OTHER_KINDS.items() for k in kinds])
def test_an_output_folder_holding_another_kind_of_folder_is_refused(base, tmp_path, verb, kind):
    """``preprocess RAW -o OTHER_RAW`` replaced the other data set's dataset.json (exit 0); every verb
    wrote its files among those of a data set, a cache or a run folder."""
    if kind == "raw":
        other = make_synthetic_dataset(tmp_path / "raw", num_cases=2, shape=(8, 8, 8), num_classes=3)
    else:
        other = Path(shutil.copytree(base[kind], tmp_path / kind))
    before = {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()}
    code, err = cli(*KIND_VERBS[verb](base, other))
    words = {"raw": "a raw data set", "cache": "a preprocessed cache", "run": "a run folder"}[kind]
    assert code == 1 and f"{other}: holds {words}" in err and "choose a new folder" in err, err
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
