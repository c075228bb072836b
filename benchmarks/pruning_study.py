"""LUnet's pruning study at toy scale: STAMP against random channel removal (docs/lunet.md).

The doubling U-Net (``unet``, first-layer width C) is trained while channels are removed by each
rule of :mod:`lightseg.training.channel_pruning` (``stamp``, ``random-in-stamp-layer``,
``random-in-largest-layer``) down to the parameter count of LUnet at width ``--lunet-width``;
LUnet at that width and the unpruned U-Net train with the same budget. Each arm trains in a
fresh process (:func:`lightseg.benchmark.runs.run_training`) on the same split; its final Dice
is the trainer's final validation (sliding window over the held-out cases, preprocessed grid,
foreground mean). Pruning arms run ``--seeds`` seeds, the two references one.

Writes the raw rows (``--json``), the per-unit width plot (``--plot``) and prints the tables
that docs/lunet.md quotes. A finished arm's result is kept in ``WORK/results/`` and reused, so
an interrupted study continues where it stopped (delete the folder to start afresh). Several
study processes may share one work folder to train arms side by side: each arm is claimed by a
``.running`` marker; a process that met an arm claimed by another writes no tables, so run the
command once more after all have finished (every arm is then read back, nothing retrains).

    python benchmarks/pruning_study.py --work /tmp/lightseg_pruning_study   # the study (2 CPU cores: 41 min under load)
    python benchmarks/pruning_study.py --quick                              # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

from lightseg.benchmark.runs import TrainJob, prepare_cache, run_training
from lightseg.data.dataset import read_dataset_json
from lightseg.data.sampling import cached_cases
from lightseg.io import write_json
from lightseg.models import create_model
from lightseg.training.channel_pruning import RULES, prunable_units
from lightseg.training.run import training_config

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _level(unit: str, levels: int) -> int:
    """The resolution level of a U-Net conv unit (``encoders.L.j`` or ``decoders.i[.j]``)."""
    kind, index = unit.split(".")[:2]
    return int(index) if kind == "encoders" else levels - 2 - int(index)


def _splits(cache: Path, work: Path, val_cases: int) -> Path:
    cases = cached_cases(cache)
    path = work / "splits.json"
    write_json(path, {"train": cases[:-val_cases], "val": cases[-val_cases:]})
    return path


def _arms(args: argparse.Namespace, target: int) -> list[dict[str, Any]]:
    """Every training: the two references (one seed), then each rule with each seed."""
    unet = {"width": args.width, "levels": args.levels}
    arms = [
        {"arm": "unet", "model": "unet", "kwargs": unet, "seed": 0, "pruning": None},
        {"arm": "lunet", "model": "lunet", "kwargs": {"width": args.lunet_width, "levels": args.levels}, "seed": 0, "pruning": None},
    ]
    for seed in range(args.seeds):
        for rule in RULES:
            pruning = {  # training options; the rule draws with the arm's seed
                "channel_pruning": rule, "channel_pruning_channels_per_step": args.channels_per_step,
                "channel_pruning_recovery_epochs": args.recovery_epochs, "channel_pruning_start_epoch": args.start_epoch,
                "channel_pruning_target_params": target, "channel_pruning_ranking_batches": args.ranking_batches,
            }  # fmt: skip
            arms.append({"arm": rule, "model": "unet", "kwargs": unet, "seed": seed, "pruning": pruning})
    return arms


def _run(arm: dict[str, Any], cache: Path, splits: Path, work: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train one arm (or read its saved result) and collect what the tables need; None when
    another study process sharing ``work`` is training it (its ``.running`` marker exists)."""
    saved = work / "results" / f"{arm['arm']}_seed{arm['seed']}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    marker = saved.with_suffix(".running")
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    try:
        return _train(arm, cache, splits, work, saved, args)
    finally:
        marker.unlink()


