"""One-GPU readiness check: trains, prunes, runs a curriculum, predicts and times, in under 5 minutes.

    python benchmarks/gpu_check.py              # needs one CUDA GPU; exits 2 with a message without one
    python benchmarks/gpu_check.py --patch 64 --scan 96 96 64     # smaller patches and scan, same steps
    python benchmarks/gpu_check.py --device cpu --iters 2 --patch 32 --scan 48 48 32   # the script itself on a CPU

Steps, each a row of the one table printed at the end (exit status 1 when any row failed):

1. ``train``: LightMedSeg, 2 epochs of ``--iters`` steps at 4 x 128^3 patches (batch 2, default
   augmentation, the device's loader workers), once per precision (fp32, fp16, bf16 where the
   GPU has it): finite losses, checkpoint reloads, seconds per step and ``data_wait``;
2. ``prune``: PSP-Seg-S with progressive pruning on a forced schedule (every window converges,
   nothing is over-pruned): branches masked, removed, ``architecture.json`` written, and the
   pruned checkpoint reloads with fewer parameters;
3. ``pgps``: LightMedSeg through a PGPS performance curriculum (4 stages, so 4 patch and batch
   shapes, cuDNN re-tuning for each);
4. ``predict``: a BraTS-size scan (4 x 240 x 240 x 155) predicted with the fp32 run on the GPU
   and on the CPU; voxel agreement of the labels (at least 99.9 %) and the time of each;
5. ``forward``: the bare 1 x 4 x 128^3 LightMedSeg forward per precision and memory format,
   median of 20 after 10 warm-up calls (wall time, synchronised), against the LightMedSeg paper's 13.7 ms (RTX 5080).

The data are synthetic (ellipsoids in noise), so Dice is not a result here; the check is that
every GPU code path runs, agrees with the CPU, and how fast. Paste the table into
docs/benchmarks.md ("GPU check").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEVICE = "cuda"  # --device cpu runs every step on the CPU: a check of this script, not of a GPU
PAPER_MS = 13.7  # LightMedSeg paper: 1 x 4 x 128^3 forward on an RTX 5080
AGREEMENT = 0.999  # share of voxels whose GPU and CPU labels must agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10, help="steps per epoch in the training rows (default: 10)")
    parser.add_argument("--patch", type=int, default=128, help="training patch side (default: 128)")
    parser.add_argument("--scan", type=int, nargs=3, default=(240, 240, 155), help="predicted scan (default: BraTS's)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run the steps on the CPU to check the script (fp32 only, no GPU figure)")
    args = parser.parse_args()

    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); run it on a GPU "
              "machine. Nothing was checked.", file=sys.stderr)
        return 2
    patch = (args.patch,) * 3
    scan = tuple(args.scan)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lightseg-gpu-check-") as tmp:
        root = Path(tmp)
        cache = _cache(root, patch)
        precisions = ["fp32"] if DEVICE == "cpu" else ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
        for precision in precisions:
            _row(rows, "train", precision, lambda p=precision: _train(cache, root / f"run_{p}", patch, p, args.iters))
        _row(rows, "prune", "default", lambda: _prune(cache, root / "pruned", patch))
        _row(rows, "pgps", "default", lambda: _pgps(cache, root / "pgps", patch))
        _row(rows, "predict", "fp32", lambda: _predict(root / "run_fp32", root, scan))
        for precision in precisions:
            for layout in ("contiguous", "channels_last_3d"):
                _row(rows, "forward", f"{precision}, {layout}", lambda p=precision, l=layout: _forward(p, l))
    _print(rows, torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (script check only)", time.perf_counter() - start)
    return 1 if any(not r["ok"] for r in rows) else 0


def _row(rows: list[dict[str, Any]], step: str, variant: str, check: Callable[[], str]) -> None:
    """Run one check; a failure becomes a FAIL row with its error, and the next check still runs."""
    import torch

    t0 = time.perf_counter()
    try:
        result, ok = check(), True
    except Exception as exc:  # every failure is reported in the table, not raised
        traceback.print_exc()
        result, ok = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}", False
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    rows.append({"step": step, "variant": variant, "ok": ok, "result": result, "seconds": time.perf_counter() - t0})
    print(f"{step} ({variant}): {'ok' if ok else 'FAIL'} {result}", file=sys.stderr, flush=True)


def _cache(root: Path, patch: tuple[int, int, int]) -> Path:
    from lightseg.data import make_synthetic_dataset
    from lightseg.data.preprocess import preprocess_dataset

    raw = make_synthetic_dataset(root / "raw", num_cases=4, shape=tuple(p + 16 for p in patch), num_channels=4, num_classes=4)
    preprocess_dataset(raw, root / "cache", workers=4, progress=False)
    return root / "cache"


def _finite_history(run: Path) -> list[dict[str, Any]]:
    import math

    from lightseg.run_folder import load_checkpoint, load_run

    history = load_checkpoint(run / "checkpoint_final.pth")["history"]
    losses = [entry["train_loss"] for entry in history]
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"non-finite epoch losses {losses}")
    load_run(run, "final", DEVICE)
    return history


def _train(cache: Path, run: Path, patch: tuple[int, int, int], precision: str, iters: int) -> str:
    from lightseg.training.run import train

    train(cache, run, "lightmedseg", epochs=2, iters_per_epoch=iters, patch_size=patch, batch_size=2, device=DEVICE,
          precision=precision, val_fraction=0.25)
    last = _finite_history(run)[-1]
    return (f"loss {last['train_loss']:.3f}, {last['sec_per_iter'] * 1000:.0f} ms/step (epoch 2), "
            f"data_wait {100 * last['data_wait']:.0f} %")


def _prune(cache: Path, run: Path, patch: tuple[int, int, int]) -> str:
    from lightseg.models import create_model
    from lightseg.run_folder import load_run
    from lightseg.training.decoupling import FunctionalDecoupling
    from lightseg.training.pruning import ProgressivePruning, PruningConfig
    from lightseg.training.run import train

    forced = PruningConfig(step=2, window=1, tolerance=1e9, deadline=1.0, calibration_batches=4, loss_keys=("epoch",))
    train(cache, run, "pspseg", model_kwargs={"size": "S"}, epochs=5, iters_per_epoch=4, patch_size=patch, batch_size=2,
          device=DEVICE, val_fraction=0.25, callbacks=[FunctionalDecoupling(), ProgressivePruning(forced)])
    architecture = json.loads((run / "architecture.json").read_text())
    model, *_ = load_run(run, "final", DEVICE)
    if model.architecture() != architecture:
        raise RuntimeError("the reloaded model's branches differ from architecture.json")
    full = sum(p.numel() for p in create_model("pspseg", 4, 4, size="S").parameters())
    pruned = sum(p.numel() for p in model.parameters())
    if pruned >= full:
        raise RuntimeError(f"nothing was pruned ({pruned} of {full} parameters)")
    _finite_history(run)
    return f"{pruned} of {full} parameters left, reloaded"


def _pgps(cache: Path, run: Path, patch: tuple[int, int, int]) -> str:
    from lightseg.training.run import train

    train(cache, run, "lightmedseg", epochs=4, iters_per_epoch=3, patch_size=patch, batch_size=2, device=DEVICE,
          val_fraction=0.25, curriculum="pgps-performance", max_batch=32)
    shapes = [(tuple(e.get("patch_size", ())), e.get("batch_size")) for e in _finite_history(run)]
    if len(set(shapes)) < 2:
        raise RuntimeError(f"the curriculum never changed shape: {shapes}")
    return "batch x patch: " + " -> ".join(f"{b} x {'x'.join(map(str, p))}" for p, b in shapes)


def _predict(run: Path, root: Path, shape: tuple[int, int, int]) -> str:
    import nibabel as nib
    import numpy as np

    from predict_brats import write_scan

    from lightseg.inference.predictor import predict

    write_scan(root / "scan", shape)
    seconds, labels = [], []
    for index, device in enumerate((DEVICE, "cpu")):
        out = root / f"pred_{index}"
        t0 = time.perf_counter()
        predict(root / "scan", out, run, device=device, progress=False)
        seconds.append(time.perf_counter() - t0)
        labels.append(np.asarray(nib.load(next(out.glob("*.nii.gz"))).dataobj))
    gpu, cpu = labels
    agreement = float((gpu == cpu).mean()) if gpu.shape == cpu.shape else 0.0
    if agreement < AGREEMENT:
        raise RuntimeError(f"GPU and CPU labels agree on {100 * agreement:.3f} % of voxels (< {100 * AGREEMENT} %)")
    return f"labels agree on {100 * agreement:.3f} %; {DEVICE} {seconds[0]:.2f} s, cpu {seconds[1]:.2f} s"


def _forward(precision: str, layout: str) -> str:
    import torch

    from lightseg.device import autocast
    from lightseg.models import create_model

    device = torch.device(DEVICE)
    memory = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    torch.backends.cudnn.benchmark = True
    model = create_model("lightmedseg", 4, 4).to(device=device, memory_format=memory).eval()
    x = torch.randn(1, 4, 128, 128, 128, device=device).contiguous(memory_format=memory)
    times = []
    runs, warmup = (30, 10) if DEVICE == "cuda" else (2, 1)
    with torch.no_grad(), autocast(device, precision):
        for i in range(runs):
            t0 = time.perf_counter()
            model(x)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - t0))
    median = statistics.median(times)
    return f"{median:.2f} ms ({median / PAPER_MS:.2f}x the paper's {PAPER_MS} ms)"


def _print(rows: list[dict[str, Any]], gpu: str, total: float) -> None:
    import torch

    print(f"\n{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}; {total:.0f} s in all\n")
    print("| step | variant | ok | result | s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['variant']} | {'ok' if r['ok'] else 'FAIL'} | {r['result']} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
