"""``lightseg demo``: the whole toolkit in one command, on data built at run time.

Stages, each a call of the public API and each timed: build the demo data set
(:func:`lightseg.data.demo.make_demo_dataset`, skipped when present), verify it, preprocess it,
train (:func:`lightseg.train`) on all cases but the held-out ones, predict the held-out cases to
NIfTI (:func:`lightseg.predict`), evaluate them (:func:`lightseg.evaluate`), score a k-means
intensity-clustering reference on the same cases the same way, draw an overlay figure, and check
robustness: the model on inputs unlike its training cases (:mod:`lightseg.demo_robustness`).

Choices (docs/demo.md gives the measurements behind them):

* 1.5 mm voxels, written so by the generator (no resampling: the evaluation grid is the training
  grid). LightMedSeg's stem halves the resolution, so thin CSF and grey matter need the finer
  grid: the same 342-437 steps gave held-out Dice 0.75-0.76 at 2 mm and 0.80 at 1.5 mm (CSF
  0.61 -> 0.71), against k-means 0.69 at both. A step costs the same (the patch is in voxels);
  prediction has 2.4x more voxels, which two tiles per network call pay for.
* 32^3 patches, batch 2: a LightMedSeg step costs a ninth of one at 64^3, so the budget buys
  that many more optimizer steps, which matters more than context in a few minutes (48 mm of
  context is enough for tissue classes). Measured at 2 mm: 48^3 reached held-out Dice 0.62,
  32^3 0.74.
* 8 cases: 6 train, 2 held out (a quarter). Every case is a warped copy of one template, so more
  training cases add little; the held-out cases are predicted from scratch on their own grid.
* The training budget is kept honestly: a short pilot run of two epochs (the second one's
  steps, warm, timed by the trainer) gives the seconds per step, then the epoch count is chosen
  so the main run fills what is left of ``minutes`` (a cosine schedule needs its length up
  front). The pilot counts as training time, and its time beyond its steps (model build, worker
  start, the cold first epoch) is set aside once more for the main run, which pays it again.
  The pilot times 8 steps: 2 timed steps read 23 % above and 17 % below the main run's pace in
  two demo runs.
* On CPU, training uses one intra-op thread per remaining core after one data-loading worker:
  on 2 cores, one core trains while the other augments patches. Two threads next to a busy
  worker (or on a shared machine) oversubscribe the cores, and measured 6-10x slower per step.
  Prediction has no worker beside it and gets PyTorch's default thread count back.
* Learning rate 1e-2 instead of the LightMedSeg recipe's 1e-3 (AdamW, cosine, kept): in a
  budget of about a hundred steps 1e-3 barely moves the loss (grey matter Dice stayed 0 after
  95 steps), 1e-2 learns all three tissues; the rest of the recipe (loss of Eq. 22, warm-up)
  is the model's.
* No validation split during training (the held-out cases are scored after training, on the
  input grid); the final checkpoint is used.
* Training augmentation: ``default`` (nnU-Net's set) unless ``augment`` says otherwise; the demo
  data's per-case variation (background, storage, contrast, bias, blur, orientation) does most of
  the work against inputs from elsewhere (docs/demo.md compares it with ``strong``).
* The reference segments the held-out cases by 1D k-means (3 clusters: CSF, GM, WM by rising
  T1 intensity) inside the ground-truth brain mask: it is handed the true brain outline, so it
  is an optimistic baseline for intensity-only segmentation.

The data are augmented copies of one template, not patients: the scores measure fitting to
that anatomy, not generalisation; every printed summary says so.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lightseg.errors import DatasetError
from lightseg.io import copy_file, load_nifti, save_nifti, write_json

NOTE = (
    "Note: the demo cases are augmented copies (warps, bias field, noise) of ONE brain template "
    "(MNI ICBM152 2009a), not patients; held-out scores measure fitting to that anatomy, not "
    "generalisation to new patients."
)
PILOT_STEPS = 8  # per pilot epoch; the first epoch warms up (allocator, oneDNN kernels, worker start)
TARGET_EPOCHS = 20  # the LR changes per epoch: enough epochs for a smooth cosine
DATA_WORKERS = 1
HELD_OUT_FRACTION = 0.25
MARKER = ".lightseg_demo"
FRESH = ("pilot", "run", "heldout", "predictions", "reference_kmeans", "robustness")  # redone on every run


@dataclass(frozen=True)
class DemoConfig:
    """What ``lightseg demo`` runs; the defaults are the documented demo."""

    out: Path = Path("lightseg_demo")
    minutes: float = 5.0
    cases: int = 8
    model: str = "lightmedseg"
    seed: int = 0
    device: str = "cpu"
    spacing: float = 1.5
    patch: tuple[int, int, int] = (32, 32, 32)
    lr: float = 1e-2
    augment: str = "default"


def split_cases(names: list[str]) -> tuple[list[str], list[str]]:
    """(train, held out): the last quarter of the sorted names, at least one, is held out."""
    if len(names) < 2:
        raise DatasetError(f"the demo needs at least 2 cases (1 to train, 1 to hold out), got {len(names)}; raise --cases")
    held = max(1, round(HELD_OUT_FRACTION * len(names)))
    names = sorted(names)
    return names[:-held], names[-held:]


def plan_training(budget_s: float, sec_per_step: float) -> tuple[int, int]:
    """(epochs, iterations per epoch) whose steps fill ``budget_s`` at ``sec_per_step``.

    At least one step; about :data:`TARGET_EPOCHS` epochs once there are that many steps.
    """
    steps = max(1, int(budget_s / max(sec_per_step, 1e-6)))
    iters = max(1, math.ceil(steps / TARGET_EPOCHS))
    return max(1, steps // iters), iters


def kmeans_1d(values: np.ndarray, k: int = 3, max_iter: int = 100) -> np.ndarray:
    """Sorted centres of 1D k-means (Lloyd's algorithm, started at the k quantile midpoints).

    In one dimension the clusters are intervals, so each assignment is a search between the
    midpoints of adjacent centres; this is the multi-level Otsu criterion (least within-class
    variance), found locally.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    centres = np.percentile(values, 100 * (np.arange(k) + 0.5) / k)
    for _ in range(max_iter):
        assign = np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
        sums = np.bincount(assign, weights=values, minlength=k)
        counts = np.bincount(assign, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.allclose(new, centres):
            break
        centres = np.sort(new)
    return np.sort(centres)


def kmeans_tissue(image: np.ndarray, brain: np.ndarray, k: int = 3) -> np.ndarray:
    """Label ``brain`` voxels 1..k by intensity cluster (darkest = 1), everything else 0 (uint8)."""
    out = np.zeros(image.shape, dtype=np.uint8)
    values = image[brain].astype(np.float64)
    if values.size:
        centres = kmeans_1d(values, k)
        out[brain] = 1 + np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
    return out


def write_reference(images_dir: Path, labels_dir: Path, out_dir: Path, cases: list[str]) -> None:
    """The k-means reference of each case (brain mask = ground-truth label > 0) as NIfTI."""
    for case in cases:
        image = load_nifti(images_dir / f"{case}_0000.nii.gz")
        brain = np.asanyarray(load_nifti(labels_dir / f"{case}.nii.gz").dataobj) > 0
        save_nifti(out_dir / f"{case}.nii.gz", kmeans_tissue(np.asanyarray(image.dataobj), brain), image)


def _prepare_out(out: Path) -> None:
    """Refuse a folder that holds anything but an earlier demo; clear the outputs that are redone."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DatasetError(f"{out}: folder is not empty and was not made by `lightseg demo`; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for name in FRESH:
        shutil.rmtree(out / name, ignore_errors=True)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        copy_file(source, target)  # never through a link already at target


def _sec_per_step(run_dir: Path) -> float:
    from lightseg.run_folder import checkpoint_path, load_checkpoint

    history = load_checkpoint(checkpoint_path(run_dir, "final"))["history"]
    return float(history[-1]["sec_per_iter"])


def _scores(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = {info["name"]: summary["mean"][key] for key, info in summary["targets"].items()}
    rows["foreground mean"] = summary["foreground_mean"]
    return {name: {"Dice": m["Dice"], "HD95": m["HD95"]} for name, m in rows.items()}


def comparison_table(model: str, ours: dict[str, dict[str, float]], reference: dict[str, dict[str, float]]) -> str:
    """Dice and HD95 (mm) per class for the model beside the k-means reference."""
    width = max(len(n) for n in ours)
    header = f"{'class':<{width}}  {model + ' Dice':>18}  {'HD95 mm':>8}  {'k-means Dice':>12}  {'HD95 mm':>8}"
    lines = [header, "-" * len(header)]
    for name, m in ours.items():
        r = reference[name]
        lines.append(f"{name:<{width}}  {m['Dice']:18.4f}  {m['HD95']:8.2f}  {r['Dice']:12.4f}  {r['HD95']:8.2f}")
    return "\n".join(lines)


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage into ``config.out``; return (and write to ``demo_summary.json``) the results."""
    import torch

    import lightseg
    from lightseg.data.dataset import load_dataset
    from lightseg.data.demo import make_demo_dataset
    from lightseg.evaluation.overlay import save_overlay

    out = Path(config.out)
    _prepare_out(out)
    times: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        echo(f"\n== {name}")
        start = time.perf_counter()
        yield
        times[name] = time.perf_counter() - start
        echo(f"== {name}: {times[name]:.1f} s")

    echo(NOTE)
    load_start = os.getloadavg()
    data, cache, run = out / "MNI152Demo", out / "cache", out / "run"
    with stage("data"):
        make_demo_dataset(data, num_cases=config.cases, seed=config.seed, spacing=config.spacing, progress=True)
    with stage("verify"):
        report = lightseg.verify_dataset(data, raise_on_error=True)
        echo(f"{data}: {report.num_training} training cases, no problems")
    with stage("preprocess"):
        plan = lightseg.preprocess_dataset(data, cache, patch_size=config.patch)
        echo(f"target spacing {list(plan.target_spacing)} mm, median shape {list(plan.median_shape or ())}, "
             f"patch {list(plan.patch_size)}")
    dataset = load_dataset(data)
    train_cases, held_out = split_cases([case.name for case in dataset.training])
    splits = out / "splits.json"
    write_json(splits, {"train": train_cases, "val": []})

    threads = torch.get_num_threads()
    if config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - DATA_WORKERS))
    common = dict(patch_size=config.patch, splits=splits, device=config.device, workers=DATA_WORKERS, seed=config.seed,
                  lr=config.lr, augment=config.augment)
    try:
        with stage("train"):
            budget = 60.0 * config.minutes
            start = time.perf_counter()
            echo(f"pilot: 2 epochs x {PILOT_STEPS} steps of {config.model} (patch {list(config.patch)}, batch 2, "
                 f"{torch.get_num_threads()} thread(s) + {DATA_WORKERS} data worker); the second epoch is timed")
            lightseg.train(cache, out / "pilot", config.model, epochs=2, iters_per_epoch=PILOT_STEPS, **common)
            sec_per_step = _sec_per_step(out / "pilot")
            shutil.rmtree(out / "pilot")
            pilot_s = time.perf_counter() - start
            overhead_s = max(0.0, pilot_s - 2 * PILOT_STEPS * sec_per_step)  # the main run pays it again
            epochs, iters = plan_training(budget - pilot_s - overhead_s, sec_per_step)
            echo(f"pilot: {sec_per_step:.2f} s/step, {overhead_s:.0f} s start-up; training {epochs} epochs x {iters} "
                 f"steps = {epochs * iters} steps to fill the {budget - pilot_s:.0f} s left of the {config.minutes:g} min "
                 "budget")
            main_start = time.perf_counter()
            lightseg.train(cache, run, config.model, epochs=epochs, iters_per_epoch=iters, **common)
            main_s = time.perf_counter() - main_start
    finally:
        torch.set_num_threads(threads)  # prediction has no data worker beside it: every core
    with stage("predict"):
        images, labels = out / "heldout" / "imagesTs", out / "heldout" / "labelsTs"
        for case in dataset.training:
            if case.name in held_out:
                _link(case.images[0], images / case.images[0].name)
                _link(case.label, labels / case.label.name)
        lightseg.predict(images, out / "predictions", run, checkpoint="final", device=config.device)
    with stage("evaluate"):
        summary = lightseg.evaluate(labels, out / "predictions", data / "dataset.json")
    with stage("reference"):
        write_reference(images, labels, out / "reference_kmeans", held_out)
        reference = lightseg.evaluate(labels, out / "reference_kmeans", data / "dataset.json")
    with stage("overlay"):
        first = held_out[0]
        class_names = {v: n for n, v in dataset.spec.labels.items() if isinstance(v, int)}
        figure = save_overlay(
            images / f"{first}_0000.nii.gz",
            {"ground truth": labels / f"{first}.nii.gz", config.model: out / "predictions" / f"{first}.nii.gz",
             "k-means reference": out / "reference_kmeans" / f"{first}.nii.gz"},
            out / "overlay.png", class_names,
            title=f"{first} (held out): augmented copy of the MNI152 template, not a patient",
        )
    with stage("robustness"):
        from lightseg.demo_robustness import robustness_table, run_check

        robustness = run_check(
            run, {c: (images / f"{c}_0000.nii.gz", labels / f"{c}.nii.gz", out / "predictions" / f"{c}.nii.gz")
                  for c in held_out}, out / "robustness", device=config.device)
        echo(robustness_table(robustness, config.model))
    result = {
        "note": NOTE,
        "config": {**asdict(config), "out": str(out)},
        "split": {"train": train_cases, "held_out": held_out},
        "stage_seconds": times,
        "total_seconds": sum(times.values()),
        "training": {"pilot_seconds": pilot_s, "pilot_sec_per_step": sec_per_step, "startup_seconds": overhead_s,
                     "epochs": epochs,
                     "iters_per_epoch": iters, "steps": epochs * iters, "main_seconds": main_s,
                     "main_sec_per_step": main_s / (epochs * iters), "budget_seconds": budget},
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
        "model_scores": _scores(summary),
        "reference_scores": _scores(reference),
        "robustness": robustness,
        "files": {"data": str(data), "run": str(run), "predictions": str(out / "predictions"),
                  "summary": str(out / "predictions" / "summary.json"),
                  "reference": str(out / "reference_kmeans" / "summary.json"), "overlay": str(figure)},
    }
    write_json(out / "demo_summary.json", result)
    echo("\n" + report_text(result))
    return result


