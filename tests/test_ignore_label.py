"""nnU-Net's ignore label: no class, no output, out of the loss, of sampling and of every metric."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from cache_helper import make_cache
from monai.losses import DiceCELoss

from lightseg.data import make_synthetic_dataset
from lightseg.data.dataset import parse_dataset_json
from lightseg.data.sampling import PatchSampler
from lightseg.errors import DatasetError, TrainingError
from lightseg.evaluation import evaluate
from lightseg.evaluation.metrics import case_metrics, targets_from_spec
from lightseg.io import write_json
from lightseg.training.losses import IGNORE, build_loss
from lightseg.models import first_output
from lightseg.training.validation import LabelCoding

SPEC = {"channel_names": {"0": "CT"}, "numTraining": 1, "file_ending": ".nii.gz",
        "labels": {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}}


def test_the_ignore_label_is_no_class_and_must_be_the_highest_value():
    spec = parse_dataset_json(SPEC)
    assert spec.ignore_label == 3 and spec.label_values == (0, 1, 2, 3)
    assert spec.class_values == (0, 1, 2) and spec.num_classes == 3
    assert [t.key for t in targets_from_spec(spec)] == ["1", "2"]
    with pytest.raises(DatasetError, match="highest label value"):
        parse_dataset_json({**SPEC, "labels": {"background": 0, "ignore": 1, "liver": 2}})
    with pytest.raises(DatasetError, match="one integer"):
        parse_dataset_json({**SPEC, "labels": {"background": 0, "liver": 1, "ignore": [2]}})


def test_the_loss_leaves_ignored_voxels_out():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 6, 6, 6))
    loss = build_loss("dice_ce", 3, ignore_label=True)
    reference = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,  # nnU-Net's Dice
                           smooth_nr=1e-5, smooth_dr=1e-5)
    assert float(loss(logits, target).detach()) == pytest.approx(float(reference(logits, target).detach()), rel=1e-5)
    ignored = target.clone()
    ignored[:, :, :3] = IGNORE
    value = loss(logits, ignored)
    value.backward()
    assert torch.all(logits.grad[:, :, :3] == 0) and torch.any(logits.grad[:, :, 3:] != 0)
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn(2, 3, 3, 6, 6) * 10  # whatever the network says on ignored voxels
    assert float(loss(changed, ignored)) == pytest.approx(float(value.detach()), rel=1e-6)
    assert torch.isfinite(loss(logits, torch.full_like(target, IGNORE)))  # nothing annotated: finite
    regions = build_loss("region", 2, ignore_label=True)
    masks = torch.randint(0, 2, (2, 2, 6, 6, 6)).float()
    masks[:, :, :3] = IGNORE
    assert torch.isfinite(regions(logits[:, :2], masks))
    with pytest.raises(TrainingError, match="ignore"):
        build_loss("lightmedseg", 3, ignore_label=True)


def test_label_coding_marks_ignored_voxels():
    coding = LabelCoding((0, 1, 2), None, ignore_label=3)
    raw = torch.tensor([0, 1, 2, 3]).reshape(1, 1, 4, 1, 1)
    assert coding.target(raw).flatten().tolist() == [0, 1, 2, IGNORE]
    logits = torch.zeros(1, 3, 4, 1, 1)
    logits[:, 1] = 1.0  # predicts class 1 everywhere, also on the ignored voxel
    tp, fp, fn = coding.counts(logits, raw)
    assert tp.tolist() == [1, 0] and fp.tolist() == [2, 0] and fn.tolist() == [0, 1]  # voxel 3 (ignored) is no FP


def test_metrics_leave_ignored_voxels_out(tmp_path):
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[:, :, 8:] = 3  # unannotated slab
    pred = np.zeros_like(ref)
    pred[3:6, 2:6, 2:6] = 1
    pred[:, :, 8:] = 1  # predictions on unannotated voxels do not count
    spec = parse_dataset_json({**SPEC, "labels": {"background": 0, "liver": 1, "ignore": 3}})
    tp, n_ref, n_pred = 48, 64, 48  # hand count over annotated voxels only
    metrics = case_metrics(ref, pred, targets_from_spec(spec), (1.0, 1.0, 1.0), ignore_label=3)
    assert set(metrics) == {"1"} and metrics["1"]["Dice"] == pytest.approx(2 * tp / (n_ref + n_pred))
    assert metrics["1"]["FP"] == 0
    for folder, array in (("gt", ref), ("pred", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / folder / "a.nii.gz")
    write_json(tmp_path / "dataset.json", spec.to_json())
    summary = evaluate(tmp_path / "gt", tmp_path / "pred", tmp_path / "dataset.json", num_workers=1)
    assert list(summary["targets"]) == ["1"] and summary["foreground_mean"]["Dice"] == pytest.approx(2 * 48 / 112)


def add_ignore_label(raw, value: int):
    """Mark one slab of each training label as unannotated (the ignore label ``value``)."""
    for path in sorted((raw / "labelsTr").glob("*.nii.gz")):
        image = nib.load(path)
        label = np.asarray(image.dataobj).copy()
        label[:, :, : label.shape[2] // 3] = value
        nib.save(nib.Nifti1Image(label, image.affine), path)
    spec = json.loads((raw / "dataset.json").read_text())
    spec["labels"]["ignore"] = value
    write_json(raw / "dataset.json", spec)


def test_an_ignore_label_data_set_trains_without_predicting_it(tmp_path):
    from lightseg.inference.predictor import predict
    from lightseg.run_folder import load_run
    from lightseg.training.run import train

    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=3, shape=(20, 20, 20), num_classes=3, num_test=1)
    add_ignore_label(raw, 3)
    cache = make_cache(raw, tmp_path / "cache")
    sampler = PatchSampler(cache, ["case_tr000"], (8, 8, 8), 1, 1, ignore_label=3)
    assert 3 not in sampler.case("case_tr000").locations and 1 in sampler.case("case_tr000").locations
    run = train(cache, tmp_path / "run", "lunet", model_kwargs={"width": 4, "levels": 2}, epochs=1, iters_per_epoch=2,
                patch_size=(16, 16, 16), batch_size=2, workers=0, device="cpu", augment="none")
    config = json.loads((run / "config.json").read_text())
    data = config["data"]
    assert data["num_classes"] == 3 and data["label_values"] == [0, 1, 2] and data["ignore_label"] == 3
    model, *_ = load_run(run, "final")
    assert first_output(model(torch.zeros(1, 1, 16, 16, 16))).shape[1] == 3  # background, liver, tumour: no ignore output
    predict(raw / "imagesTs", tmp_path / "pred", run, progress=False)
    labels = np.asarray(nib.load(tmp_path / "pred" / "case_ts000.nii.gz").dataobj)
    assert 3 not in np.unique(labels)
