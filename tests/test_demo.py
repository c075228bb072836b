"""``lightseg demo``: budget arithmetic, the k-means reference, folder safety, and one tiny end-to-end run."""

from __future__ import annotations

import json

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from lightseg.demo import (
    FRESH,
    MARKER,
    NOTE,
    DemoConfig,
    _prepare_out,
    kmeans_1d,
    kmeans_tissue,
    plan_training,
    run_demo,
    split_cases,
)
from lightseg.errors import DatasetError


def test_split_holds_out_a_quarter_at_least_one():
    names = [f"c{i}" for i in range(8)]
    assert split_cases(names[::-1]) == (names[:6], names[6:])
    assert split_cases(["b", "a", "c"]) == (["a", "b"], ["c"])
    with pytest.raises(DatasetError, match="at least 2 cases"):
        split_cases(["a"])


def test_plan_training_fills_the_budget():
    epochs, iters = plan_training(300.0, 2.0)  # 150 steps
    assert epochs * iters <= 150 and epochs * iters > 150 - iters
    assert 15 <= epochs <= 20
    assert plan_training(10.0, 2.0) == (5, 1)
    assert plan_training(-5.0, 2.0) == (1, 1)  # the pilot ate the budget: one step, never zero


def test_kmeans_1d_finds_separated_means():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 5.0, n) for m, n in ((100, 3000), (400, 1000), (700, 2000))])
    np.testing.assert_allclose(kmeans_1d(rng.permutation(values)), [100, 400, 700], atol=2.0)


def test_kmeans_tissue_orders_clusters_by_intensity_inside_the_mask():
    image = np.array([[[900.0, 100.0, 500.0, 120.0, 880.0, 510.0, 5.0]]])
    brain = np.array([[[True, True, True, True, True, True, False]]])
    np.testing.assert_array_equal(kmeans_tissue(image, brain), [[[3, 1, 2, 1, 3, 2, 0]]])


def test_prepare_out_refuses_foreign_folders_and_clears_stale_outputs(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("x")
    with pytest.raises(DatasetError, match="not made by `lightseg demo`"):
        _prepare_out(tmp_path / "foreign")
    out = tmp_path / "demo"
    _prepare_out(out)
    for name in (*FRESH, "MNI152Demo", "cache"):
        (out / name).mkdir()
        (out / name / "f").write_text("old")
    _prepare_out(out)  # a rerun: data set and cache kept, every redone output cleared
    assert (out / MARKER).is_file() and (out / "MNI152Demo" / "f").is_file() and (out / "cache" / "f").is_file()
    assert not any((out / name).exists() for name in FRESH)


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path):
    lines: list[str] = []
    out = tmp_path / "demo"
    config = DemoConfig(out=out, minutes=0.001, cases=3, spacing=4.0, patch=(32, 32, 32), device="cpu")
    result = run_demo(config, echo=lines.append)
    text = "\n".join(lines)
    assert NOTE in text and "k-means" in text and "Wall time per stage" in text
    assert result["split"] == {"train": ["brain_000", "brain_001"], "held_out": ["brain_002"]}
    assert set(result["stage_seconds"]) == {"data", "verify", "preprocess", "train", "predict", "evaluate", "reference",
                                            "overlay", "robustness"}
    assert result["training"]["steps"] == result["training"]["epochs"] * result["training"]["iters_per_epoch"] == 1
    assert not (out / "pilot").exists() and (out / "run" / "checkpoint_final.pth").is_file()

    source = nib.load(out / "MNI152Demo" / "imagesTr" / "brain_002_0000.nii.gz")
    for folder in ("predictions", "reference_kmeans"):
        prediction = nib.load(out / folder / "brain_002.nii.gz")
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        values = np.unique(np.asarray(prediction.dataobj))
        assert set(values.tolist()) <= {0, 1, 2, 3}
        summary = json.loads((out / folder / "summary.json").read_text())
        assert summary["num_cases"] == 1 and summary["metric_per_case"][0]["prediction_file"].endswith("brain_002.nii.gz")
    assert result["reference_scores"]["foreground mean"]["Dice"] > 0.5  # intensity clusters inside the true brain mask

    saved = json.loads((out / "demo_summary.json").read_text())
    assert saved["model_scores"] == result["model_scores"] and saved["note"] == NOTE
    rows = saved["robustness"]["rows"]
    assert {"held out, as generated", "zero background", "uint8", "float 0-1", "2 mm", "LAS", "GM/WM contrast",
            "template 1 mm uint8"} <= set(rows)
    assert all(0 <= r[k] <= 1 for r in rows.values() for k in ("model", "k-means", "atlas"))
    assert rows["held out, as generated"]["cases"] == ["brain_002"] and "Robustness" in text
    pixels = matplotlib.image.imread(out / "overlay.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