def report_text(result: dict[str, Any]) -> str:
    """The closing summary: stage times, the score tables, where the files are, and the caveat."""
    from lightseg.demo_robustness import robustness_table

    t = result["training"]
    stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in result["stage_seconds"].items())
    files = "\n".join(f"  {name:<12} {path}" for name, path in result["files"].items())
    load = result["load_average"]["start"][0]
    return (
        f"Wall time per stage (s): {stages}; total {result['total_seconds']:.1f} s "
        f"({result['cpu_count']} CPUs, 1-min load average {load:.1f} at the start)\n"
        f"Training: pilot {t['pilot_seconds']:.1f} s ({t['pilot_sec_per_step']:.2f} s/step), then {t['epochs']} epochs x "
        f"{t['iters_per_epoch']} steps in {t['main_seconds']:.1f} s ({t['main_sec_per_step']:.2f} s/step)\n\n"
        f"Held-out cases {', '.join(result['split']['held_out'])} (mean over cases):\n"
        f"{comparison_table(result['config']['model'], result['model_scores'], result['reference_scores'])}\n"
        "(k-means reference: 3 intensity clusters inside the TRUE brain mask; HD95 in mm)\n\n"
        "Robustness: mean foreground Dice on inputs unlike the training cases (both baselines get the TRUE brain mask):\n"
        f"{robustness_table(result['robustness'], result['config']['model'])}\n\n"
        f"Files:\n{files}\n\n{result['note']}"
    )
