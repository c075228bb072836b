"""Training speed per model and patch size, the data-wait fraction, and a short training's Dice.

Usage (the figures in docs/training.md; 2 CPU cores, demo data set)::

    python benchmarks/train_speed.py /tmp/demo_cache --steps --rounds 5   # the step table below

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

Step table (``--steps``): the training step (forward, cross-entropy, backward, AdamW) of each
``--step-models`` model at 2x1x64^3 (``--step-patch``), prepared as the trainer prepares it
(:func:`lightseg.training.memory_format.prepare_for_training`: its training memory format and
training forms; the trainer's optimizer (:func:`lightseg.training.optim.build_optimizer`); freed
memory reused as :func:`lightseg.allocator.reuse_freed_memory` does in ``lightseg train``), in one process, models interleaved round by round (A B C A B C ...)
so that load from other processes hits all alike; medians over ``--rounds``. "aug off" times the
step on a fixed batch, "aug on" also draws the batch from the cache with the default
augmentation in the same process (the trainer's loader workers overlap that share with the step
when a core is free). The demo row: LightMedSeg at the demo's 2x1x32^3 as the trainer ran it
before (contiguous, PyTorch's convs) and now, with the steps each fits in 5 minutes. The CPU
model, its vector extensions and the load average are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

# Five models' forward and backward convs in one process outgrow oneDNN's default cache of 1024
# compiled primitives, and each step then compiles its convs again: LightMedSeg's step measured
# 0.772 s in the five-model table against 0.583 s with this capacity (MONAI UNet 0.481 / 0.436).
# A training process holds one model and stays inside the default. Read when oneDNN starts.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch  # noqa: E402
import torch.nn.functional as F

from lightseg.allocator import reuse_freed_memory
from lightseg.benchmark.report import cpu_description
from lightseg.data.augment import build_augmenter
from lightseg.data.sampling import PatchSampler, cached_cases
from lightseg.models import create_model, first_output
from lightseg.run_folder import load_checkpoint
from lightseg.training.memory_format import prepare_for_training
from lightseg.training.optim import build_optimizer
from lightseg.training.run import train

STEP_CLASSES = 4
DEMO_BUDGET_S = 300.0


def step_fn(name: str, patch: int, trainer_prepared: bool, sampler: PatchSampler | None) -> Callable[[], None]:
    """One training step of ``name`` at 2x1xpatch^3; with ``sampler``, the batch is drawn (and augmented) first."""
    torch.manual_seed(0)
    model = create_model(name, 1, STEP_CLASSES)
    if trainer_prepared:
        model = prepare_for_training(model, name, "cpu")
    model.train()
    optimizer = build_optimizer("adamw", model.parameters(), 1e-3, 1e-4) if trainer_prepared else torch.optim.AdamW(
        model.parameters(), 1e-3, weight_decay=1e-4)
    fixed = torch.randn(2, 1, patch, patch, patch), torch.randint(0, STEP_CLASSES, (2, 1, patch, patch, patch))
    draws = iter(range(10**9))

    def step() -> None:
        images, labels = sampler.batch(next(draws)) if sampler is not None else fixed
        target = labels[:, 0].long().clamp_(0, STEP_CLASSES - 1)  # the timing does not depend on the label values
        loss = F.cross_entropy(first_output(model(images)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_table(args: argparse.Namespace) -> None:
    reuse_freed_memory()  # as `lightseg train` runs: freed activations reused, no page faults per step
    sampler = PatchSampler(args.data, cached_cases(args.data), (args.step_patch,) * 3, 2, 10**6,
                           augment=build_augmenter("default"))
    cases: dict[str, Callable[[], None]] = {}
    for name in args.step_models:
        cases[f"{name} aug off"] = step_fn(name, args.step_patch, True, None)
        cases[f"{name} aug on"] = step_fn(name, args.step_patch, True, sampler)
    cases["demo before"] = step_fn("lightmedseg", 32, False, None)
    cases["demo now"] = step_fn("lightmedseg", 32, True, None)
    for step in cases.values():  # warm-up: first-call allocations, kernel builds
        step()
    times: dict[str, list[float]] = {key: [] for key in cases}
    for _ in range(args.rounds):
        for key, step in cases.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(t) for key, t in times.items()}
    print(f"CPU: {cpu_description()}; {torch.get_num_threads()} threads; load average (1, 5, 15 min) before / after: "
          f"{args.load_before} / {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"training step at 2x1x{args.step_patch}^3, medians of {args.rounds} interleaved rounds (s)")
    reference = median.get("monai_unet aug off")
    print(f"{'model':<14}{'aug off':>9}{'(fastest)':>10}{'aug on':>9}{'data share':>12}{'vs monai_unet':>15}")
    for name in args.step_models:
        off, on = median[f"{name} aug off"], median[f"{name} aug on"]
        ratio = f"{off / reference:.2f}x" if reference else "-"
        print(f"{name:<14}{off:>9.3f}{min(times[f'{name} aug off']):>10.3f}{on:>9.3f}{max(0.0, 1 - off / on):>12.0%}{ratio:>15}")
    for key in ("demo before", "demo now"):
        print(f"{key}: LightMedSeg 2x1x32^3 {median[key]:.3f} s/step, {DEMO_BUDGET_S / median[key]:.0f} steps in 5 min")


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
    parser.add_argument("--steps", action="store_true", help="only the interleaved step table (data: a preprocessed cache)")
    parser.add_argument("--step-models", nargs="+", default=["lightmedseg", "lunet", "pspseg", "plainunet", "monai_unet"])
    parser.add_argument("--step-patch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    torch.set_num_threads(args.threads)
    if args.steps:
        step_table(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            speed_table(args, Path(tmp))
        if args.dice_model:
            dice_table(args, Path(tmp))


if __name__ == "__main__":
    main()
