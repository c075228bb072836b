"""Training speed per model and patch size, the data-wait fraction, and a short training's Dice.

Usage (the figures in docs/training.md; 2 CPU cores, demo data set)::

    lightseg demo-data /tmp/demo && lightseg preprocess /tmp/demo -o /tmp/demo_cache
    python benchmarks/train_speed.py /tmp/demo_cache --models lightmedseg lunet --patches 96 128 \
        --batch 2 --threads 2 --workers 2 --iters 6
    python benchmarks/train_speed.py /tmp/demo_cache --dice-model lunet --dice-epochs 10 --dice-iters 20 --patches 64

Table 1: every (model, patch) runs the real trainer (``lightseg.train``: sampler, augmentation in
DataLoader workers, loss, optimizer) for two epochs of ``--iters`` steps without validation; the
second epoch's seconds per iteration and data-wait fraction (time blocked in ``next(loader)`` /
epoch time) are printed, with the ratio against the first model at the same patch, all from
this run. Table 2 (``--dice-model``): a short training with a 20 % validation split; the final
sliding-window validation Dice (preprocessed grid) and the wall time. The demo data set is
augmented copies of one template, so that Dice measures fitting, not generalisation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lightseg.run_folder import load_checkpoint
from lightseg.training.run import train


def speed_table(args: argparse.Namespace, tmp: Path) -> None:
    print(f"{'model':<14}{'patch':>8}{'s/iter':>10}{'data wait':>11}{'vs ' + args.models[0]:>16}")
    for patch in args.patches:
        reference = None
        for model in args.models:
            run = train(args.data, tmp / f"{model}_{patch}", model, epochs=2, iters_per_epoch=args.iters,
                        patch_size=(patch,) * 3, batch_size=args.batch, workers=args.workers, val_fraction=0.0,
                        device="cpu", augment=args.augment)
            last = load_checkpoint(run / "checkpoint_final.pth")["history"][-1]
            reference = reference or last["sec_per_iter"]
            print(f"{model:<14}{patch:>7}^3{last['sec_per_iter']:>10.2f}{last['data_wait']:>11.1%}"
                  f"{last['sec_per_iter'] / reference:>15.2f}x", flush=True)


def dice_table(args: argparse.Namespace, tmp: Path) -> None:
    start = time.perf_counter()
    run = train(args.data, tmp / "dice", args.dice_model, epochs=args.dice_epochs, iters_per_epoch=args.dice_iters,
                patch_size=(args.patches[0],) * 3, batch_size=args.batch, workers=args.workers, val_fraction=0.2,
                device="cpu", augment=args.augment)
    wall = time.perf_counter() - start
    summary = json.loads((run / "validation" / "summary.json").read_text())
    history = load_checkpoint(run / "checkpoint_final.pth")["history"]
    print(f"\n{args.dice_model}: {args.dice_epochs} epochs x {args.dice_iters} iters, patch {args.patches[0]}^3, "
          f"batch {args.batch}: {wall / 60:.1f} min wall, mean data wait {sum(h['data_wait'] for h in history) / len(history):.1%}")
    print(f"validation Dice ({len(summary['cases'])} cases, {summary['space']}): {summary['mean_dice']}, "
          f"foreground mean {summary['foreground_mean_dice']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a raw data set or a preprocessed cache (the demo data set)")
    parser.add_argument("--models", nargs="+", default=["lightmedseg", "lunet"])
    parser.add_argument("--patches", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--augment", default="default", choices=("none", "light", "default"))
    parser.add_argument("--dice-model", default=None, help="also run a short training with validation")
    parser.add_argument("--dice-epochs", type=int, default=10)
    parser.add_argument("--dice-iters", type=int, default=20)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            speed_table(args, Path(tmp))
        if args.dice_model:
            dice_table(args, Path(tmp))


if __name__ == "__main__":
    main()
