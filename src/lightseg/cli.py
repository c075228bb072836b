"""``lightseg <verb>``: parses flags and calls the Python API, nothing else.

Each verb is a pair of functions, ``_<verb>_args(parser)`` and ``_<verb>(args) -> int``, listed
in :data:`COMMANDS`. Imports of heavy modules (torch) happen inside the verb, so ``lightseg
--help`` and light verbs start fast. A :class:`~lightseg.errors.LightsegError` is printed as one
clear line and exits with status 1; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

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


def _preprocess(args: argparse.Namespace) -> int:
    from lightseg.data.preprocess import preprocess_dataset

    plan = preprocess_dataset(args.dataset, args.output, workers=args.workers, patch_size=args.patch,
                              target_spacing=args.spacing, image_dtype=args.dtype)
    print(f"{args.output}: target spacing {list(plan.target_spacing)} mm, patch {list(plan.patch_size)}, "
          f"median shape {list(plan.median_shape or ())}; plan in {args.output}/plan.json")
    return 0


COMMANDS: list[Command] = [
    ("evaluate", "Dice, IoU, HD95 and surface Dice of predictions against ground truth", _evaluate_args, _evaluate),
    ("verify", "check a raw data set and list every problem found (nnU-Net integrity checks)", _verify_args, _verify),
    ("preprocess", "fingerprint, plan and preprocess a data set into a cache for training", _preprocess_args, _preprocess),
    ("convert-msd", "convert a Medical Segmentation Decathlon task to the nnU-Net v2 layout", _convert_msd_args, _convert_msd),
    ("info", "shape, spacing, orientation, dtype, intensity range and label values of NIfTI files", _info_args, _info),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightseg", description="Efficient 3D medical image segmentation (LightMedSeg, LUnet, PSP-Seg, PGPS)."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, help_text, add_args, run in COMMANDS:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        add_args(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except LightsegError as exc:
        print(f"lightseg {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lightseg {args.verb}: interrupted; finished work is kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
