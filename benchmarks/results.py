"""The results page: every model and method lightseg ships, trained and scored the same way.

    python benchmarks/results.py                          # standard budget -> docs/results.md
    python benchmarks/results.py --budget quick --rows lightmedseg-ghost lunet-16 --seeds 1
    python benchmarks/results.py --render-only            # rebuild the page from saved results

Every (row, seed) trains with the real trainer (``lightseg.train``, the model's own recipe at the
budget's learning rate) on the training cases of the demo data set for the same budget (epochs x
iterations x patch x batch), in a fresh process that measures training time and peak memory
(:mod:`lightseg.benchmark.runs`); the held-out test cases are predicted whole with
``lightseg.predict`` (sliding window, final checkpoint) and scored with ``lightseg.evaluate``
(foreground mean Dice and HD95 on the original grid). Each finished (row, seed) is saved as
JSON under ``--out`` and skipped by a rerun; the page and its plots are rebuilt after every
one. Parameters (1 x 4 x 128^3, the papers' BraTS input), GMAC and CPU latency come from
:mod:`lightseg.benchmark.profile`, once per architecture.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lightseg.benchmark.profile import ModelSpec, Row, benchmark_models
from lightseg.benchmark.report import load_rows, machine_info, save_rows
from lightseg.benchmark.runs import TrainJob, run_training, scaled_pruning_options
from lightseg.errors import LightsegError
from lightseg.io import atomic_write, write_json
from lightseg.training.config import TrainConfig, check_options

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
NOT_RUN = "not run"


@dataclass(frozen=True)
class RowSpec:
    """One row of the page: its key, label and group, and its training options under the
    configuration's option names (``model``, ``model_kwargs``, ``curriculum``, ``pruning`` ...:
    :data:`lightseg.training.config.OPTIONS`), checked when the row is made. A row exists before
    its data (the cache is built when the page runs), so it holds this layer of options, as a
    recipe does; :func:`row_config` resolves it with the budget into the ``TrainConfig`` its
    :class:`TrainJob` trains, the one ``lightseg train`` with the same flags writes."""

    key: str
    label: str
    group: str
    options: Mapping[str, Any]
    main: bool = False
    architecture_of: str | None = None  # another row with the same network (its profile is reused)

    def __post_init__(self) -> None:
        check_options(self.options)


@dataclass(frozen=True)
class Budget:
    """The training budget every row gets, the demo split and the latency settings."""

    name: str
    epochs: int
    iters_per_epoch: int
    patch: int
    batch_size: int
    demo_cases: int
    test_cases: int
    calibration_batches: int
    lr: float = 1e-2
    demo_spacing: float = 1.5
    latency_size: int = 128
    latency_warmup: int = 2
    latency_repeats: int = 5

    def training(self) -> dict[str, float]:
        """The fields that must match for a saved result to count as this budget's."""
        return {k: getattr(self, k) for k in ("epochs", "iters_per_epoch", "patch", "batch_size", "calibration_batches", "lr",
                                              "demo_spacing")}


# standard: sized for 2 CPU cores (about 2 hours for the page; docs/results.md states the budget),
# on the 1.5 mm cases `lightseg demo` uses (at 2 mm LightMedSeg's stride-2 stem leaves the thin CSF
# and GM ribbons 1-2 internal voxels wide, docs/demo.md); quick: a smoke run on coarse 3 mm cases.
BUDGETS = {
    "quick": Budget("quick", epochs=2, iters_per_epoch=2, patch=48, batch_size=2, demo_cases=4, test_cases=1,
                    calibration_batches=2, demo_spacing=3.0, latency_size=64, latency_warmup=1, latency_repeats=1),
    "standard": Budget("standard", epochs=20, iters_per_epoch=10, patch=32, batch_size=2, demo_cases=14, test_cases=4,
                       calibration_batches=10),
}

_GHOST = {"variant": "ghost"}
def _net(model: str, **kwargs: Any) -> dict[str, Any]:
    return {"model": model, "model_kwargs": kwargs}


