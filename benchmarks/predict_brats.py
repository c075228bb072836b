"""Time `lightseg predict` on one BraTS-size case: 4 x 240 x 240 x 155, 1 mm, LightMedSeg.

The weights are random (timing does not depend on them) and the scan is synthetic: four int16
channels of noise inside a brain-sized ellipsoid, zero outside, so preprocessing crops like it
does on BraTS. The plan is BraTS-like: 1 mm target spacing, per-channel z-score on the nonzero
region, 128^3 tiles (the paper's patch), 4 class outputs (LightMedSeg trains BraTS on its classes and is
scored on WT/TC/ET; before region data sets stopped switching every model to region training, this
benchmark timed 3 sigmoid region outputs).

Each mode runs in a fresh process so its peak memory (max RSS, and the CUDA allocator's peak on a
GPU) is its own. Baseline: the default prediction (no TTA, network in channels_last_3d memory
format), measured in the same run. The other rows give their ratio to it: mirror TTA (8 network
passes per tile) and the network in the contiguous memory format.

    python benchmarks/predict_brats.py                       # CPU, full size
    python benchmarks/predict_brats.py --device cuda --batch-tiles 4
    python benchmarks/predict_brats.py --shape 96 96 64 --patch 64 64 64   # quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("read", "preprocess", "network", "blending", "restore", "write")
MODES = {"no TTA": [], "TTA": ["--tta"], "no TTA, contig.": ["--contiguous"]}


def build_run(run: Path, patch: tuple[int, int, int]) -> None:
    """A LightMedSeg run folder with random weights and a BraTS-like plan and dataset.json."""
    import torch

    from lightseg.data.dataset import parse_dataset_json
    from lightseg.data.plan import ChannelNormalization, Plan, save_plan
    from lightseg.io import write_json
    from lightseg.models import create_model
    from lightseg.models.registry import model_entry
    from lightseg.training.checkpoint import save_checkpoint
    from lightseg.training.config import resolve_config

    dataset = {
        "name": "BraTS-like benchmark",
        "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
        "regions_class_order": [1, 2, 3],
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    spec = parse_dataset_json(dataset)
    plan = Plan(
        dataset_name="BraTS-like benchmark",
        channel_names=spec.channel_names,
        label_values=spec.label_values,
        target_spacing=(1.0, 1.0, 1.0),
        patch_size=patch,
        normalization=tuple(ChannelNormalization("zscore") for _ in spec.channel_names),
        crop_to_nonzero=True,
    )
    config, _ = resolve_config("lightmedseg", spec, patch, model_entry("lightmedseg").recipe, {})
    run.mkdir(parents=True)
    write_json(run / "dataset.json", dataset)
    save_plan(plan, run / "plan.json")
    write_json(run / "config.json", config.to_json())
    torch.manual_seed(0)
    model = create_model("lightmedseg", config.data.in_channels, config.data.num_classes)
    save_checkpoint(run / "checkpoint_final.pth", {"model": model.state_dict()})


def write_scan(folder: Path, shape: tuple[int, int, int]) -> None:
    """Four int16 channels: noise inside a centred ellipsoid of a brain's extent, zero outside."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    radii = np.array([70, 85, 65]) * np.array(shape) / np.array([240, 240, 155])
    inside = sum(((g - n / 2) / r) ** 2 for g, n, r in zip(grid, shape, radii)) <= 1
    folder.mkdir(parents=True)
    for channel in range(4):
        data = np.where(inside, rng.normal(400 + 100 * channel, 80, shape), 0).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), folder / f"BraTS_0000_{channel:04d}.nii.gz")


def worker(args: argparse.Namespace) -> None:
    """One prediction in this process; prints its stage times and peaks as JSON."""
    import torch

    from lightseg.benchmark.memory import process_peak_mb
    from lightseg.inference import StageTimer, predict

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timer = StageTimer(device)
    start = time.perf_counter()
    predict(args.images, args.out, args.run, tta=args.tta, device=args.device, batch_tiles=args.batch_tiles,
            step=args.step, progress=False, timer=timer, channels_last=not args.contiguous)
    total = time.perf_counter() - start
    seconds = dict(timer.seconds)
    seconds["blending"] = seconds.pop("sliding window") - seconds["network"]
    result = {
        "seconds": seconds,
        "total": total,
        "peak_rss_mb": process_peak_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128))
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--batch-tiles", type=int, default=None, help="default: lightseg predict's")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=tuple(MODES),
                        help="which predictions to time (default: all; the first is the ratio's baseline)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tta", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contiguous", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="lightseg-bench-") as tmp:
        root = Path(tmp)
        build_run(root / "run", tuple(args.patch))
        write_scan(root / "images", tuple(args.shape))
        results = {}
        for mode in args.modes:
            flags = MODES[mode]
            out = root / "out"
            command = [sys.executable, __file__, "--worker", "--run", str(root / "run"), "--images", str(root / "images"),
                       "--out", str(out), "--device", args.device, "--step", str(args.step),
                       "--threads", str(args.threads), *flags]
            if args.batch_tiles:
                command += ["--batch-tiles", str(args.batch_tiles)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(out)
    print(f"lightseg predict, LightMedSeg (random weights), one 4x{'x'.join(map(str, args.shape))} case at 1 mm, "
          f"tiles {'x'.join(map(str, args.patch))}, step {args.step}, device {args.device}, {args.threads} CPU threads, "
          f"{args.batch_tiles or 'default'} tile(s) per call")
    header = f"{'mode':<16}" + "".join(f"{s:>11}" for s in STAGES) + f"{'total s':>10}{'peak RSS MB':>13}{'peak CUDA MB':>14}{'vs no TTA':>11}"
    print(header)
    print("-" * len(header))
    base = results[args.modes[0]]["total"]
    for mode, r in results.items():
        cuda = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        print(f"{mode:<16}" + "".join(f"{r['seconds'].get(s, 0.0):>11.2f}" for s in STAGES)
              + f"{r['total']:>10.2f}{r['peak_rss_mb']:>13.0f}{cuda:>14}{r['total'] / base:>10.2f}x")


if __name__ == "__main__":
    main()
