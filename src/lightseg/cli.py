"""``lightseg <verb>``: parses flags and calls the Python API, nothing else.

Each verb is a pair of functions, ``_<verb>_args(parser)`` and ``_<verb>(args) -> int``, listed
in :data:`COMMANDS`; the training verbs, whose flags map onto the training configuration, are in
:mod:`lightseg.cli_train`. Imports of heavy modules (torch) happen inside the verb, so ``lightseg
--help`` and light verbs start fast. A :class:`~lightseg.errors.LightsegError` is printed as one
clear line and exits with status 1, and so is an ``OSError`` (disk full, no permission) or too little
memory, with advice for its cause (:mod:`lightseg.cli_errors`); a bug
still shows its traceback; a reader that stops early (``lightseg ... | head``) ends the command
quietly with status 141, as SIGPIPE would. The environment variables lightseg reads are checked before any work
(:mod:`lightseg.environment`), and warnings print as one ``lightseg VERB: warning:`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import warnings
from typing import Callable, TextIO

from lightseg.cli_errors import is_out_of_memory, machine_error_line, out_of_memory_line
from lightseg.cli_options import check_options, output_arg, shape_arg
from lightseg.cli_train import recipes_args, recipes_verb, train_args, train_verb
from lightseg.environment import check as check_environment
from lightseg.errors import LightsegError

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gt_dir", metavar="GT_DIR", help="folder of ground-truth label maps ({case}.nii.gz)")
    parser.add_argument("pred_dir", metavar="PRED_DIR", help="folder of predicted label maps, same file names")
    parser.add_argument("-d", "--dataset-json", help="dataset.json naming the classes and regions (BraTS WT/TC/ET); "
                        "without it every label value found is a class")
    parser.add_argument("-o", "--output", help="summary.json to write (default: PRED_DIR/summary.json)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                        help="surface Dice tolerance in mm (default: 1)")
    parser.add_argument("--workers", type=int, default=2, help="cases read and scored in parallel (default: 2)")


def _evaluate(args: argparse.Namespace) -> int:
    from lightseg.evaluation import evaluate, format_table

    summary = evaluate(args.gt_dir, args.pred_dir, dataset_json=args.dataset_json, output=args.output,
                       nsd_tolerance_mm=args.nsd_tolerance, num_workers=args.workers)
    print(format_table(summary))
    return 0


def _crossval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", metavar="LABELS_DIR", help="the data set's ground truth (labelsTr)")
    parser.add_argument("runs", metavar="RUN_DIR", nargs="+", help="the fold runs (`lightseg train --fold K`)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                        help="folder for the merged validation predictions and their summary.json")
    parser.add_argument("--workers", type=int, default=2, help="cases scored in parallel (default: 2)")


def _crossval(args: argparse.Namespace) -> int:
    from lightseg.evaluation import format_table
    from lightseg.evaluation.crossval import merge_folds

    print(format_table(merge_folds(args.labels, args.runs, args.output, args.workers)))
    return 0


def _find_best_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", metavar="LABELS_DIR", help="the data set's ground truth (labelsTr)")
    parser.add_argument("-m", "--model", nargs="+", action="append", required=True, metavar=("NAME", "RUN_DIR"),
                        help="a model's name and its fold runs; repeat for each model")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the merged folds and the report")
    parser.add_argument("--workers", type=int, default=2, help="cases scored in parallel (default: 2)")


def _find_best(args: argparse.Namespace) -> int:
    from lightseg.evaluation.crossval import find_best

    if any(len(group) < 2 for group in args.model):
        raise LightsegError("each -m needs a name and at least one run folder: -m NAME RUN_f0 RUN_f1 ...")
    models = {group[0]: group[1:] for group in args.model}
    if len(models) != len(args.model):
        raise LightsegError("two -m groups share a name; give each model its own")
    report = find_best(args.labels, models, args.output, args.workers)
    print("\n".join(f"{name}: {score:.4f}" for name, score in report["scores"].items()))
    print(f"best: {report['best']} (report in {args.output}/find_best.md); predict with:\n  {report['predict']}")
    return 0


def _verify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET_DIR", help="nnU-Net v2 raw data set folder (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("--workers", type=int, default=None, help="files read in parallel (default: up to 4 processes)")


def _verify(args: argparse.Namespace) -> int:
    from lightseg.data.verify import verify_dataset

    report = verify_dataset(args.dataset, workers=args.workers, progress=True)
    print(report.format())
    return 0 if report.ok else 1


def _convert_msd_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", metavar="TASK_DIR", help="Medical Segmentation Decathlon task folder (TaskXX_Name)")
    parser.add_argument("out", metavar="OUT_DIR", help="nnU-Net v2 raw data set folder to write (e.g. Dataset001_Name)")
    parser.add_argument("--workers", type=int, default=None, help="cases converted in parallel (default: up to 4 processes)")


def _convert_msd(args: argparse.Namespace) -> int:
    from lightseg.data import load_dataset
    from lightseg.data.msd import convert_msd

    dataset = load_dataset(convert_msd(args.task, args.out, workers=args.workers, progress=True))
    print(f"{dataset.root}: {len(dataset.training)} training and {len(dataset.test)} test cases written; "
          f"check them with `lightseg verify {dataset.root}`")
    return 0


def _info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", metavar="FILE", nargs="+", help="NIfTI file(s) (.nii or .nii.gz)")


def _info(args: argparse.Namespace) -> int:
    from lightseg.data.info import image_info

    print("\n".join(image_info(path).format() for path in args.files))
    return 0


def _preprocess_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET_DIR", help="nnU-Net v2 raw data set folder")
    parser.add_argument("-o", "--output", required=True, metavar="CACHE_DIR", help="preprocessed cache folder to write")
    parser.add_argument("--workers", type=int, default=None, help="cases in parallel (default: min(2, CPU count))")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"), help="patch size in voxels (overrides the plan)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="target spacing in mm (overrides the plan)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default=None,
                        help="cached image dtype (overrides the plan; a new plan uses float32)")
    parser.add_argument("--normalization", choices=("zscore", "percentile", "none"), default=None,
                        help="one scheme for every channel (overrides the plan; default: by channel name). percentile: "
                             "clip each case to its 0.5/99.5 percentiles and scale to [0, 1] (the lightmedseg-acdc recipe's)")


def _preprocess(args: argparse.Namespace) -> int:
    from lightseg.data.preprocess import preprocess_dataset

    plan = preprocess_dataset(args.dataset, args.output, workers=args.workers, patch_size=args.patch,
                              target_spacing=args.spacing, image_dtype=args.dtype, normalization=args.normalization)
    print(f"{args.output}: target spacing {list(plan.target_spacing)} mm, patch {list(plan.patch_size)}, "
          f"median shape {list(plan.median_shape or ())}; plan in {args.output}/plan.json")
    return 0


def _predict_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, metavar="IMAGES_DIR",
                        help="scans named {case}_0000.nii.gz, {case}_0001.nii.gz, ... (or {case}.nii.gz for one channel)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for {case}.nii.gz label maps")
    parser.add_argument("-m", "--model", required=True, nargs="+", metavar="RUN_DIR|MODEL.onnx",
                        help="run folder written by `lightseg train`, or a model.onnx from `lightseg export`; several "
                             "(e.g. the folds) predict as an ensemble that averages their probabilities")
    parser.add_argument("--part", default="0/1", metavar="I/N",
                        help="predict only every N-th case from the I-th (0 <= I < N), so N jobs cover the folder once "
                             "(nnU-Net's -part_id/-num_parts; default: 0/1, every case)")
    parser.add_argument("--backend", choices=("torch", "onnx", "openvino"), default=None,
                        help="torch (a run folder), onnx (ONNX Runtime) or openvino (OpenVINO, CPU; pip install "
                             "'lightseg[openvino]'): the last two need no torch and read a model.onnx with its "
                             "model.onnx.json; default: onnx for a .onnx file, else torch")
    parser.add_argument("--checkpoint", choices=("final", "best", "latest"), default="final",
                        help="which checkpoint of the run (default: final)")
    parser.add_argument("--step", type=float, default=0.5,
                        help="sliding-window stride as a fraction of the tile (default: 0.5, i.e. 50%% overlap)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                        help="mirror test-time augmentation over the 3 axes: 8x the network time (default: off)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write {case}.npz with float16 class/region probabilities on the input grid")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="compute device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-tiles", type=int, default=None, metavar="N",
                        help="sliding-window tiles per network call (default: 2 for small tiles, where one is much "
                             "slower on CPU, e.g. 1x96^3 or 4x64^3; 1 for large ones such as 4x128^3; 4 on a GPU)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                        help="network precision (default: the run's training precision; fp32 on CPU); "
                             "--backend openvino: fp32, or bf16 after a label check against fp32")


def _predict(args: argparse.Namespace) -> int:
    from lightseg.inference.pipeline import parse_part

    part = parse_part(args.part)
    kinds = {m.endswith(".onnx") for m in args.model}
    if len(kinds) > 1:
        raise LightsegError("-m mixes .onnx files and run folders; an ensemble uses one backend: export every run, or use run folders")
    backend = args.backend or ("onnx" if kinds == {True} else "torch")
    if backend in ("onnx", "openvino"):
        from lightseg.inference.onnx_predictor import predict_onnx

        bf16 = backend == "openvino"  # OpenVINO runs bf16 after a check against fp32
        if args.device == "cuda" or args.checkpoint != "final" or args.precision not in (None, "fp32", *(("bf16",) if bf16 else ())):
            raise LightsegError(f"--backend {backend} runs the exported model on the CPU in fp32{' (or bf16)' if bf16 else ''}; drop "
                                "--device cuda, --precision and --checkpoint (pick the checkpoint at `lightseg export --checkpoint`)")
        written = predict_onnx(args.input, args.output, args.model, step=args.step, tta=args.tta,
                               save_probabilities=args.save_probabilities, batch_tiles=args.batch_tiles, part=part,
                               backend=backend, precision=args.precision or "fp32")
        print(f"{args.output}: {len(written)} cases predicted")
        return 0
    from lightseg.inference.predictor import default_device, predict

    written = predict(args.input, args.output, args.model, checkpoint=args.checkpoint, step=args.step, tta=args.tta,
                      save_probabilities=args.save_probabilities, device=args.device or default_device(),
                      batch_tiles=args.batch_tiles, part=part, precision=args.precision)
    print(f"{args.output}: {len(written)} cases predicted")
    return 0


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `lightseg train` (pruned PSP-Seg included)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                        help="ONNX file to write; its sidecar MODEL.onnx.json (plan, labels, patch size) goes beside it")
    parser.add_argument("--checkpoint", choices=("final", "best", "latest"), default="final",
                        help="which checkpoint of the run (default: final)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest |ONNX Runtime - PyTorch| accepted on a random tile (default: 1e-4)")


def _export(args: argparse.Namespace) -> int:
    from lightseg.inference.export import export_run

    onnx_path, sidecar, difference = export_run(args.run_dir, args.output, args.checkpoint, args.tolerance)
    print(f"{onnx_path} and {sidecar} written (onnx.checker passed; ONNX Runtime vs PyTorch max |difference| "
          f"{difference:.1e}); predict with `lightseg predict --backend onnx -m {onnx_path} -i IMAGES -o OUT`")
    return 0


def _demo_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT_DIR", help="folder to write the nnU-Net v2 data set into")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cases (default: 0)")
    parser.add_argument("--spacing", type=float, default=1.5, metavar="MM",
                        help="isotropic voxel spacing of the cases in mm (default: 1.5)")
    parser.add_argument("--workers", type=int, default=None, help="cases made in parallel (default: up to 4 processes)")


def _demo_data(args: argparse.Namespace) -> int:
    from lightseg.data.demo import make_demo_dataset
    from lightseg.io import check_output_folder

    check_output_folder(args.out)
    out = make_demo_dataset(args.out, num_cases=args.cases, seed=args.seed, spacing=args.spacing,
                            workers=args.workers, progress=True)
    print(f"{out}: {args.cases} demo cases (augmented copies of the MNI152 2009a template, not patients); "
          f"check them with `lightseg verify {out}`")
    return 0


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="lightseg_demo", metavar="DIR",
                        help="folder for the data set, cache, run, predictions and figure (default: ./lightseg_demo; "
                             "a rerun reuses the data set and cache and redoes the rest)")
    parser.add_argument("--minutes", type=float, default=5.0, metavar="M",
                        help="training budget in minutes, pilot steps included (default: 5; the other stages take "
                             "2-3 minutes more on 2 CPU cores)")
    parser.add_argument("--cases", type=int, default=8, help="demo cases; a quarter (at least 1) is held out (default: 8)")
    parser.add_argument("--model", default="lightmedseg", help="registered model name (default: lightmedseg)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data set and of training (default: 0)")
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32), metavar=("X", "Y", "Z"),
                        help="training patch in voxels at 2 mm (default: 32 32 32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="compute device (default: cuda if available, else cpu)")
    parser.add_argument("--augment", choices=("none", "light", "default", "strong"), default=None,
                        help="training augmentation level (default: the demo's, docs/demo.md)")


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lightseg.demo import DemoConfig, run_demo
    from lightseg.inference.predictor import default_device
    from lightseg.io import check_output_folder

    check_output_folder(args.out)  # before minutes of work

    run_demo(DemoConfig(out=Path(args.out), minutes=args.minutes, cases=args.cases, model=args.model, seed=args.seed,
                        device=args.device or default_device(), patch=tuple(args.patch),
                        **({"augment": args.augment} if args.augment else {})))
    return 0


def _benchmark_args(parser: argparse.ArgumentParser) -> None:
    from lightseg.benchmark.profile import LAYOUTS

    parser.add_argument("--models", nargs="+", default=None, help="registered model names (default: all)")
    parser.add_argument("--size", type=int, default=128, help="cube side of the main input (default 128)")
    parser.add_argument("--channels", type=int, default=4, help="input channels of the main input (default 4)")
    parser.add_argument("--extra", type=shape_arg, nargs="*", default=[], metavar="CxS", help="more shapes to time, e.g. 1x64")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards; the median is reported (default 5)")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="predict",
                        help="memory format: each model's own as `lightseg predict` runs it (default), or one for all")
    parser.add_argument("--baseline", default="plainunet", help="model the speed ratio is taken against")
    parser.add_argument("--output", type=output_arg, nargs="*", default=[], help="write the plot (.png), table (.md), rows (.json)")


def _benchmark(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lightseg.benchmark.profile import LAYOUTS, benchmark_models
    from lightseg.benchmark.report import format_table, machine_info, plot_rows, save_rows
    from lightseg.io import atomic_write, check_output_file
    from lightseg.models import list_models

    for output in args.output:
        check_output_file(output)  # before minutes of timing
    names = args.models or list_models()
    rows = benchmark_models(
        names, args.size, args.channels, args.threads, args.device, extra_shapes=args.extra, warmup=args.warmup,
        repeats=args.repeats, channels_last=LAYOUTS[args.layout], progress=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    table = format_table(rows, baseline=args.baseline)
    print(f"{machine_info(rows)}\n\n{table}")
    for output in map(Path, args.output):
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix == ".png":
            plot_rows(rows, output)
        elif output.suffix == ".json":
            save_rows(rows, output)
        else:
            with atomic_write(output, "w") as handle:
                handle.write(f"{machine_info(rows)}\n\n{table}")
        print(f"wrote {output}", file=sys.stderr)
    return 0 if len(rows) == len(names) else 1


# In the order of the flow: data in, train, predict, evaluate, deploy.
COMMANDS: list[Command] = [
    ("demo", "the whole toolkit in one command: demo data, preprocess, train, predict, evaluate, overlay figure", _demo_args, _demo),
    ("demo-data", "write the demo data set: augmented copies of the MNI152 brain template (4 tissue classes)", _demo_data_args, _demo_data),
    ("convert-msd", "convert a Medical Segmentation Decathlon task to the nnU-Net v2 layout", _convert_msd_args, _convert_msd),
    ("verify", "check a raw data set and list every problem found (nnU-Net integrity checks)", _verify_args, _verify),
    ("info", "shape, spacing, orientation, dtype, intensity range and label values of NIfTI files", _info_args, _info),
    ("preprocess", "fingerprint, plan and preprocess a data set into a cache for training", _preprocess_args, _preprocess),
    ("train", "train a registered model on a data set or cache into a run folder (torchrun for DDP)", train_args, train_verb),
    ("recipes", "list the named training recipes (each paper's setting) for `lightseg train --recipe`", recipes_args, recipes_verb),
    ("predict", "segment NIfTI scans with a trained run folder; masks on the input grid", _predict_args, _predict),
    ("evaluate", "Dice, IoU, HD95 and surface Dice of predictions against ground truth", _evaluate_args, _evaluate),
    ("crossval", "merge the validation predictions of fold runs and evaluate them (every case once)", _crossval_args, _crossval),
    ("find-best", "pick the best model or two-model ensemble from cross-validation (nnU-Net's find_best_configuration)",
     _find_best_args, _find_best),
    ("export", "export a run folder to ONNX with a JSON sidecar, checked against PyTorch (for `predict --backend onnx`)", _export_args, _export),
    ("benchmark", "parameters, GMAC, latency and peak memory of registered models, with a baseline ratio", _benchmark_args, _benchmark),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightseg", description="Efficient 3D medical image segmentation (LightMedSeg, LUnet, PSP-Seg, PGPS)."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, help_text, add_args, run in COMMANDS:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        add_args(sub)
        check_options(name, sub)
        sub.set_defaults(run=run)
    return parser


def _show_warnings_as(verb: str) -> None:
    """Print each warning as one line like the errors' (``lightseg predict: warning: ...``), without
    Python's file, line and source, and above any progress bar instead of inside it."""
    from tqdm import tqdm

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
             line: str | None = None) -> None:
        text = str(message).removeprefix("lightseg: ")
        tqdm.write(f"lightseg {verb}: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_warnings_as(args.verb)
    try:
        return _run(args)
    except BrokenPipeError:
        if not _reader_gone():
            raise  # another pipe (a worker's): not the user's reader
        # `lightseg ... | head`: the reader has all it wanted. Stop as a shell command does on SIGPIPE,
        # silently (a message has nowhere to go), both streams on /dev/null so the exit's flush is quiet.
        quiet = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(quiet, stream.fileno())
        return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    """The verb, with each kind of failure turned into one line and an exit status."""
    try:
        check_environment()
        return int(args.run(args) or 0)
    except LightsegError as exc:
        print(f"lightseg {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine, not a bug: disk full, no permission, a file where a folder must be
        if isinstance(exc, BrokenPipeError) and _reader_gone():
            raise  # the reader stopped early: main ends quietly
        print(f"lightseg {args.verb}: error: {machine_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lightseg {args.verb}: interrupted; finished work is kept, rerun to continue", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise  # a bug: keep its traceback
        print(f"lightseg {args.verb}: error: {out_of_memory_line(exc)}", file=sys.stderr)
        return 1


def _reader_gone() -> bool:
    """Whether stdout's or stderr's reader has closed its end (a pipe reports an error on poll)."""
    poll = select.poll()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            poll.register(stream.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


if __name__ == "__main__":
    raise SystemExit(main())
