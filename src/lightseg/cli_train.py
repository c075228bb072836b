"""The training verbs of ``lightseg``: ``train``, whose flags map onto the training configuration
(a flag whose ``dest`` is an option name of :data:`lightseg.training.config.OPTIONS` is passed on
as that option), and ``recipes``. Listed in :data:`lightseg.cli.COMMANDS`; errors are reported
there."""

from __future__ import annotations

import argparse

from lightseg.cli_options import fold_arg
from lightseg.errors import LightsegError


def train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATASET_OR_CACHE", nargs="?", default=None,
                        help="a raw nnU-Net data set (preprocessed first) or a cache from `lightseg preprocess` "
                        "(default with --config: that run's cache)")
    parser.add_argument("--recipe", default=None, metavar="NAME",
                        help="start from a paper's setting (`lightseg recipes` lists them); flags given here replace its values")
    parser.add_argument("--config", default=None, metavar="RUN/config.json",
                        help="train again with another run's settings (pruning and curriculum included); "
                        "flags given here replace its values")
    parser.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run folder to write")
    parser.add_argument("--model", default=None, help="registered model name (`lightseg.list_models()`; default: lunet)")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON", help='model arguments, e.g. \'{"width": 8}\'')
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="where a raw data set is preprocessed (default: RUN_DIR/../<data set>_cache)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 50 or the model's recipe)")
    parser.add_argument("--iters-per-epoch", type=int, default=None, help="optimizer steps per epoch (default: 250)")
    parser.add_argument("--patch", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), dest="patch_size",
                        help="training patch in voxels, in the images' axis order like every --patch (default: the "
                        "plan's, rounded to the model's divisibility)")
    parser.add_argument("--batch", type=int, default=None, dest="batch_size", help="patches per step and process (default: 2)")
    parser.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the model's recipe)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="default: the model's recipe")
    parser.add_argument("--schedule", choices=("poly", "cosine", "constant"), default=None, help="default: the model's recipe")
    parser.add_argument("--loss", default=None,
                        help="dice_ce (nnU-Net's), dice_ce_bg, region, lightmedseg (default: the recipe's)")
    parser.add_argument("--region-training", action=argparse.BooleanOptionalAction, default=None,
                        help="on a data set declaring regions (BraTS): one sigmoid per region with the region loss, as "
                        "nnU-Net (default: off, the net trains on the classes and is validated on the regions)")
    parser.add_argument("--augment", choices=("none", "light", "default", "strong"), default=None, help="augmentation strength (default: default)")
    parser.add_argument("--elastic", action="store_true", default=None, help="add elastic deformation (slow)")
    parser.add_argument("--curriculum", choices=("none", "pgps-efficiency", "pgps-performance", "rpss"), default=None,
                        help="patch-size curriculum (default: none)")
    parser.add_argument("--pgps-version", choices=("v1", "v2"), default=None,
                        help="PGPS variant: v2 (journal, default) or v1 (MICCAI 2024); see docs/pgps.md")
    parser.add_argument("--batch-memory", type=float, default=None, metavar="F",
                        help="curriculum batch cap: at most F x the voxels of the planned batch (default: 1.0)")
    parser.add_argument("--max-batch", type=int, default=None, metavar="N",
                        help="curriculum batch cap: at most N patches per step (default: no limit)")
    parser.add_argument("--no-deep-supervision", dest="deep_supervision", action="store_false", default=None,
                        help="train only the full-resolution output")
    parser.add_argument("--val-fraction", type=float, default=None, help="share of cases held out for validation (default: 0.2)")
    parser.add_argument("--splits", default=None, metavar="FILE",
                        help='{"train": [...], "val": [...]} case names, or with --fold a list of them (nnU-Net\'s splits_final.json)')
    parser.add_argument("--fold", type=fold_arg, default=None, metavar="K|all",
                        help="cross-validation fold K of splits_final.json (--splits, else the cache's, made as nnU-Net "
                             "makes it when absent), or 'all' to train on every case")
    parser.add_argument("--num-folds", type=int, default=None, metavar="N",
                        help="folds of a new splits_final.json (default: 5, as nnU-Net)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                        help="training and validation precision (default: bf16 on a GPU that supports it, else fp16; fp32 on CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loading worker processes per process (default: 2 on CPU, up to 12 per GPU; 0 = in process)")
    parser.add_argument("--resume", action="store_true",
                        help="continue RUN_DIR from checkpoint_latest.pth with its config.json (an option that differs from it is an error)")
    parser.add_argument("--pruning", choices=("none", "fd", "progressive"), default=None,
                        help="PSP-Seg: progressive = functional-decoupling loss + progressive pruning, fd = the loss alone "
                        "(default: none); stored in config.json with the schedule's settings (pruning_* options)")
    parser.add_argument("--architecture", default=None, metavar="FILE",
                        help="retrain a pruned PSP-Seg: rebuild this architecture.json, freshly initialised")
    parser.add_argument("--channel-pruning", default=None, metavar="RULE",
                        choices=("stamp", "random-in-stamp-layer", "random-in-largest-layer"),
                        help="unet/lunet: remove channels while training, by STAMP's ranking or a random baseline "
                        "(docs/lunet.md; default: none; --resume keeps the run's)")
    parser.add_argument("--prune-channels", type=int, default=None, metavar="N", dest="channel_pruning_channels_per_step",
                        help="channels removed per pruning step (default: 1)")
    parser.add_argument("--recovery-epochs", type=int, default=None, metavar="R", dest="channel_pruning_recovery_epochs",
                        help="training epochs between pruning steps (default: 1)")
    parser.add_argument("--prune-start", type=int, default=None, metavar="E", dest="channel_pruning_start_epoch",
                        help="epochs trained before the first pruning step (default: 1)")
    parser.add_argument("--target-params", type=int, default=None, metavar="N", dest="channel_pruning_target_params",
                        help="stop pruning at N parameters or fewer (default: prune until training ends)")


def train_verb(args: argparse.Namespace) -> int:
    import json

    from lightseg.training.config import TUNABLE
    from lightseg.training.run import train

    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    except json.JSONDecodeError as exc:
        raise LightsegError(f"--model-kwargs is not valid JSON ({exc}); write it like '{{\"width\": 8}}'") from exc
    if args.model_kwargs and not isinstance(model_kwargs, dict):
        raise LightsegError(f"--model-kwargs must be a JSON object of model arguments like '{{\"width\": 8}}', "
                            f"got a {type(model_kwargs).__name__}")
    # A flag whose dest is an option name (lightseg.training.config.OPTIONS) is passed on as that option.
    options = {k: getattr(args, k) for k in TUNABLE - {"model_kwargs"} if getattr(args, k, None) is not None}
    if args.architecture:
        from pathlib import Path

        try:
            model_kwargs = {**(model_kwargs or {}), "architecture": json.loads(Path(args.architecture).read_text())}
        except (OSError, json.JSONDecodeError) as exc:
            raise LightsegError(f"--architecture {args.architecture}: cannot read it as JSON ({exc}); pass a run's architecture.json") from exc
        if not isinstance(model_kwargs["architecture"], dict):
            raise LightsegError(f"--architecture {args.architecture}: must be a JSON object of module names and "
                                "branch ids; pass a run's architecture.json")
    run = train(args.data, args.output, args.model, recipe=args.recipe, config=args.config, model_kwargs=model_kwargs, cache=args.cache,
                splits=args.splits, num_folds=args.num_folds, device=args.device, workers=args.workers, resume=args.resume,
                **options)
    print(f"{run}: training finished")
    return 0


def recipes_args(parser: argparse.ArgumentParser) -> None:
    pass


def recipes_verb(args: argparse.Namespace) -> int:
    from lightseg.training.recipes import format_recipes

    print(format_recipes())
    print("\nuse one with `lightseg train DATA -o RUN --recipe NAME [flags that replace its values]`; "
          "per recipe, the paper's setting and every deviation: docs/recipes.md")
    return 0