def _train(arm: dict[str, Any], cache: Path, splits: Path, work: Path, saved: Path, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = work / "runs" / f"{arm['arm']}_seed{arm['seed']}"
    options = dict(
        model=arm["model"], model_kwargs=arm["kwargs"], epochs=args.epochs, iters_per_epoch=args.iters,
        patch_size=(args.patch,) * 3, batch_size=args.batch, seed=arm["seed"], lr=args.lr, **(arm["pruning"] or {}),
    )  # fmt: skip
    job = TrainJob(training_config(cache, **options), str(run_dir), splits=str(splits), workers=args.workers, threads=args.threads)
    print(f"[{time.strftime('%H:%M:%S')}] training {arm['arm']} seed {arm['seed']}", file=sys.stderr, flush=True)
    trained = run_training(job, quiet=True)
    summary = json.loads((run_dir / "validation" / "summary.json").read_text())
    widths = trained.architecture or create_model(arm["model"], 1, 2, **arm["kwargs"]).architecture()
    result = {**arm, "dice": summary["foreground_mean_dice"], "params": trained.params, "widths": dict(widths),
              "train_s": trained.train_s, "wall_s": trained.wall_s, "threads": trained.threads, "workers": trained.workers}
    write_json(saved, result)
    print(f"[{time.strftime('%H:%M:%S')}] {arm['arm']} seed {arm['seed']}: Dice {result['dice']:.4f}, "
          f"{result['params']} parameters, {result['train_s']:.0f} s", file=sys.stderr, flush=True)
    return result


def _mean_sd(values: Sequence[float], digits: int) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _by_arm(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        grouped.setdefault(r["arm"], []).append(r)
    return grouped


def summary_table(results: Sequence[dict[str, Any]], units: Sequence[str], original: dict[str, int], levels: int) -> str:
    """Dice, parameters, training time and where the removed channels came from, per arm."""
    deep = [u for u in units if _level(u, levels) >= levels - 2]
    lines = [
        "| arm | seeds | parameters | final Dice | training time (s) | channels removed | of them from the two deepest levels |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, rows in _by_arm(results).items():
        removed = [sum(original[u] - r["widths"][u] for u in units) for r in rows]
        from_deep = [sum(original[u] - r["widths"][u] for u in deep) / max(1, k) for r, k in zip(rows, removed)]
        pruned = arm in RULES
        lines.append(
            f"| {arm} | {len(rows)} | {_mean_sd([r['params'] for r in rows], 0)} | {_mean_sd([r['dice'] for r in rows], 4)} "
            f"| {_mean_sd([r['train_s'] for r in rows], 0)} | {_mean_sd(removed, 0) if pruned else '-'} "
            f"| {_mean_sd([100 * f for f in from_deep], 0) + ' %' if pruned else '-'} |"
        )
    share = sum(original[u] for u in deep) / sum(original[u] for u in units)
    lines.append(f"\nThe two deepest levels hold {share:.0%} of the U-Net's prunable channels before pruning.")
    return "\n".join(lines)


def level_table(results: Sequence[dict[str, Any]], units: Sequence[str], levels: int) -> str:
    """Mean width of the conv units at each level after training, per arm (mean over seeds)."""
    grouped = _by_arm(results)
    lines = ["| level | " + " | ".join(grouped) + " |", "|---" * (len(grouped) + 1) + "|"]
    for level in range(levels):
        at = [u for u in units if _level(u, levels) == level]
        if not at:
            continue
        cells = [statistics.fmean(r["widths"][u] for r in rows for u in at) for rows in grouped.values()]
        lines.append(f"| {level} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], units: Sequence[str], original: dict[str, int], path: Path, title: str) -> None:
    """Top: every unit's width after training per arm; bottom: the share of its channels each rule removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = _by_arm(results)
    x = range(len(units))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for arm, rows in grouped.items():
        mean = [statistics.fmean(r["widths"][u] for r in rows) for u in units]
        style = {"unet": "k--", "lunet": "k:"}.get(arm, "o-")
        top.plot(x, mean, style, label=f"{arm} ({len(rows)} seed{'s' * (len(rows) > 1)})")
        if arm in RULES:
            removed = [[1 - r["widths"][u] / original[u] for u in units] for r in rows]
            mean_removed = [statistics.fmean(col) for col in zip(*removed)]
            low = [m - min(col) for m, col in zip(mean_removed, zip(*removed))]
            high = [max(col) - m for m, col in zip(mean_removed, zip(*removed))]
            bottom.errorbar(x, mean_removed, yerr=[low, high], fmt="o-", capsize=3, label=arm)
    top.set_yscale("log", base=2)
    top.set_ylabel("output channels after training")
    top.set_title(textwrap.fill(title, 130), fontsize="small")
    bottom.set_ylabel("share of the unit's channels removed\n(mean, bars: min-max over seeds)")
    bottom.set_ylim(0, 1)
    bottom.set_xticks(list(x), [u.replace("encoders.", "enc ").replace("decoders.", "dec ") for u in units], rotation=60, fontsize="small")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 levels, 4 cases, 4 epochs of 2 iterations, 1 seed")
    parser.add_argument("--data", help="raw data set or cache (default: the demo data set, built in the work folder)")
    parser.add_argument("--work", help="folder for the cache, runs and saved results (default: a temporary folder)")
    parser.add_argument("--cases", type=int, default=10, help="demo cases to generate (default 10)")
    parser.add_argument("--val-cases", type=int, default=3, help="held-out cases scored by the final validation (default 3)")
    parser.add_argument("--width", type=int, default=4, help="the doubling U-Net's first-layer width C (default 4)")
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--lunet-width", type=int, default=8, help="LUnet width whose parameter count is the target (default 8)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iters", type=int, default=10, help="iterations per epoch (default 10)")
    parser.add_argument("--patch", type=int, default=32, help="cubic patch side (default 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of every arm (default 0.01, as on the results page)")
    parser.add_argument("--channels-per-step", type=int, default=24, help="channels removed per pruning step (default 24)")
    parser.add_argument("--recovery-epochs", type=int, default=1)
    parser.add_argument("--start-epoch", type=int, default=2, help="epochs trained before the first step (default 2)")
    parser.add_argument("--ranking-batches", type=int, default=None, help="batches per STAMP ranking (default: one epoch's)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each pruning arm (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per training (default 1, beside 1 loader worker)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, help="raw rows (default: docs/lunet_study.json; --quick: in the work folder)")
    parser.add_argument("--plot", type=Path, help="PNG (default: docs/lunet_study_widths.png; --quick: in the work folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels, args.cases, args.val_cases, args.epochs, args.iters, args.seeds = 3, 4, 1, 4, 2, 1
        args.lunet_width, args.channels_per_step, args.start_epoch, args.patch = 4, 8, 1, 16

    with tempfile.TemporaryDirectory(prefix="lightseg_pruning_study_") as tmp:
        work = Path(args.work or tmp)
        json_path = args.json or (work / "lunet_study.json" if args.quick else DOCS / "lunet_study.json")
        plot_path = args.plot or (work / "lunet_study_widths.png" if args.quick else DOCS / "lunet_study_widths.png")
        cache = prepare_cache(args.data, work, args.cases)
        splits = _splits(cache, work, args.val_cases)
        spec = read_dataset_json(cache / "dataset.json")
        shape = (spec.num_channels, spec.num_classes)
        target = sum(p.numel() for p in create_model("lunet", *shape, width=args.lunet_width, levels=args.levels).parameters())
        reference = create_model("unet", *shape, width=args.width, levels=args.levels)
        units = list(prunable_units(reference))
        original = reference.architecture()
        start = time.perf_counter()
        arms = _arms(args, target)
        results = [r for r in (_run(arm, cache, splits, work, args) for arm in arms) if r is not None]
        if len(results) < len(arms):
            print(f"{len(arms) - len(results)} arm(s) are being trained by another study process on {work}; "
                  "run this command again once it has finished to write the tables (a marker "
                  f"{work / 'results'}/*.running left by a killed process must be deleted first)")
            return 0
        setting = (f"doubling U-Net C = {args.width}, {args.levels} levels, pruned to LUnet C = {args.lunet_width}'s "
                   f"{target} parameters; {args.epochs} epochs x {args.iters} iterations, patch {args.patch}³, "
                   f"batch {args.batch}, {args.channels_per_step} channels per step every {args.recovery_epochs} epoch(s) "
                   f"from epoch {args.start_epoch}")
        write_json(json_path, {"setting": setting, "args": {k: str(v) for k, v in vars(args).items()}, "results": results})
        plot(results, units, original, plot_path, setting)
        print(f"{setting}; study {time.perf_counter() - start:.0f} s\n")
        print(summary_table(results, units, original, args.levels))
        print()
        print(level_table(results, units, args.levels))
        print(f"\n{json_path} and {plot_path} written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