ROWS: tuple[RowSpec, ...] = (
    RowSpec("lightmedseg-ghost", "LightMedSeg ghost (K = 8)", "LightMedSeg", _net("lightmedseg", **_GHOST), main=True),
    RowSpec("lightmedseg-standard", "LightMedSeg standard conv", "LightMedSeg", _net("lightmedseg", variant="standard")),
    RowSpec("lightmedseg-no-lspm", "LightMedSeg w/o LSPM", "LightMedSeg", _net("lightmedseg", **_GHOST, use_lspm=False)),
    RowSpec("lightmedseg-no-anchors", "LightMedSeg w/o anchors", "LightMedSeg", _net("lightmedseg", **_GHOST, use_anchors=False)),
    RowSpec("lightmedseg-no-router", "LightMedSeg w/o skip router", "LightMedSeg", _net("lightmedseg", **_GHOST, use_router=False)),
    RowSpec("lightmedseg-k16", "LightMedSeg K = 16", "LightMedSeg", _net("lightmedseg", **_GHOST, num_anchors=16)),
    RowSpec("lightmedseg-k32", "LightMedSeg K = 32", "LightMedSeg", _net("lightmedseg", **_GHOST, num_anchors=32)),
    RowSpec("lunet-16", "LUnet C = 16", "LUnet", _net("lunet", width=16), main=True),
    RowSpec("lunet-24", "LUnet C = 24", "LUnet", _net("lunet", width=24)),
    RowSpec("unet-16", "doubling U-Net C = 16 (LUnet-16's first-layer width)", "LUnet", _net("unet", width=16)),
    RowSpec("unet-4", "doubling U-Net C = 4 (LUnet-24's parameter count)", "LUnet", _net("unet", width=4)),
    RowSpec("plainunet", "plain U-Net (nnU-Net 3d_fullres topology, 5 stages)", "baselines",
            _net("plainunet", stages=5, deep_supervision=True), main=True),
    RowSpec("monai_unet", "MONAI UNet", "baselines", _net("monai_unet")),
    RowSpec("pspseg-s-pruned", "PSP-Seg-S, progressive pruning", "PSP-Seg", {**_net("pspseg", size="S"), "pruning": "progressive"}),
    RowSpec("pgps-efficiency", "LightMedSeg ghost + PGPS efficiency", "PGPS",
            {**_net("lightmedseg", **_GHOST), "curriculum": "pgps-efficiency"}, architecture_of="lightmedseg-ghost"),
    RowSpec("pgps-performance", "LightMedSeg ghost + PGPS performance", "PGPS",
            {**_net("lightmedseg", **_GHOST), "curriculum": "pgps-performance"}, architecture_of="lightmedseg-ghost"),
)  # fmt: skip


@dataclass(frozen=True)
class Data:
    """The fixed split: a cache of the training cases and the raw test cases with their labels."""

    cache: Path
    splits: Path
    test_images: Path
    test_labels: Path
    dataset_json: Path


def prepare_data(work: Path, out: Path, budget: Budget, raw: Path | None = None) -> Data:
    """Split a raw data set (default: the demo set) into training and test cases and cache the former.

    The split is stored as ``out/split.json`` on first use (the last ``test_cases`` cases by
    name are held out) and read back afterwards. The plan is fingerprinted on the training
    cases only, so the test cases influence nothing before they are predicted.
    """
    from lightseg.data.dataset import load_dataset
    from lightseg.data.preprocess import preprocess_dataset

    if raw is None:
        from lightseg.data.demo import make_demo_dataset

        raw = make_demo_dataset(work / "demo", num_cases=budget.demo_cases, spacing=budget.demo_spacing, progress=True)
    dataset = load_dataset(raw)
    split_path = out / "split.json"
    if not split_path.is_file():
        names = [case.name for case in dataset.training]
        write_json(split_path, {"train": names[: -budget.test_cases], "test": names[-budget.test_cases :]})
    split = json.loads(split_path.read_text())
    train_raw, test = work / "train_raw", work / "test"
    for name in split["train"] + split["test"]:
        case = dataset.case(name)
        images, labels = (train_raw / "imagesTr", train_raw / "labelsTr") if name in split["train"] else (test / "images", test / "labels")
        for source, folder in [*((p, images) for p in case.images), (case.label, labels)]:
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / source.name).is_file():
                shutil.copyfile(source, folder / source.name)
    spec = json.loads((raw / "dataset.json").read_text())
    write_json(train_raw / "dataset.json", {**spec, "numTraining": len(split["train"])})
    preprocess_dataset(train_raw, work / "cache", progress=False)
    write_json(work / "splits.json", {"train": split["train"], "val": []})
    return Data(work / "cache", work / "splits.json", test / "images", test / "labels", train_raw / "dataset.json")


def _result_path(out: Path, row: RowSpec, seed: int) -> Path:
    return out / "runs" / row.key / f"seed{seed}.json"


