"""Preprocessing speed per case and cache size, and our resampler against scipy.ndimage.zoom.

Usage (defaults: 4 cases of 130^3, 2 workers, resampled from 1.0 mm to 1.2 mm)::

    python benchmarks/preprocess_speed.py [--cases 4] [--shape 130 130 130] [--workers 2]
        [--spacing 1 1 1] [--target 1.2 1.2 1.2]

Table 1 times ``preprocess_dataset`` end to end on a synthetic data set (fingerprint, plan,
preprocess; process start-up included). Table 2 times one channel's resampling with the separable
operators of ``lightseg.data.resample`` against the same resampling done with
``scipy.ndimage.zoom`` (the baseline; for anisotropic spacings nnU-Net's split: order 3
in-plane, order 0 along the coarse axis), in the same run, and prints how far they differ.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from lightseg.data import make_synthetic_dataset
from lightseg.data.preprocess import preprocess_dataset
from lightseg.data.resample import resample_image, resampled_shape, separate_axis


def scipy_resample(volume: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """The same resampling with ``scipy.ndimage.zoom`` alone: order 3, and for anisotropic data
    order 3 in-plane (factor 1 on ``axis``) followed by order 0 along ``axis``."""
    factors = [n / o for n, o in zip(shape, volume.shape)]
    if axis is None:
        return ndimage.zoom(volume, factors, order=3, mode="nearest", grid_mode=True)
    in_plane = [1.0 if a == axis else f for a, f in enumerate(factors)]
    out = ndimage.zoom(volume, in_plane, order=3, mode="nearest", grid_mode=True)
    along = [factors[a] if a == axis else 1.0 for a in range(3)]
    return ndimage.zoom(out, along, order=0, mode="nearest", grid_mode=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(130, 130, 130))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    parser.add_argument("--target", type=float, nargs=3, default=(1.2, 1.2, 1.2))
    args = parser.parse_args()
    shape, spacing, target = tuple(args.shape), tuple(args.spacing), tuple(args.target)

    with tempfile.TemporaryDirectory() as tmp:
        raw = make_synthetic_dataset(Path(tmp) / "raw", num_cases=args.cases, shape=shape, spacing=spacing,
                                     num_classes=4, seed=0)
        cache = Path(tmp) / "cache"
        start = time.perf_counter()
        plan = preprocess_dataset(raw, cache, workers=args.workers, target_spacing=target, progress=False)
        total = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (cache / "cases").iterdir()) / args.cases / 2**20
    print(f"Table 1: preprocess_dataset, {args.cases} cases of {shape} at {spacing} mm -> {plan.target_spacing} mm, "
          f"{args.workers} workers")
    print(f"{'total s':>10} {'s per case':>11} {'cache MB per case':>18}")
    print(f"{total:>10.2f} {total / args.cases:>11.2f} {size:>18.2f}")

    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.normal(size=shape), 2).astype(np.float32)
    out_shape = resampled_shape(shape, spacing, target)
    timings = {}
    start = time.perf_counter()
    ours = resample_image(volume[None], spacing, target, out_shape)[0]
    timings["separable operators (lightseg)"] = time.perf_counter() - start
    start = time.perf_counter()
    baseline = scipy_resample(volume, out_shape, separate_axis(spacing, target))
    timings["scipy.ndimage.zoom (baseline)"] = time.perf_counter() - start
    print(f"\nTable 2: one channel {shape} -> {out_shape}; max abs difference "
          f"{np.abs(ours - baseline).max():.2e}")
    print(f"{'method':<32} {'s':>8} {'x baseline':>11}")
    for name, seconds in timings.items():
        print(f"{name:<32} {seconds:>8.3f} {timings['scipy.ndimage.zoom (baseline)'] / seconds:>11.1f}")


if __name__ == "__main__":
    main()
