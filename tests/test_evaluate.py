"""Folder evaluation: summary.json content, regions, missing predictions, grid mismatches, CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from lightseg.cli import main
from lightseg.errors import EvaluationError
from lightseg.evaluation import evaluate, format_table
from lightseg.io import write_json

AFFINE = np.array([[0, 0, -1.5, 10], [-0.8, 0, 0, 20], [0, 2.0, 0, -5], [0, 0, 0, 1]], float)  # permuted, flipped
SPACING = (0.8, 2.0, 1.5)  # column norms of AFFINE, in voxel-axis order


def tumour(shift: int = 0) -> np.ndarray:
    label = np.zeros((16, 12, 14), np.uint8)
    label[2 + shift : 12 + shift, 2:10, 2:12] = 1
    label[4 + shift : 9 + shift, 4:8, 4:9] = 2
    label[5 + shift : 7 + shift, 5:7, 5:7] = 3
    return label


def save(path, label, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label, affine), path)


@pytest.fixture
def folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "a.nii.gz", tumour())
    save(pred / "a.nii.gz", tumour())
    save(gt / "b.nii.gz", tumour())
    save(pred / "b.nii.gz", tumour(shift=1))
    write_json(tmp_path / "dataset.json", {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
        "regions_class_order": [1, 2, 3],
        "numTraining": 2,
    })
    return gt, pred, tmp_path / "dataset.json"


def test_summary_with_regions(folders):
    gt, pred, dataset_json = folders
    summary = evaluate(gt, pred, dataset_json=dataset_json, nsd_tolerance_mm=2.0, num_workers=2)
    on_disk = json.loads((pred / "summary.json").read_text())
    assert on_disk["mean"] == summary["mean"]
    # a region declared as a one-element list is keyed "(3,)", as nnU-Net's summary.json
    assert list(summary["targets"]) == ["1", "2", "3", "(1, 2, 3)", "(2, 3)", "(3,)"]
    assert summary["foreground_targets"] == ["(1, 2, 3)", "(2, 3)", "(3,)"]  # the regions, as trained
    cases = {c["reference_file"].split("/")[-1]: c for c in summary["metric_per_case"]}
    assert cases["a.nii.gz"]["metrics"]["(1, 2, 3)"]["Dice"] == 1.0
    whole = cases["b.nii.gz"]["metrics"]["(1, 2, 3)"]
    assert whole["Dice"] == pytest.approx(2 * 9 / 20)  # 10-voxel slab shifted by 1: 9 of 10 overlap
    assert whole["HD95"] == pytest.approx(0.8)  # the shift is along voxel axis 0, 0.8 mm
    for key in summary["targets"]:
        for metric in ("Dice", "IoU", "HD95", "NSD"):
            expected = np.mean([c["metrics"][key][metric] for c in summary["metric_per_case"]])
            assert summary["mean"][key][metric] == pytest.approx(expected)
    expected_fg = np.mean([summary["mean"][k]["Dice"] for k in ("(1, 2, 3)", "(2, 3)", "(3,)")])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(expected_fg)
    assert summary["settings"]["nsd_tolerance_mm"] == 2.0
    table = format_table(summary)
    assert "whole tumor [(1, 2, 3)]" in table and "foreground mean" in table


def test_without_dataset_json_every_found_label_is_a_class(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    only_one = np.zeros((8, 8, 8), np.uint8)
    only_one[2:5, 2:5, 2:5] = 1
    with_two = only_one.copy()
    with_two[6:8, 6:8, 6:8] = 2
    save(gt / "a.nii.gz", only_one)
    save(pred / "a.nii.gz", only_one)
    save(gt / "b.nii.gz", with_two)
    save(pred / "b.nii.gz", only_one)
    summary = evaluate(gt, pred, output=tmp_path / "out" / "s.json", num_workers=1)
    assert (tmp_path / "out" / "s.json").is_file()
    assert list(summary["targets"]) == ["1", "2"]
    per_case = {c["prediction_file"].split("/")[-1]: c["metrics"] for c in summary["metric_per_case"]}
    assert per_case["a.nii.gz"]["2"]["Dice"] == 1.0  # absent from both: the both-empty policy
    assert per_case["b.nii.gz"]["2"]["Dice"] == 0.0
    assert summary["mean"]["2"]["Dice"] == pytest.approx(0.5)


def test_missing_predictions_are_reported(folders, capsys):
    gt, pred, dataset_json = folders
    (pred / "b.nii.gz").unlink()
    summary = evaluate(gt, pred, dataset_json=dataset_json)
    assert summary["missing_predictions"] == ["b.nii.gz"]
    assert summary["num_cases"] == 1
    assert "b.nii.gz" in capsys.readouterr().err
    for path in pred.glob("*.nii.gz"):
        path.unlink()
    with pytest.raises(EvaluationError, match="none of the 2 cases"):
        evaluate(gt, pred, dataset_json=dataset_json)


def test_affine_mismatch_names_both_files(folders):
    gt, pred, dataset_json = folders
    moved = AFFINE.copy()
    moved[0, 3] += 0.5
    save(pred / "b.nii.gz", tumour(), affine=moved)
    with pytest.raises(EvaluationError, match=r"pred/b\.nii\.gz.*gt/b\.nii\.gz.*affines"):
        evaluate(gt, pred, dataset_json=dataset_json)


def test_shape_mismatch_names_both_files(folders):
    gt, pred, dataset_json = folders
    save(pred / "a.nii.gz", tumour()[:, :, :-1])
    with pytest.raises(EvaluationError, match=r"pred/a\.nii\.gz has shape.*gt/a\.nii\.gz"):
        evaluate(gt, pred, dataset_json=dataset_json)


@pytest.mark.parametrize("where", ["pred", "gt"])
def test_negative_label_values_are_refused(folders, where):
    """Without -d every value found is a class: a -1 (some tools' "unlabelled") was scored as class -1
    and pulled the foreground mean down."""
    gt, pred, _ = folders
    label = tumour().astype(np.int16)
    label[0, 0, 0] = -1
    save((pred if where == "pred" else gt) / "a.nii.gz", label)
    with pytest.raises(EvaluationError, match=rf"{where}/a\.nii\.gz: holds negative values \(lowest -1\)"):
        evaluate(gt, pred)


def test_corrupt_prediction_is_an_evaluation_error(folders):
    gt, pred, dataset_json = folders
    (pred / "a.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(EvaluationError, match=r"a\.nii\.gz"):
        evaluate(gt, pred, dataset_json=dataset_json)


def test_cli_prints_table_and_writes_summary(folders, tmp_path, capsys):
    gt, pred, dataset_json = folders
    out = tmp_path / "summary.json"
    assert main(["evaluate", str(gt), str(pred), "-d", str(dataset_json), "-o", str(out), "--nsd-tolerance", "1.5"]) == 0
    printed = capsys.readouterr().out
    assert "NSD@1.5mm" in printed and "enhancing tumor [(3,)]" in printed
    assert json.loads(out.read_text())["settings"]["nsd_tolerance_mm"] == 1.5
    assert main(["evaluate", str(gt), str(tmp_path / "nowhere")]) == 1