def row_config(row: RowSpec, seed: int, cache: Path, budget: Budget, device: str) -> TrainConfig:
    """The configuration ``row`` trains with for ``seed``: its options with the budget's (a pruned
    row's schedule scaled to the budget, :func:`scaled_pruning_options`), resolved on ``cache`` by
    the code ``lightseg train`` runs (:func:`lightseg.training.run.training_config`)."""
    from lightseg.training.run import training_config

    pruned = row.options.get("pruning", "none") != "none"
    return training_config(
        cache, device=device, **row.options, epochs=budget.epochs, iters_per_epoch=budget.iters_per_epoch,
        patch_size=(budget.patch,) * 3, batch_size=budget.batch_size, seed=seed, lr=budget.lr,
        **(scaled_pruning_options(budget.epochs, calibration_batches=budget.calibration_batches) if pruned else {}),
    )  # fmt: skip


def run_one(row: RowSpec, seed: int, data: Data, budget: Budget, work: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train, predict the test cases whole, score them; save and return the result."""
    from lightseg.evaluation import evaluate
    from lightseg.inference import predict

    run_dir = work / "runs" / row.key / f"seed{seed}"
    job = TrainJob(row_config(row, seed, data.cache, budget, args.device), str(run_dir), splits=str(data.splits),
                   device=args.device, workers=args.workers, threads=args.threads)
    trained = run_training(job, quiet=args.quiet)
    start = time.perf_counter()
    predict(data.test_images, run_dir / "test", run_dir, checkpoint="final", device=args.device, progress=not args.quiet)
    predict_s = time.perf_counter() - start
    summary = evaluate(data.test_labels, run_dir / "test", data.dataset_json, run_dir / "test" / "summary.json",
                       num_workers=args.infer_threads)
    result = {
        "row": row.key, "seed": seed, "budget": budget.training(), "train": asdict(trained),
        "dice": summary["foreground_mean"]["Dice"], "hd95": summary["foreground_mean"]["HD95"],
        "dice_per_target": {summary["targets"][k]["name"]: summary["mean"][k]["Dice"] for k in summary["foreground_targets"]},
        "test_cases": summary["num_cases"], "predict_s": predict_s, "date": datetime.date.today().isoformat(),
    }  # fmt: skip
    write_json(_result_path(out, row, seed), result)
    return result


def load_results(out: Path, row: RowSpec, budget: Budget) -> list[dict[str, Any]]:
    """Saved results of ``row``; one saved under another budget is an error, never mixed in."""
    results = []
    for path in sorted((out / "runs" / row.key).glob("seed*.json")):
        result = json.loads(path.read_text())
        if result["budget"] != budget.training():
            raise LightsegError(f"{path} was trained with budget {result['budget']}, not {budget.training()}; "
                                "use another --out for a different budget, never one folder for two")
        results.append(result)
    return results


def profile_row(row: RowSpec, out: Path, budget: Budget, args: argparse.Namespace) -> None:
    """Parameters, GMAC and CPU latency at 1 x 4 x latency_size^3, once per architecture (a pruned
    PSP-Seg is profiled with the architecture its seed-0 training kept)."""
    path = out / "profile" / f"{row.key}.json"
    if row.architecture_of or path.is_file():
        return
    kwargs = dict(row.options.get("model_kwargs", {}))
    if row.options.get("pruning", "none") != "none":
        first = load_results(out, row, budget)
        if not first or first[0]["train"]["architecture"] is None:
            return
        kwargs["architecture"] = first[0]["train"]["architecture"]
    rows = benchmark_models(
        [ModelSpec(row.options["model"], kwargs, row.label)], budget.latency_size, 4, args.infer_threads, "cpu", extra_shapes=(),
        warmup=budget.latency_warmup, repeats=budget.latency_repeats, channels_last=None,
        progress=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    if rows:
        save_rows(rows, path)


def jobs(rows: Sequence[RowSpec], seeds: int, other_seeds: int) -> list[tuple[RowSpec, int]]:
    """Seed 0 of every row first (a complete page early), then the further seeds."""
    count = {row.key: seeds if row.main else other_seeds for row in rows}
    return [(row, seed) for seed in range(max(count.values(), default=0)) for row in rows if seed < count[row.key]]


def run(rows: Sequence[RowSpec], budget: Budget, args: argparse.Namespace, page_rows: Sequence[RowSpec] | None = None) -> str:
    """Run every missing (row, seed) of ``rows``, profile each architecture, render the page
    (listing ``page_rows``, by default ``rows``) after each; return the page."""
    import torch

    torch.set_num_threads(args.infer_threads)  # prediction; each training sets its own in its process
    out, work = Path(args.out), Path(args.work)
    todo = [(r, s) for r, s in jobs(rows, args.seeds, args.other_seeds) if not _result_path(out, r, s).is_file()]
    for row in rows:
        load_results(out, row, budget)  # a budget mismatch stops here, before any work
    print(f"{len(todo)} training(s) to run, budget {budget.name}; results in {out}", file=sys.stderr)
    data = prepare_data(work, out, budget, Path(args.data) if args.data else None) if todo else None
    started = time.perf_counter()
    for index, (row, seed) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {row.key} seed {seed} ({(time.perf_counter() - started) / 60:.1f} min so far)",
              file=sys.stderr, flush=True)
        result = run_one(row, seed, data, budget, work, out, args)
        print(f"[{index}/{len(todo)}] {row.key} seed {seed}: Dice {result['dice']:.4f}, HD95 {result['hd95']:.2f} mm, "
              f"training {result['train']['train_s'] / 60:.1f} min", file=sys.stderr, flush=True)
        profile_row(row, out, budget, args)
        render(page_rows or rows, budget, out, Path(args.doc), args.command)
    for row in rows:
        profile_row(row, out, budget, args)
    return render(page_rows or rows, budget, out, Path(args.doc), args.command)


# --- the page --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int

    def text(self, digits: int, scale: float = 1.0) -> str:
        if self.n == 0:
            return NOT_RUN
        mean = f"{self.mean * scale:.{digits}f}"
        return mean if self.n == 1 else f"{mean} ± {self.std * scale:.{digits}f}"


def _stat(values: Sequence[float]) -> Stat:
    if not values:
        return Stat(math.nan, math.nan, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


@dataclass(frozen=True)
class Summary:
    row: RowSpec
    dice: Stat
    hd95: Stat
    train_min: Stat
    peak_mb: Stat
    params: Stat
    profile: Row | None


def summarise(rows: Sequence[RowSpec], out: Path, budget: Budget) -> dict[str, Summary]:
    by_key = {row.key: row for row in rows}
    summaries = {}
    for row in rows:
        results = load_results(out, row, budget)
        path = out / "profile" / f"{(row.architecture_of if row.architecture_of in by_key else row.key)}.json"
        summaries[row.key] = Summary(
            row, _stat([r["dice"] for r in results]), _stat([r["hd95"] for r in results]),
            _stat([r["train"]["train_s"] / 60 for r in results]), _stat([r["train"]["peak_mb"] for r in results]),
            _stat([r["train"]["params"] for r in results]), load_rows(path)[0] if path.is_file() else None,
        )  # fmt: skip
    return summaries


def _profile_cells(profile: Row | None) -> list[str]:
    if profile is None:
        return [NOT_RUN] * 3
    latency = profile.latency_s[0]
    return [f"{profile.params / 1e6:.3f}", f"{profile.gmac:.2f}", "n/a" if latency is None else f"{latency:.2f}"]


def main_table(summaries: Mapping[str, Summary], size: int) -> str:
    header = ["row", "seeds", "params trained (M)", "params 4-ch (M)", f"GMAC 4x{size}³", f"CPU latency 4x{size}³ (s)",
              "training time (min)", "peak training memory (MB)", "Dice (fg mean)", "HD95 (mm)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries.values():
        label = f"**{s.row.label}**" if s.row.main else s.row.label
        params, gmac, latency = _profile_cells(s.profile)
        cells = [label, str(s.dice.n) if s.dice.n else NOT_RUN, s.params.text(3, 1e-6), params, gmac, latency,
                 s.train_min.text(1), s.peak_mb.text(0), s.dice.text(4), s.hd95.text(2)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff(summaries: Mapping[str, Summary], a: str, b: str, field_name: str, relative: bool) -> str:
    """``a`` against ``b`` (means): a relative change in percent, or a difference."""
    if a not in summaries or b not in summaries:
        return NOT_RUN
    x, y = getattr(summaries[a], field_name), getattr(summaries[b], field_name)
    if x.n == 0 or y.n == 0:
        return NOT_RUN
    return f"{x.mean / y.mean - 1:+.0%}" if relative else f"{x.mean - y.mean:+.4f}"


# Published figures, from /work/shared/specs (section named in the "source" column).
ABLATION = (  # row, configuration, published BraTS mean Dice %, params
    ("lightmedseg-ghost", "full model (ghost, K = 8)", "83.43", "0.48 M"),
    ("lightmedseg-no-lspm", "w/o LSPM", "80.50 (−2.93)", "–"),
    ("lightmedseg-no-anchors", "w/o anchors", "81.93 (−1.50)", "–"),
    ("lightmedseg-no-router", "w/o skip router", "82.27 (−1.16)", "–"),
    ("lightmedseg-standard", "w/o GhostConv3D (standard conv)", "84.81 (+1.38)", "0.66 M"),
    ("lightmedseg-k16", "K = 16 (paper: K = ?, likely 16)", "83.64 (+0.21)", "0.49 M"),
    ("lightmedseg-k32", "K = 32 (paper: K = ?, likely 32)", "84.16 (+0.73)", "0.52 M"),
)


def ablation_table(summaries: Mapping[str, Summary]) -> str:
    lines = ["| configuration | paper: BraTS Dice % (Δ) | paper params | ours: Dice | ours: Δ vs full | ours: params |",
             "|---|---|---|---|---|---|"]
    for key, name, dice, params in ABLATION:
        s = summaries.get(key)
        ours = s.dice.text(4) if s else NOT_RUN
        delta = _diff(summaries, key, "lightmedseg-ghost", "dice", False) if key != "lightmedseg-ghost" else "–"
        lines.append(f"| {name} | {dice} | {params} | {ours} | {delta} | {s.params.text(3, 1e-6) + ' M' if s and s.params.n else NOT_RUN} |")
    return "\n".join(lines) + "\n\nSource: `specs/lightmedseg.md` section 6, Table 4 (BraTS, deltas recomputed there)."


def claims_table(summaries: Mapping[str, Summary]) -> str:
    """The relative claims of LUnet, PSP-Seg and PGPS next to what the same comparison gives here."""
    rows = [
        ("LUnet C = 16 vs U-Net C = 16: parameters", "> 30x fewer (36.5x at C = 16)", "`specs/lunet.md` 0, 1.2",
         _ratio(summaries, "unet-16", "lunet-16", "params")),
        ("LUnet C = 16 vs U-Net C = 16: Dice", "comparable", "`specs/lunet.md` 3", _diff(summaries, "lunet-16", "unet-16", "dice", False)),
        ("LUnet C = 24 vs U-Net C = 4 (equal parameters): Dice", "LUnet better", "`specs/lunet.md` 0, 3",
         _diff(summaries, "lunet-24", "unet-4", "dice", False)),
        ("PSP-Seg-S pruned vs nnU-Net-style: parameters", "−83 to −87 %", "`specs/psp-seg.md` 6",
         _diff(summaries, "pspseg-s-pruned", "plainunet", "params", True)),
        ("PSP-Seg-S pruned vs nnU-Net-style: training memory", "−42 to −45 % (GPU)", "`specs/psp-seg.md` 6",
         _diff(summaries, "pspseg-s-pruned", "plainunet", "peak_mb", True)),
        ("PSP-Seg-S pruned vs nnU-Net-style: training time", "−29 to −48 %", "`specs/psp-seg.md` 6",
         _diff(summaries, "pspseg-s-pruned", "plainunet", "train_min", True)),
        ("PSP-Seg-S pruned vs nnU-Net-style: Dice", "on par", "`specs/psp-seg.md` 6", _diff(summaries, "pspseg-s-pruned", "plainunet", "dice", False)),
        ("PGPS efficiency vs constant patch: training time", "44 % of it (−56 %)", "`specs/pgps.md` 9",
         _diff(summaries, "pgps-efficiency", "lightmedseg-ghost", "train_min", True)),
        ("PGPS efficiency vs constant patch: Dice", "on par", "`specs/pgps.md` 9", _diff(summaries, "pgps-efficiency", "lightmedseg-ghost", "dice", False)),
        ("PGPS performance vs constant patch: training time", "89 % of it (−11 %)", "`specs/pgps.md` 9",
         _diff(summaries, "pgps-performance", "lightmedseg-ghost", "train_min", True)),
        ("PGPS performance vs constant patch: Dice", "+1.28 % relative", "`specs/pgps.md` 9",
         _diff(summaries, "pgps-performance", "lightmedseg-ghost", "dice", True)),
    ]  # fmt: skip
    lines = ["| comparison | published | source | ours |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows])


def _ratio(summaries: Mapping[str, Summary], a: str, b: str, field_name: str) -> str:
    if a not in summaries or b not in summaries:
        return NOT_RUN
    x, y = getattr(summaries[a], field_name), getattr(summaries[b], field_name)
    return f"{x.mean / y.mean:.1f}x fewer" if x.n and y.n else NOT_RUN


def efficiency_table(summaries: Mapping[str, Summary], size: int) -> str:
    s = summaries.get("lightmedseg-ghost")
    profile = s.profile if s else None
    params, gmac, latency = _profile_cells(profile)
    where = f"this machine, {profile.threads} threads" if profile else "this machine"
    return "\n".join([
        f"| LightMedSeg ghost, 1 x 4 x {size}³ | paper (`specs/lightmedseg.md` 6, Table 3 and text) | ours |",
        "|---|---|---|",
        f"| parameters (M) | 0.48 | {params} |",
        f"| GFLOPs as the paper counts them (= our GMAC) | 14.64 | {gmac} as specified (the plain model; the CPU "
        "accelerator executes 14.36 through the exact folds of docs/models.md) |",
        f"| CPU latency per volume (s) | 0.505 (Ryzen 9 9950X, threads not stated) | {latency} ({where}) |",
    ])  # fmt: skip


def plot(summaries: Mapping[str, Summary], x_field: str, xlabel: str, title: str, path: Path, log_x: bool) -> None:
    """Dice (mean ± std over seeds) against ``x_field``; an empty plot says that nothing ran yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=110)
    points = [(getattr(s, x_field), s) for s in summaries.values() if s.dice.n and getattr(s, x_field).n]
    colours = plt.get_cmap("tab20").colors
    for i, (x, s) in enumerate(points):  # a legend, not labels: the LightMedSeg rows sit on top of each other
        scale = 1e-6 if x_field == "params" else 1.0
        ax.errorbar(x.mean * scale, s.dice.mean, xerr=x.std * scale, yerr=s.dice.std, fmt="o" if s.row.main else "s",
                    ms=6 if s.row.main else 4, capsize=2, color=colours[i % len(colours)], label=s.row.key)  # fmt: skip
    if not points:
        ax.text(0.5, 0.5, "no rows run yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        if log_x:
            ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test Dice, foreground mean")
    ax.set_title(title, fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def pruning_study_section(path: Path) -> str:
    """The rows of ``benchmarks/pruning_study.py`` (nine pruned trainings and two references, too
    many to rerun here), from its saved ``lunet_study.json``."""
    if not path.is_file():
        return f"{NOT_RUN}: `python benchmarks/pruning_study.py` writes `{path.name}`."
    study = json.loads(path.read_text())
    arms: dict[str, list[dict[str, Any]]] = {}
    for result in study["results"]:
        arms.setdefault(result["arm"], []).append(result)
    lines = [
        f"From `python benchmarks/pruning_study.py` (docs/lunet.md has the per-layer widths and the reading), with "
        f"its own budget: {study['setting']}. Dice is the final validation on its held-out cases (not this page's "
        "test cases); training time as above, but taken on a busier machine: compare it within this table only "
        "(docs/lunet.md says under what load).",
        "",
        "| arm | seeds | parameters | Dice | training time (min) |",
        "|---|---|---|---|---|",
    ]
    for arm, results in arms.items():
        lines.append(f"| {arm} | {len(results)} | {_stat([r['params'] for r in results]).text(0)} "
                     f"| {_stat([r['dice'] for r in results]).text(3)} | {_stat([r['train_s'] / 60 for r in results]).text(1)} |")
    return "\n".join(lines)


def render(rows: Sequence[RowSpec], budget: Budget, out: Path, doc: Path, command: str) -> str:
    """Write the page and its two plots from the saved results; return the page."""
    summaries = summarise(rows, out, budget)
    stem = doc.with_suffix("")
    title = (f"budget {budget.name}: {budget.epochs} x {budget.iters_per_epoch} iterations, patch {budget.patch}³, "
             f"batch {budget.batch_size}; mean ± std over seeds")
    plot(summaries, "params", "parameters as trained (millions)", title, Path(f"{stem}_dice_params.png"), log_x=True)
    plot(summaries, "train_min", "training time (min)", title, Path(f"{stem}_dice_time.png"), log_x=False)
    split = json.loads((out / "split.json").read_text()) if (out / "split.json").is_file() else None
    split_text = f"{len(split['train'])} training cases, {len(split['test'])} held-out test cases" if split else "split not made yet"
    profiles = [s.profile for s in summaries.values() if s.profile is not None]
    results = [r for row in rows for r in load_results(out, row, budget)]
    dates = sorted({r["date"] for r in results})
    main_rows = ", ".join(row.label for row in rows if row.main)
    page = PAGE.format(
        command=command, budget=budget, split=split_text, out=out.relative_to(ROOT) if out.is_relative_to(ROOT) else out,
        dates=f"{dates[0]} to {dates[-1]}" if dates else "(none yet)", machine=machine_info(profiles) if profiles else "not measured yet",
        hours=sum(r["train"]["wall_s"] + r["predict_s"] for r in results) / 3600,
        voxels=budget.epochs * budget.iters_per_epoch * budget.batch_size * budget.patch**3 / 1e6,
        main_rows=main_rows, main_table=main_table(summaries, budget.latency_size), ablation=ablation_table(summaries),
        claims=claims_table(summaries), efficiency=efficiency_table(summaries, budget.latency_size),
        params_png=Path(f"{stem}_dice_params.png").name, time_png=Path(f"{stem}_dice_time.png").name,
        pruning_study=pruning_study_section(ROOT / "docs" / "lunet_study.json"),
    )  # fmt: skip
    with atomic_write(doc, "w") as handle:
        handle.write(page)
    return page


PAGE = """\
# Results: every model and method side by side

Generated by `{command}` from the saved results in `{out}/` (one JSON per row and seed);
edit the script, not this page. Cells say **not run** where a row has no result yet.

**Setting.** The demo data set (`lightseg demo-data`: augmented copies of the MNI152 2009a
template at {budget.demo_spacing:g} mm, 1 T1 channel, CSF / grey matter / white matter), {split}; the split
is stored in `{out}/split.json` and the plan is made from the training cases alone. Budget
`{budget.name}`, the same for every row: {budget.epochs} epochs x {budget.iters_per_epoch} iterations, patch {budget.patch}³, batch
{budget.batch_size} ({voxels:.0f} M voxels seen per training). The standard budget is sized for 2 CPU cores (one intra-op
thread beside one loader worker: two threads next to a busy loader oversubscribe 2 cores,
`docs/demo.md`): the saved trainings and test predictions took {hours:.1f} hours of wall time in all;
the papers train 300-1000 epochs on GPUs. Each model trains with its own recipe (optimizer,
schedule, loss; `docs/training.md`) except the learning rate, which is {budget.lr:g} for every row:
the published rates (1e-3 for LightMedSeg, LUnet and PSP-Seg, 1e-4 for MONAI's UNet) are tuned
for hundreds of epochs and barely leave the initialisation in a few hundred iterations
(LightMedSeg in 5 minutes: Dice 0.285 at 1e-3 against 0.621 at 1e-2, `docs/demo.md`), and
{budget.lr:g} is nnU-Net's rate and the demo's. No row has a validation split; its final checkpoint
is scored. PSP-Seg prunes with its window scaled to a tenth of the epochs (`lightseg.benchmark.runs.scaled_pruning_options`) and
{budget.calibration_batches} calibration batches. PGPS runs on LightMedSeg ghost, chosen before any run
(choosing the best-scoring model afterwards would favour it on the same test cases); its
constant-patch arm is the LightMedSeg ghost row. The test cases are predicted whole with
`lightseg.predict` (sliding window, overlap 0.5, Gaussian blending, no test-time augmentation)
and scored on their original grid with `lightseg.evaluate`. Dice and HD95 are the foreground
means (CSF, GM, WM) over the test cases; ± is the standard deviation over seeds (the *seeds*
column; seeds 0, 1, ...). The main rows ({main_rows}; in bold) get `--seeds` (default 3), the
others `--other-seeds` (default 1). Trainings ran {dates}; parameters, GMAC and latency:
{machine}.

**Columns.** *params trained*: the trained 1-channel model (a pruned PSP-Seg counts what
survived). *params 4-ch*, *GMAC* and *CPU latency*: the same network built for 4 channels and 4
classes, 1 x 4 x {budget.latency_size}³ (the papers' BraTS input), from `lightseg.benchmark.profile` (GMAC
as the papers count FLOPs: convolutions, linear layers and normalisation; latency: median of
{budget.latency_repeats} forward(s) after {budget.latency_warmup} warm-up(s), batch 1, each architecture once in a fresh
process, the threads named above, in the memory layout `lightseg predict` runs it in: `channels_last_3d`,
except the plain U-Net, whose dense convs are faster contiguous, `docs/benchmarks.md`).
*training time*: the first epoch's start to the last epoch's end in a fresh process (PSP-Seg's
pruning searches included; model build and final validation not), cache prebuilt (threads and
loader workers as recorded in each result JSON).
*peak training memory*: the training process's peak resident memory above its level just
before training (weights, optimizer, activations, batches; loader workers not counted), from
`lightseg.benchmark.runs`.

## All rows

{main_table}

![Dice vs parameters]({params_png})

![Dice vs training time]({time_png})

## LightMedSeg ablations (the paper's Table 4)

{ablation}

## The papers' claims, and the same comparison here

{claims}

Published efficiency of LightMedSeg against ours:

{efficiency}

## Channel pruning: LUnet's study (a separate run)

{pruning_study}

<!-- tables-end -->

## What this data can and cannot show

The demo cases are augmented copies of **one** template brain (affine and elastic warps, bias
field, noise), not patients. Training and test cases share the same anatomy, so a test Dice
here measures how well a model fits that anatomy under augmentation in a short CPU budget, not
how it generalises to new patients, scanners or pathology; the ranking of models may differ on
real data. The budget is a few hundred iterations per model on 2 CPU cores, against 300-1000
epochs on GPUs in the papers: larger models (plain U-Net, doubling U-Net C = 16, PSP-Seg-S) are
more under-trained by it than small ones, and PSP-Seg's pruning may not fire at all when the
training losses keep improving until the end (its window is scaled to a tenth of the epochs).
The published numbers are on BraTS, ACDC, MSD and other tasks: their absolute values are not
targets for this page; only the direction of each relative claim can be compared, and with a
few seeds and {budget.test_cases} test cases a difference smaller than the ± spread is not evidence
either way. Parameters, GMAC and latency do not depend on the data and carry over to any task
with the same input size.

## Reproducing

```bash
python benchmarks/results.py                      # the full run (budget standard, 3 seeds for the main rows)
python benchmarks/results.py --render-only        # rebuild this page from the saved JSON
python benchmarks/results.py --budget quick --out /tmp/results_quick --doc /tmp/results_quick.md   # smoke run
```

The run is resumable: every finished (row, seed) is saved and skipped next time; a training
interrupted half-way restarts from scratch so that its training time is one uninterrupted run.
Latencies and training times need an otherwise idle machine. On this project's 2-core build
machine the full run took 74 min from a fresh clone (`time python benchmarks/results.py`,
2026-11-24, after `pip install -e ".[dev]"`: demo data, 22 trainings with their test
predictions, 14 profiles). To refresh only the latency column, delete `{out}/profile/` and
run the script again: finished trainings are skipped and every architecture is profiled anew.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="standard")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the main rows (default 3)")
    parser.add_argument("--other-seeds", type=int, default=1, help="seeds for the other rows (default 1)")
    parser.add_argument("--rows", nargs="+", choices=[r.key for r in ROWS], help="run only these rows (the page lists all)")
    parser.add_argument("--data", help="a raw nnU-Net data set instead of the demo data set")
    parser.add_argument("--out", help="saved results (default: docs/results/<budget>)")
    parser.add_argument("--work", help="demo data, cache, run folders (default: /tmp/lightseg_results/<budget>)")
    parser.add_argument("--doc", help="the page (default: docs/results.md for the standard budget, OUT/results.md otherwise)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per training (default 1: with one loader worker that fills 2 cores)")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes per training (default 1)")
    parser.add_argument("--infer-threads", type=int, default=2, help="threads for prediction and latency (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training and prediction device (latency is always CPU)")
    parser.add_argument("--render-only", action="store_true", help="rebuild the page from saved results, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no training or prediction progress bars")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    args.out = args.out or str(ROOT / "docs" / "results" / budget.name)
    args.work = args.work or f"/tmp/lightseg_results/{budget.name}"
    args.doc = args.doc or str(DOC if budget.name == "standard" else Path(args.out) / "results.md")
    args.command = "python benchmarks/results.py" + ("" if budget.name == "standard" else f" --budget {budget.name}")
    if args.render_only:
        print(render(ROWS, budget, Path(args.out), Path(args.doc), args.command).split("<!-- tables-end -->")[0])
        return 0
    page = run([r for r in ROWS if not args.rows or r.key in args.rows], budget, args, page_rows=ROWS)
    print(page.split("<!-- tables-end -->")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
