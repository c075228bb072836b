"""Cross-validation folds as nnU-Net v2 makes them, user split files, and split checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cache_helper import make_cache

from lightseg.cli import main
from lightseg.data import make_synthetic_dataset
from lightseg.errors import ConfigError, EvaluationError, TrainingError
from lightseg.evaluation.crossval import find_best, merge_folds
from lightseg.io import write_json
from lightseg.training.run import train
from lightseg.training.splits import crossval_splits

TINY = dict(model="lunet", model_kwargs={"width": 4, "levels": 2}, epochs=1, iters_per_epoch=1, patch_size=(16, 16, 16),
            batch_size=1, workers=0, device="cpu", augment="none")


def test_folds_equal_scikit_learns_kfold_as_nnunet_calls_it():
    # Derived once from sklearn KFold(5, shuffle=True, random_state=12345) over 7 sorted names.
    seven = crossval_splits([f"case_{i}" for i in reversed(range(7))])
    assert [s["val"] for s in seven] == [["case_3", "case_6"], ["case_0", "case_4"], ["case_1"], ["case_5"], ["case_2"]]
    assert all(sorted(s["train"] + s["val"]) == [f"case_{i}" for i in range(7)] for s in seven)
    kfold = pytest.importorskip("sklearn.model_selection").KFold
    for n, k in ((10, 5), (13, 3), (5, 5), (12, 4)):
        keys = np.sort([f"c{i:03d}" for i in range(n)])
        expected = [{"train": list(keys[a]), "val": list(keys[b])} for a, b in kfold(k, shuffle=True, random_state=12345).split(keys)]
        assert crossval_splits(list(keys[::-1]), k) == expected
    with pytest.raises(ConfigError, match="num-folds"):
        crossval_splits(["a", "b"], 5)
    with pytest.raises(SystemExit):
        main(["train", "DATA", "-o", "RUN", "--fold", "one"])  # argparse: a fold number or 'all'


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("folds") / "raw", num_cases=5, shape=(16, 16, 16), num_classes=2)


def test_fold_k_writes_and_follows_nnunets_splits_final(raw, tmp_path, capsys):
    cache = make_cache(raw, tmp_path / "cache")
    assert main(["train", str(cache), "-o", str(tmp_path / "f1"), "--fold", "1", "--model", "lunet", "--model-kwargs",
                 '{"width": 4, "levels": 2}', "--epochs", "1", "--iters-per-epoch", "1", "--patch", "16", "16", "16",
                 "--batch", "1", "--workers", "0", "--device", "cpu", "--augment", "none"]) == 0
    written = json.loads((cache / "splits_final.json").read_text())
    assert written == crossval_splits([f"case_tr{i:03d}" for i in range(5)])  # 5 folds, nnU-Net's seed
    assert json.loads((tmp_path / "f1" / "splits.json").read_text()) == written[1]
    assert json.loads((tmp_path / "f1" / "config.json").read_text())["data"]["fold"] == 1
    (val,) = written[1]["val"]
    assert sorted(p.name for p in (tmp_path / "f1" / "validation").iterdir()) == [f"{val}.nii.gz", f"{val}.npz", "summary.json"]
    with pytest.raises(ConfigError, match="folds 0..4"):
        train(cache, tmp_path / "f9", fold=9, **TINY)
    with pytest.raises(ConfigError, match="--num-folds 3"):
        train(cache, tmp_path / "f0", fold=0, num_folds=3, **TINY)
    with pytest.raises(ConfigError, match="drop --val-fraction"):
        train(cache, tmp_path / "f0", fold=0, val_fraction=0.5, **TINY)
    run = train(cache, tmp_path / "all", fold="all", **TINY)
    assert json.loads((run / "splits.json").read_text()) == {"train": [f"case_tr{i:03d}" for i in range(5)], "val": []}


def test_hand_written_splits_final_folds_score_every_case_once(raw, tmp_path):
    cache = make_cache(raw, tmp_path / "cache")
    names = [f"case_tr{i:03d}" for i in range(5)]
    folds = [{"train": names[2:], "val": names[:2]}, {"train": names[:2], "val": names[2:]}]  # not nnU-Net's: kept as is
    write_json(tmp_path / "splits_final.json", folds)
    runs = [train(cache, tmp_path / f"fold{k}", fold=k, splits=tmp_path / "splits_final.json", **TINY) for k in (0, 1)]
    assert [json.loads((r / "splits.json").read_text()) for r in runs] == folds
    assert not (cache / "splits_final.json").exists()  # the user's file is used, none is made
    summary = merge_folds(raw / "labelsTr", runs, tmp_path / "cv", num_workers=1)
    assert summary["num_cases"] == 5 and summary["missing_predictions"] == []
    assert sorted(p.name for p in (tmp_path / "cv").glob("*.nii.gz")) == [f"{n}.nii.gz" for n in names]
    with pytest.raises(EvaluationError, match="both"):
        merge_folds(raw / "labelsTr", [runs[0], runs[0]], tmp_path / "cv2")
    report = find_best(raw / "labelsTr", {"a": runs, "b": runs[::-1]}, tmp_path / "best", num_workers=1)
    assert set(report["scores"]) == {"a", "b", "ensemble(a+b)"} and report["best"] in report["scores"]
    assert report["scores"]["a"] == pytest.approx(report["scores"]["b"])  # the same predictions, merged twice
    assert (tmp_path / "best" / "find_best.md").read_text().count("|") > 6
    assert main(["crossval", str(raw / "labelsTr"), *map(str, runs), "-o", str(tmp_path / "cv3"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "cv3" / "summary.json").read_text())["num_cases"] == 5
    assert main(["find-best", str(raw / "labelsTr"), "-m", "a", *map(str, runs), "-m", "b", str(runs[0]), str(runs[1]),
                 "-o", str(tmp_path / "best2"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "best2" / "find_best.json").read_text())["predict"].startswith("lightseg predict")
    with pytest.raises(ConfigError, match="--fold"):
        train(cache, tmp_path / "nofold", splits=tmp_path / "splits_final.json", **TINY)


def test_cases_in_no_fold_are_named(raw, tmp_path, capsys):
    cache = make_cache(raw, tmp_path / "cache")
    write_json(tmp_path / "partial.json", [{"train": ["case_tr000", "case_tr001"], "val": ["case_tr002"]}])
    train(cache, tmp_path / "run", fold=0, splits=tmp_path / "partial.json", **TINY)
    assert "2 cases of the cache are in no fold" in capsys.readouterr().err


def test_a_failed_start_does_not_choose_the_rerun_split(raw, tmp_path):
    cache = make_cache(raw, tmp_path / "cache")
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "splits.json", {"train": ["case_tr000"], "val": ["case_tr001", "case_tr002", "case_tr003", "case_tr004"]})
    train(cache, run, val_fraction=0.2, **TINY)  # a start that failed after writing its run files left the file above
    split = json.loads((run / "splits.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 4  # follows --val-fraction 0.2, as config.json says


def test_a_case_in_both_train_and_val_is_refused(raw, tmp_path):
    cache = make_cache(raw, tmp_path / "cache")
    write_json(tmp_path / "s.json", {"train": ["case_tr000", "case_tr001"], "val": ["case_tr001"]})
    with pytest.raises(TrainingError, match=r"case_tr001.*both 'train' and 'val'"):
        train(cache, tmp_path / "run", splits=tmp_path / "s.json", **TINY)
    assert not (tmp_path / "run" / "splits.json").exists()
