"""benchmarks/pruning_study.py: its arms and tables on constructed results (no training), and its section of the results page."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("pruning_study_script", ROOT / "benchmarks" / "pruning_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_levels_of_the_units():
    study = _script()
    assert [study._level(u, 3) for u in ("encoders.0.1", "encoders.2.0", "decoders.0.1", "decoders.1")] == [0, 2, 1, 0]


def test_arms_prune_every_rule_to_one_target_with_each_seed():
    study = _script()
    args = argparse.Namespace(width=4, levels=3, lunet_width=4, seeds=2, channels_per_step=8, recovery_epochs=1,
                              start_epoch=1, ranking_batches=None)
    arms = study._arms(args, target=5000)
    assert [a["arm"] for a in arms[:2]] == ["unet", "lunet"] and all(a["pruning"] is None for a in arms[:2])
    pruned = arms[2:]
    assert len(pruned) == 6 and {a["pruning"]["channel_pruning_target_params"] for a in pruned} == {5000}
    assert sorted((a["arm"], a["seed"]) for a in pruned) == sorted((r, s) for r in study.RULES for s in range(2))
    assert all(a["pruning"]["channel_pruning"] == a["arm"] for a in pruned)


def test_tables_count_removed_channels_and_level_widths():
    study = _script()
    units = ["encoders.0.0", "encoders.0.1", "encoders.1.0", "encoders.1.1", "decoders.0"]
    original = {"encoders.0.0": 4, "encoders.0.1": 4, "encoders.1.0": 8, "encoders.1.1": 8, "decoders.0": 4}
    pruned = {**original, "encoders.1.0": 4, "encoders.1.1": 6}
    rows = [
        {"arm": "unet", "seed": 0, "params": 100, "dice": 0.5, "train_s": 10.0, "widths": original},
        {"arm": "stamp", "seed": 0, "params": 60, "dice": 0.6, "train_s": 12.0, "widths": pruned},
        {"arm": "stamp", "seed": 1, "params": 62, "dice": 0.4, "train_s": 14.0, "widths": {**pruned, "encoders.0.0": 2}},
    ]
    table = study.summary_table(rows, units, original, levels=3)  # decoders.0 is at level 1; level 2 is empty here
    stamp = next(line for line in table.splitlines() if line.startswith("| stamp"))
    # 6 and 8 channels removed; all of seed 0's and 6 of seed 1's 8 from level 1 (100 % and 75 %)
    assert "| 2 | 61 ± 1 | 0.5000 ± 0.1414 | 13 ± 1 | 7 ± 1 | 88 ± 18 % |" in stamp
    levels = study.level_table(rows, units, levels=3)
    assert "| 1 | 6.7 | 4.7 |" in levels and "| 0 | 4.0 | 3.5 |" in levels and "| 2 |" not in levels


def test_results_page_section_reads_the_saved_study(tmp_path):
    spec = importlib.util.spec_from_file_location("results_script_for_study", ROOT / "benchmarks" / "results.py")
    results = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = results
    spec.loader.exec_module(results)
    path = tmp_path / "lunet_study.json"
    assert results.pruning_study_section(path).startswith("not run")
    rows = [
        {"arm": "unet", "params": 1000, "dice": 0.5, "train_s": 60.0},
        {"arm": "stamp", "params": 100, "dice": 0.6, "train_s": 90.0},
        {"arm": "stamp", "params": 98, "dice": 0.7, "train_s": 150.0},
    ]
    path.write_text(json.dumps({"setting": "toy", "results": rows}))
    section = results.pruning_study_section(path)
    assert "| unet | 1 | 1000 | 0.500 | 1.0 |" in section
    assert "| stamp | 2 | 99 ± 1 | 0.650 ± 0.071 | 2.0 ± 0.7 |" in section
