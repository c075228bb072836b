"""PSP-Seg-S against an nnU-Net-style plain U-Net, measured in one run on the same data and epochs.

Three arms with the same epoch budget, seed, patch and split: ``plainunet`` (nnU-Net 3d_fullres
topology, deep supervision on; the baseline), PSP-Seg-S unpruned (functional-decoupling loss
on) and PSP-Seg-S with progressive pruning (FD loss + pruning, docs/pspseg.md). Prints the
parameters at the end, peak training memory, training wall time (first to last epoch, pruning
searches included, final validation excluded) and the final validation Dice
(sliding window over the held-out cases, not training data), with ratios against the baseline.

    python benchmarks/pspseg.py                # GPU budget: 100 x 25 at the plan's patch (hours on a CPU)
    python benchmarks/pspseg.py --epochs 100 --iters 3 --window 3 --calibration-batches 10 --patch 32 32 32
                                               # the CPU measurement in docs/pspseg.md (about 33 min on 2 cores)
    python benchmarks/pspseg.py --quick        # smoke run: tiny widths, 4 epochs of 2 iterations

The pruning window (10 epochs of 1000 in the paper) is scaled to the budget: ``--window``
defaults to a tenth of the epochs (at least 2). The paper's anchors (PSP-Seg-S vs nnU-Net, GPU,
1000 epochs): parameters -83 to -87 %, memory -42 to -45 %, training time -29 to -48 %, Dice on par.
Every arm trains in a fresh interpreter through :func:`lightseg.benchmark.runs.run_training`
(its docstring defines peak memory and ``train_s``): in one process, the memory an earlier arm
left in the allocator hid a later arm's growth (two identical PSP-Seg trainings measured 197
and 110 MB one after the other).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightseg.benchmark.report import device_description, update_markdown_section
from lightseg.benchmark.runs import TrainJob, prepare_cache, run_training, scaled_pruning_options
from lightseg.training.run import training_config

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _patch(cache: Path, args: argparse.Namespace) -> list[int]:
    """The plan's patch rounded down to a multiple of 32 (the largest divisor the baseline needs)."""
    if args.patch:
        return list(args.patch)
    plan = json.loads((cache / "plan.json").read_text())
    return [max(32, int(p) // 32 * 32) for p in plan["patch_size"]]


def _baseline_stages(patch: list[int]) -> int:
    """nnU-Net's planning rule for the baseline: halve until the smallest side is 4 voxels, at most 6 stages."""
    return min(6, 1 + int(math.log2(min(patch) // 4)))


def _run_arm(name: str, model: str, kwargs: dict[str, Any], pruning: str, cache: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    options = dict(
        model=model, model_kwargs=kwargs, epochs=args.epochs, iters_per_epoch=args.iters, patch_size=tuple(args.patch),
        batch_size=args.batch, seed=args.seed, pruning=pruning,
        **scaled_pruning_options(args.epochs, args.window, args.calibration_batches),
    )  # fmt: skip
    job = TrainJob(training_config(cache, device=args.device, **options), str(work / f"{model}_{pruning}"), device=args.device,
                   workers=args.workers, threads=args.threads)
    result = run_training(job)
    run_dir = Path(result.run_dir)
    summary = json.loads((run_dir / "validation" / "summary.json").read_text())
    log = (run_dir / "training_log.txt").read_text().splitlines()
    return {
        "arm": name,
        "params": result.params,
        "memory_mb": result.peak_mb,
        "train_s": result.train_s,
        "final_dice": summary["foreground_mean_dice"],
        "pruning_log": [line for line in log if "pruning" in line],
    }


def _table(results: list[dict[str, Any]]) -> str:
    base = results[0]
    rows = [
        "| model | parameters (M) | vs baseline | peak training memory (MB) | vs baseline | training time (s) | vs baseline | final validation Dice | vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['arm']} | {r['params'] / 1e6:.2f} | {r['params'] / base['params'] - 1:+.0%} "
            f"| {r['memory_mb']:.0f} | {r['memory_mb'] / base['memory_mb'] - 1:+.0%} "
            f"| {r['train_s']:.1f} | {r['train_s'] / base['train_s'] - 1:+.0%} "
            f"| {r['final_dice']:.4f} | {r['final_dice'] - base['final_dice']:+.4f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny widths, 4 epochs of 2 iterations, 32^3 patch")
    parser.add_argument("--data", help="raw data set or cache (default: the demo data set, built in the work folder)")
    parser.add_argument("--work", help="folder for the cache and the runs (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=100, help="the epoch budget every arm gets")
    parser.add_argument("--iters", type=int, default=25, help="iterations per epoch")
    parser.add_argument("--patch", type=int, nargs=3, help="patch (default: the plan's, rounded to a multiple of 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--window", type=int, default=None, help="pruning convergence window (default: epochs / 10, at least 2)")
    parser.add_argument("--calibration-batches", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every arm")
    args = parser.parse_args(argv)
    baseline_kwargs: dict[str, Any] = {"deep_supervision": True}
    pspseg_kwargs: dict[str, Any] = {"size": "S"}
    if args.quick:
        args.epochs, args.iters, args.workers, args.calibration_batches = 4, 2, 0, 2
        args.window = args.window or 1
        args.patch = args.patch or [32, 32, 32]
        baseline_kwargs.update(width=4, max_width=16, stages=4)
        pspseg_kwargs["channels"] = [4, 8, 8, 8, 8]

    with tempfile.TemporaryDirectory(prefix="lightseg_pspseg_") as tmp:
        work = Path(args.work or tmp)
        cache = prepare_cache(args.data, work)
        args.patch = _patch(cache, args)
        baseline_kwargs.setdefault("stages", _baseline_stages(args.patch))
        arms = [
            ("plainunet (nnU-Net-style)", "plainunet", baseline_kwargs, "none"),
            ("PSP-Seg-S unpruned", "pspseg", pspseg_kwargs, "fd"),
            ("PSP-Seg-S progressive pruning", "pspseg", pspseg_kwargs, "progressive"),
        ]
        results = [_run_arm(*arm, cache, work, args) for arm in arms]
    setting = (
        f"{args.epochs} epochs x {args.iters} iterations, patch {args.patch}, batch {args.batch}, {args.device}"
        f" {device_description(args.device)}, torch threads {args.threads}, "
        f"pruning window {scaled_pruning_options(args.epochs, args.window)['pruning_window']}, {args.calibration_batches} calibration batches, one run"
    )
    table = _table(results)
    print(f"\nPSP-Seg benchmark: {setting}\n\n{table}\n")
    for line in results[-1]["pruning_log"]:
        print(line)
    if not args.quick:
        command = shlex.join(["python", "benchmarks/pspseg.py", *(sys.argv[1:] if argv is None else argv)])
        text = f"Measured with `{command}` ({setting}):\n\n{table}\n"
        update_markdown_section(DOCS / "pspseg.md", "pspseg-benchmark", text)
        print(f"\ntable written to {DOCS / 'pspseg.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
