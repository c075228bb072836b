"""benchmarks/results.py end to end on a tiny synthetic set: 2 rows, 1 seed, 1 epoch of 2 steps.

Checks the machinery, not the numbers: the stored split keeps test cases out of the cache,
each (row, seed) leaves a JSON that a rerun skips, the page holds both rows and a "not run"
row, the plots exist, and a result saved under another budget is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lightseg.errors import LightsegError

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "benchmarks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_results_script_runs_resumes_and_renders(tmp_path, synthetic_dataset) -> None:
    results = _script()
    budget = results.Budget("tiny", epochs=1, iters_per_epoch=2, patch=16, batch_size=2, demo_cases=4, test_cases=1,
                            calibration_batches=1, latency_size=16, latency_warmup=0, latency_repeats=1)
    rows = [
        results.RowSpec("flat", "flat net", "LUnet", results._net("lunet", width=4, levels=3), main=True),
        results.RowSpec("doubling", "doubling net", "LUnet", results._net("unet", width=2, levels=3)),
        results.RowSpec("never", "never run", "baselines", results._net("lunet", width=2, levels=3)),
    ]
    out, doc = tmp_path / "out", tmp_path / "page" / "results.md"
    args = argparse.Namespace(seeds=1, other_seeds=1, data=str(synthetic_dataset), out=str(out), work=str(tmp_path / "work"),
                              doc=str(doc), threads=1, workers=0, infer_threads=1, device="cpu", quiet=True,
                              command="results.py (test)")
    page = results.run(rows[:2], budget, args, page_rows=rows)

    split = json.loads((out / "split.json").read_text())
    assert len(split["test"]) == 1 and len(split["train"]) == 3 and not set(split["test"]) & set(split["train"])
    cached = {p.name.removesuffix(".json") for p in (tmp_path / "work" / "cache" / "cases").glob("*.json")}
    assert cached == set(split["train"])  # the test case never reaches the plan or the cache
    for key in ("flat", "doubling"):
        saved = json.loads((out / "runs" / key / "seed0.json").read_text())
        assert 0.0 <= saved["dice"] <= 1.0 and saved["hd95"] >= 0.0 and saved["test_cases"] == 1
        assert 0 < saved["train"]["train_s"] < saved["train"]["wall_s"] and saved["train"]["params"] > 0 and saved["budget"] == budget.training()
        assert (out / "profile" / f"{key}.json").is_file()
        config = json.loads((tmp_path / "work" / "runs" / key / "seed0" / "config.json").read_text())
        assert config["optim"]["lr"] == budget.lr != 1e-3  # the budget's rate, not the recipe's
    flat_params = json.loads((out / "runs" / "flat" / "seed0.json").read_text())["train"]["params"]
    assert f"{flat_params / 1e6:.3f}" in page

    lines = {line.split(" | ")[0].strip("| *"): line for line in page.splitlines() if line.startswith("| ")}
    assert "flat net" in lines and "doubling net" in lines
    assert lines["never run"].count("not run") >= 5
    assert doc.read_text() == page
    for name in ("results_dice_params.png", "results_dice_time.png"):
        assert (doc.parent / name).read_bytes().startswith(b"\x89PNG")

    before = (out / "runs" / "flat" / "seed0.json").stat().st_mtime_ns
    results.run(rows[:2], budget, args, page_rows=rows)  # everything is done: nothing retrains
    assert (out / "runs" / "flat" / "seed0.json").stat().st_mtime_ns == before

    other = results.Budget(**{**budget.__dict__, "epochs": 2})
    with pytest.raises(LightsegError, match="another --out"):
        results.run(rows[:2], other, args)


@pytest.mark.slow
def test_a_row_trains_the_configuration_lightseg_train_writes(tmp_path, synthetic_dataset) -> None:
    import lightseg
    from lightseg.cli import main
    from lightseg.errors import ConfigError
    from lightseg.training.config import TrainConfig

    results = _script()
    budget = results.Budget("tiny", epochs=1, iters_per_epoch=1, patch=16, batch_size=1, demo_cases=4, test_cases=1,
                            calibration_batches=1)
    row = results.RowSpec("flat", "flat net", "LUnet", results._net("lunet", width=4, levels=3))
    cache = tmp_path / "cache"
    lightseg.preprocess_dataset(synthetic_dataset, cache, patch_size=(16, 16, 16))
    flags = ["--model", "lunet", "--model-kwargs", '{"width": 4, "levels": 3}', "--epochs", "1", "--iters-per-epoch", "1",
             "--patch", "16", "16", "16", "--batch", "1", "--seed", "2", "--lr", str(budget.lr)]
    assert main(["train", str(cache), "-o", str(tmp_path / "cli"), *flags, "--device", "cpu", "--workers", "0"]) == 0
    assert results.row_config(row, 2, cache, budget, "cpu") == TrainConfig.read(tmp_path / "cli" / "config.json")
    with pytest.raises(ConfigError, match=r"unknown training options \['curricullum'\]"):
        results.RowSpec("typo", "typo", "LUnet", {**results._net("lunet"), "curricullum": "pgps-efficiency"})
