"""PGPS against constant-patch training, measured in one run on the same data, model and epochs.

Trains the same model three ways with the same epoch budget, seed and split: constant patch
(the baseline), PGPS efficiency mode and PGPS performance mode (docs/pgps.md). Prints wall
time (whole run, and the training steps alone), voxels seen and the final full-case validation
Dice (foreground mean, sliding window over the held-out cases, not training data) of each, with ratios against the baseline, the time each curriculum
needs to reach the baseline's final validation pseudo Dice (the papers' "same Dice at 44 % of
the time"), and plots the per-epoch validation pseudo Dice against wall time.

    python benchmarks/pgps.py                  # the measurement (demo data set)
    python benchmarks/pgps.py --quick          # smoke run: a tiny model for a few epochs
    python benchmarks/pgps.py --data RAW_OR_CACHE --model plainunet --epochs 100

The papers' anchors (GPU, nnU-Net, 1000 epochs): efficiency reaches the baseline's Dice at
about 44 % of its time, performance mode beats it at about 89 %.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightseg.benchmark.runs import prepare_cache
from lightseg.training.callbacks import Callback
from lightseg.training.config import TrainConfig

ARMS = ("none", "pgps-efficiency", "pgps-performance")
DOCS = Path(__file__).resolve().parents[1] / "docs"


class _Clock(Callback):
    """Wall-clock seconds since training started, at the end of every epoch (validation included)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.elapsed: list[float] = []

    def on_train_start(self, trainer: Any) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        self.elapsed.append(time.perf_counter() - self.start)


def _run_arm(arm: str, cache: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from lightseg.run_folder import load_checkpoint
    from lightseg.training.run import train

    clock = _Clock()
    run_dir = work / arm
    start = time.perf_counter()
    train(
        cache, run_dir, args.model, model_kwargs=json.loads(args.model_kwargs), epochs=args.epochs,
        iters_per_epoch=args.iters, patch_size=args.patch, batch_size=args.batch, seed=args.seed,
        device=args.device, workers=args.workers, callbacks=[clock], curriculum=arm, max_batch=args.max_batch,
    )
    wall = time.perf_counter() - start
    config = TrainConfig.read(run_dir / "config.json").to_options()
    history = load_checkpoint(run_dir / "checkpoint_final.pth")["history"]
    voxels = sum(
        config["iters_per_epoch"] * h.get("batch_size", config["batch_size"]) * math.prod(h.get("patch_size", config["patch_size"]))
        for h in history
    )
    summary = json.loads((run_dir / "validation" / "summary.json").read_text())
    return {
        "arm": arm,
        "wall_s": wall,
        "train_loop_s": sum(h["epoch_time"] for h in history),
        "voxels": voxels,
        "final_dice": summary["foreground_mean_dice"],
        "elapsed": clock.elapsed,
        "val_dice": [h.get("val_dice", math.nan) for h in history],
        "val_dice_ema": [h.get("val_dice_ema", math.nan) for h in history],
        "patch_size": list(config["patch_size"]),
    }


def _time_to_reach(result: dict[str, Any], target: float) -> float | None:
    """First wall time at which the smoothed validation pseudo Dice reaches ``target``."""
    for elapsed, dice in zip(result["elapsed"], result["val_dice_ema"]):
        if dice >= target:
            return elapsed
    return None


def _table(results: list[dict[str, Any]]) -> str:
    base = results[0]
    target = base["val_dice_ema"][-1]
    rows = [
        "| training | wall time (s) | vs constant | training steps (s) | vs constant | voxels seen (M) | vs constant "
        "| final Dice | vs constant | time to constant's pseudo Dice |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reach = _time_to_reach(r, target)
        reach_text = "not reached" if reach is None else f"{reach:.1f} s ({reach / base['elapsed'][-1]:.0%})"
        rows.append(
            f"| {r['arm'] if r['arm'] != 'none' else 'constant patch'} | {r['wall_s']:.1f} | {r['wall_s'] / base['wall_s']:.2f} "
            f"| {r['train_loop_s']:.1f} | {r['train_loop_s'] / base['train_loop_s']:.2f} "
            f"| {r['voxels'] / 1e6:.3g} | {r['voxels'] / base['voxels']:.2f} "
            f"| {r['final_dice']:.4f} | {r['final_dice'] - base['final_dice']:+.4f} | {reach_text} |"
        )
    return "\n".join(rows)


def _plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        label = "constant patch" if r["arm"] == "none" else r["arm"]
        ax.plot(r["elapsed"], r["val_dice_ema"], label=f"{label} (final Dice {r['final_dice']:.3f})")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation pseudo Dice (EMA)")
    ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 4 demo cases, 4 epochs of 2 iterations, 32^3 patch, no loader workers")
    parser.add_argument("--data", help="raw data set or cache (default: the demo data set, built in the work folder)")
    parser.add_argument("--work", help="folder for the cache and the three runs (default: a temporary folder)")
    parser.add_argument("--model", default="lunet")
    parser.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"width\": 8}'")
    parser.add_argument("--cases", type=int, default=10, help="demo cases to generate (default 10)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--iters", type=int, default=20, help="iterations per epoch")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="full patch (default 64^3: ten V2 stages for lunet)")
    parser.add_argument("--max-batch", type=int, help="curriculum batch cap in patches (default: none, as in the papers)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--plot", type=Path, help="PNG path (default: docs/pgps_benchmark.png; --quick: in the work folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model_kwargs, args.epochs, args.iters, args.workers, args.patch = '{"width": 4, "levels": 3}', 4, 2, 0, [32, 32, 32]
        args.cases = min(args.cases, 4)

    with tempfile.TemporaryDirectory(prefix="lightseg_pgps_") as tmp:
        work = Path(args.work or tmp)
        cache = prepare_cache(args.data, work, args.cases)
        results = [_run_arm(arm, cache, work, args) for arm in ARMS]
        setting = (
            f"{args.model} {args.model_kwargs}, {args.epochs} epochs x {args.iters} iterations, "
            f"patch {results[0]['patch_size']}, batch {args.batch}, {args.device}, torch threads {torch.get_num_threads()}"
        )
        plot = args.plot or (work / "pgps_benchmark.png" if args.quick else DOCS / "pgps_benchmark.png")
        _plot(results, plot, setting)
        print(f"\nPGPS benchmark: {setting}\n")
        print(_table(results))
        print(f"\nfinal Dice: sliding window over the held-out validation cases; plot: {plot}")
        if not args.quick:
            raw = {r["arm"]: {k: v for k, v in r.items() if k != "arm"} for r in results}
            (plot.with_suffix(".json")).write_text(json.dumps({"setting": setting, "results": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
