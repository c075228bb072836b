"""Issue 9's speed targets: LightMedSeg forward at 1x4x128^3 and one BraTS-size scan end to end.

Part 1, forward: batch 1, fp32, ``--threads`` CPU threads (default 2), random weights. Every
model runs in each backend: PyTorch in the contiguous format, PyTorch in ``channels_last_3d``
(what ``lightseg predict`` uses), ONNX Runtime on the exported graph (what ``predict --backend
onnx`` uses), OpenVINO fp32 on the same graph when installed (``predict --backend openvino``) and, with ``--compile``, ``torch.compile`` (inductor, channels_last_3d). The timed
forwards are interleaved round by round (one forward of every configuration per round), so
background load hits all configurations alike and the ratios hold even when absolute times do
not; the median per configuration is reported, with the peak memory of its first forward
(:func:`lightseg.benchmark.profile.measure_peak_memory`). Targets: LightMedSeg (ghost) at most
0.5 s, at least 15x faster than ``plainunet`` (nnU-Net's plain U-Net) and at most 0.75x the time
of MONAI's UNet (the fastest peer at about the same compute, in its best backend) in the same run.
Part 1b: LightMedSeg as ``predict`` runs it, quiet, beside a busy process at the lowest priority
(``nice -n 19``) and beside one at the same priority (nice 0): each measurement in its own fresh
process, the busy process (a Python spin loop) a separate one started before and killed after
it, conditions interleaved round by round; target: at most 1.5x its quiet time.

Part 2, whole scan: ``lightseg predict`` on one synthetic 4x240x240x155 case at 1 mm with
128^3 tiles, step 0.5, no TTA (scan and run folder from ``benchmarks/predict_brats.py``), with
the PyTorch backend and the ONNX Runtime backend, each in a fresh process, ``--scan-rounds`` rounds
interleaved (default 3): per backend the round with the median total, its read, preprocess,
network, blending, restore and write seconds and peak RSS, and every round's total. Target: a
median total of at most 5 s. (One run is no measure on a virtual machine whose memory-bound
stages vary 2x from process to process: docs/prediction.md.)

    python benchmarks/speed.py                    # the real measurement; writes docs/benchmarks.md
    python benchmarks/speed.py --compile          # adds torch.compile (slow first call, needs a C++ compiler)
    python benchmarks/speed.py --quick            # smoke test: 64^3 forward, 96x96x64 scan, prints only
    python benchmarks/speed.py --busy-only        # part 1b alone, prints only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import predict_brats  # noqa: E402  (the benchmark's scan and run folder)
from lightseg.benchmark.report import cpu_description  # noqa: E402
from lightseg.cli_options import bounded  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
MODELS = {  # label: (registry name, builder arguments)
    "LightMedSeg (ghost)": ("lightmedseg", {}),
    "plainunet": ("plainunet", {}),
    "LUnet (C=16)": ("lunet", {}),
    "PSP-Seg (S)": ("pspseg", {}),
    "MONAI UNet": ("monai_unet", {}),  # 4.8 M parameters, about LightMedSeg's compute: the peer to beat
}
STAGES = ("read", "preprocess", "network", "blending", "restore", "write")
NOTES = """\
The largest cost was not in the network: glibc serves every block above 32 MB with a fresh
`mmap` and unmaps it on free, so each large activation was faulted in and zeroed page by page
on every forward. LightMedSeg at 1x4x128^3, 1 thread: 580,000-600,000 minor faults and
1.76-1.97 s of system time per forward beside 2.31-2.83 s of compute (`getrusage`,
2026-11-24). `lightseg.allocator` keeps freed memory in the process (no mmap for big blocks, no
heap trim; `lightseg predict`, `lightseg train` and the profiler apply it; opt out with
`LIGHTSEG_REUSE_MEMORY=0`): 0 faults and 0.00 s system time, 2.07-2.11 s CPU per forward. On 2
threads, separate processes alternated, 1 warm-up and 5 forwards each: LightMedSeg 1.549 s and
1.355 s before, 0.798 s and 0.795 s after (1.7-1.9x; peak RSS 1201 -> 1389 MB and 1176 -> 1161
MB); plainunet 9.58 s -> 7.13 s (1.34x; peak RSS 2312 -> 3118 MB). Training steps gain 1.12x
(2x1x32^3) and 1.22x (2x1x64^3) in CPU time. It also steadied the timings: five forwards now
spread by under 6 %, where the same forward swung from 1.29 s to 2.34 s between runs of this
script before. Its price shows in the memory columns: freed blocks are reused imperfectly, so
the first forward's peak above its starting resident size grew (LightMedSeg channels_last_3d
943 MB in the first run after the change against 448 MB in the last run before the change, plainunet 2263
against 1696 MB), while the whole-scan peak moved from 1414 to 1494 MB. Against the last run
before it (2026-11-23, same command): LightMedSeg 2.398 -> 0.774 s, plainunet's best 13.01 ->
6.46 s, the whole scan 21.21 -> 7.49 s.

Layout and norms (2026-11-24). The network had not stayed in channels_last_3d: PyTorch runs
small batch-1 convs (C x D x H <= 20480) on its own kernels, which return contiguous maps, and
`nn.InstanceNorm3d` returns contiguous maps too, so most of the coarse half of LightMedSeg and
everything after them ran as mixed-layout ops (the skip router's 256-channel 1x1 conv at 32^3:
30 ms instead of 7, as oneDNN reordered its input). Every conv of LightMedSeg, LUnet and PSP-Seg
now hands a channels_last input's layout on (now `lightseg.accel.layers.FastConv3d`), and the position
bias is added in place: 0.741 -> 0.659 s (1.12x, the old code copied beside the new in one
process, same weights, interleaved, median of 7). That exposed a correctness problem: PyTorch's
CPU group norm sums channels_last maps in one float pass, which moved a trained LightMedSeg's
logits by 2.34e-3 from a float64 run and flipped 35 of 1.6M voxel labels (contiguous: 5.0e-6,
none). `accel.layers.AccurateGroupNorm` computes those statistics in short float sums and float64 totals
(5.1e-6, none; 12.2 vs 10.1 ms per 1x8x128^3 map). Instance norm is now `GroupNorm(C, C)`, the
same function 2.9-4.8x faster: PSP-Seg S 1.978 -> 1.225 s in channels_last (1.61x), pruned
1.298 -> 0.888 s. Per-part channel means for the decoder's squeeze-excitation and an in-place
branch sum: 1.06x more. All figures and tests: docs/models.md. Against the run before these
changes (2026-11-24, same command): LightMedSeg 0.774 -> 0.644 s, 8.4x -> 10.5x plainunet, the
whole scan 7.49 -> 6.52 s (runs of this script during the day gave 6.41-6.56 s). ONNX Runtime:
LightMedSeg 1.562 -> 1.097 s and the whole scan 14.41 -> 10.25 s, mostly from exporting the
channel softmaxes as max/exp/sum (its axis-1 `Softmax` on 5-D maps transposes; docs/deployment.md).

Folding and fused kernels (2026-11-24, later). The decoder's squeeze-excitation scales are
folded into the next convs' weights for a batch of one instead of multiplied into 16 x 128^3
maps (1.06x). Fused C kernels (now `lightseg.accel.native`, built on first use with the system C
compiler, run on PyTorch's OpenMP threads, inference only) do group-norm statistics in float64,
norm affine + SiLU, the decoder gate (three branches' norms and SiLUs, softmax, weighted sum,
channel means) and the decoder input (position bias, x2 trilinear skip, concatenation, means)
in one pass each: 0.617 -> 0.486 s (1.27x). Convs that PyTorch's batch-1 rule sends to its slow
vol2col kernel now call oneDNN directly, transposed ones in inference too: 0.486 -> about 0.45 s.
Outputs stay within 3.6e-7 of the code before, and the results page's trained models within
7.8e-6 of float64 with no flipped label. Preprocessing fills the crop mask's holes only inside
the nonzero box (the same mask; 0.35 -> 0.10 s on this scan). All A/Bs: the previous code copied
beside the new in one process, same weights, interleaved, median of 7 (docs/models.md). The
skip router also resizes E1 before projecting it (the two commute; 1.015x). Against the run
before these changes (same command, same day): LightMedSeg 0.644 -> 0.427-0.456 s in four runs,
10.5x -> 13.9-14.6x plainunet (whose own time moved between 6.20 and 6.33 s in those runs, 6.76
s before; `benchmarks/models.py`, which times one model after another, measured 7.02-7.12 s and
16.06-16.60x), the whole scan 6.52 -> 4.72-5.10 s.

Own conv kernels (2026-11-24, evening). The profile below showed oneDNN half-filling its AVX2
vectors on the ghost conv's 16 -> 4 conv. `native.conv3x3x3_out4` holds 4 outputs of 2 voxels
per vector (97 -> 61 ms at 1x16x128^3), and the decoder's 1x1 branch and gate ride along on the
input rows it has already transposed (each was one more pass over the 128 MB map);
`native.ghost_expand` makes the ghost conv's cheap half and the concatenation in one pass (16.3
-> 7.1 ms at 1x4x128^3); `native.grouped_pairs3` sums the grouped branch's channel pairs in
registers (30.5 -> 25 ms at 1x16x128^3). Whole-forward A/Bs (same method): 1.076x, 1.02x, 1.03x
and 1.04x; outputs within 3.6e-7 of the code before, the results page's trained models within
8.5e-6 of float64 with no flipped label (docs/models.md). Against the previous runs of this
script: LightMedSeg 0.439 -> 0.416 s (conv kernel only; plainunet 6.80 s, 16.3x) -> 0.389 s
and 0.369 s (all four, two runs; plainunet 6.28 and 6.48 s, 16.2x and 17.5x), the whole scan
4.89 -> 4.54 -> 4.33 and 4.26 s.

Where the rest goes (forward hooks, 2026-11-24, evening, 0.383 s per forward with the hooks):
the full-resolution decoder stage takes 177 ms: the four-output conv kernel with the 1x1 branch
and gate riding along about 62 ms, the grouped branch 26 ms, the fused gate kernel about 26 ms,
the transposed conv 19 ms, the three norms' statistics about 12 ms, the fused input kernel 13
ms and the ghost halves 7 ms. The other stages: decoder 64^3 60 ms, LSPM 30 ms, skip paths 28
ms, decoder 32^3 22 ms, encoders 29 ms, detector and stem 20 ms. Before these kernels (0.466 s
with the hooks) the stage took 232 ms, the ghost conv's 16 -> 4 conv alone 95 ms, because
oneDNN's AVX2 kernel (`brg_conv_fwd:avx2`) pads the output channels to a block of 8 (4 outputs
cost what 8 do: 95 vs 94 ms).

What was tried: reusing freed memory (above, kept), channels_last_3d (kept, 1.46x on
LightMedSeg; it slows plainunet, whose dense convs prefer NCDHW), keeping that layout through
the network and accurate group norm (above, kept), ONNX Runtime (kept as the torch-free
backend; it keeps its own memory arena and is 1.7x slower than PyTorch in channels_last here),
folding the anchor position bias into `u * g + v` (kept: 0.18 GMAC and one K x D x H x W tensor
per decoder stage fewer), the decoder's grouped conv as a depthwise conv plus a per-pair sum
(`GroupSumConv3d`, kept: 1.11x and 1.13x on the whole forward, then 1.02x more with its bias
folded into the depthwise conv; a dense conv with block-diagonal weights was faster on that op
at 64^3 and 128^3 but 1.1-1.9x slower on the coarser stages), two tiles per network call (5x
per one-channel 32^3 tile, so the default for such tiles; for 4 x 128^3 tiles 1.085x faster per
tile after the layout change, 0.609 vs 0.661 s, for about 0.9 GB more memory, so not the default
there: docs/prediction.md), resizing the skip router's inputs before projecting them instead of
after (0.99x and dropped while small convs took PyTorch's slow kernel; after the oneDNN routing,
for maps larger than the target only: 1.015x, kept), a separable or transposed-conv x2 trilinear upsampling (1.9x and 15x
slower than PyTorch's, dropped), and `torch.compile` with inductor weight freezing: 0.65x at
1x4x128^3 after the layout change (118 s to compile; its generated elementwise code took 0.70
s per forward against eager's whole 0.76 s in that run), 0.98x before it, 1.79x at 1x4x64^3
before the allocator change, so compile is not in `predict`. OpenVINO 2026.4.1 on the exported
graph was 0.666 s against PyTorch's 0.665 s then; it is now `predict --backend openvino` (the
optional `openvino` extra; docs/deployment.md), 1.4x faster than ONNX Runtime for LightMedSeg
and the fastest backend for MONAI UNet and plainunet in the table above. Also tried and not
added: a numba-fused kernel for the full-resolution gate (norm affine, SiLU,
softmax and weighted sum of the three branches in one pass: 97.8 ms against eager's 72.1 ms,
since numba did not vectorise the 27 exponentials per voxel), and 1x1 convs as matrix products
on the channels_last memory (faster only on the small maps PyTorch sends to its own kernels,
under 1 % of the forward). Fused-kernel attempts dropped: Python threads for the kernels (PyTorch's
OpenMP workers spin after each op and took the second core: 1.6x slower than OpenMP), glibc's
vector `expf` (a call per 8 values; the inline polynomial made the gate kernel 1.3x faster), and
a first hand-written depthwise conv (2.2-4x slower than oneDNN's; the vector-block kernels
above replaced it).

The scan and the last passes (2026-12-04, Zen 2). The whole scan's network stage held a copy
per tile that was not the network's: NIfTI arrays and resampling leave the preprocessed image
Fortran-ordered, so each 4 x 128^3 tile reached `channels_last_3d` through a cache-hostile
transpose (60-190 ms a tile). The engine now puts the image in C order once (about 60 ms for
the scan): network stage 4.07 -> 3.53 s in one process, the table's scan 5.16 -> 4.92 s; the
prediction's outside-the-input mask no longer stacks a full-size copy of the four channels
(preprocess 0.52 -> 0.40 s in a fresh process). The kernels that write the decoder's branch
maps now add up their channel moments row by row while the row is in cache, and the norms take
them instead of a pass over each map: 1.014-1.018x on the forward (interleaved A/Bs, same
process). Tried and dropped, measured the same way: two sets of sums for even and odd input
channels in the four-output conv (1.2-1.3x slower: register spills), Winograd F(2,3) along the
rows in that conv (1.15-1.4x slower: twice the transformed input to read), sharing each input
vector between the three horizontal taps in the depthwise kernels (0.87-1.04x), a prefetch of
the rows two steps ahead (no change), a reciprocal estimate with Newton steps in the SiLU
(1.3-1.6x slower than the division) and one 4 -> 16 stride-2 conv for the stem and the anchor
detector (2.7 ms of 430). On one thread PyTorch runs every 1x1 conv of a batch under 16 on its
own kernel (7-20x slower than oneDNN in channels_last_3d); those now go to oneDNN too
(docs/models.md): the 1-thread forward 1.084 -> 0.784 s, so one thread beside a busy process is
no longer slower than two (the table above). This CPU's float32 FMA peak, two threads of a 12-chain
multiply-add loop: 107.3 GMAC/s; LightMedSeg's 14.64 GMAC in 0.43 s run at 34 GMAC/s (32 %),
MONAI UNet's 14.1 GMAC in OpenVINO's 0.268 s at 53 GMAC/s (49 %). 0.75x MONAI's time would take
73 GMAC/s, 68 % of the peak, on a network whose depthwise, grouped and elementwise passes are
bound by memory: out of reach for kernel work, which leaves the arithmetic as the paper defines
it."""


def forward_runners(name: str, kwargs: dict, shape: tuple[int, ...], backends: list[str]) -> dict[str, tuple]:
    """``{backend: (callable, input, compile/export seconds)}`` for one model with shared weights."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from lightseg.accel import accelerate
    from lightseg.inference.export import INPUT_NAME, OUTPUT_NAME, onnx_bytes
    from lightseg.models import create_model

    torch.manual_seed(0)
    model = create_model(name, shape[1], 4, **kwargs).eval()
    x = torch.randn(shape)
    cl = torch.channels_last_3d
    runners = {}
    for backend in backends:
        start = time.perf_counter()
        if backend == "torch":
            runners[backend] = (model, x)
        elif backend == "torch channels_last":
            fast = accelerate(copy.deepcopy(model))  # as `lightseg predict` runs it (lightseg.accel)
            runners[backend] = (fast.to(memory_format=cl), x.contiguous(memory_format=cl))
        elif backend == "torch.compile":
            compiled = torch.compile(copy.deepcopy(model).to(memory_format=cl))
            xc = x.contiguous(memory_format=cl)
            with torch.inference_mode():
                compiled(xc)  # the compilation itself
            runners[backend] = (compiled, xc)
        elif backend == "onnxruntime":
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would slow the next forward
            session = ort.InferenceSession(onnx_bytes(model, x), options,
                                           providers=["CPUExecutionProvider"])
            feed = {INPUT_NAME: np.ascontiguousarray(x.numpy())}
            runners[backend] = (lambda _x, s=session, f=feed: s.run([OUTPUT_NAME], f), x)
        elif backend == "openvino":  # as `predict --backend openvino` compiles it (fp32 set explicitly)
            from lightseg.inference.openvino_backend import compile_network

            with tempfile.TemporaryDirectory(prefix="lightseg-speed-") as tmp:
                (Path(tmp) / "model.onnx").write_bytes(onnx_bytes(model, x))
                network, _ = compile_network(Path(tmp) / "model.onnx", {"input_name": INPUT_NAME, "output_name": OUTPUT_NAME},
                                             "fp32", torch.get_num_threads())
            tiles = np.ascontiguousarray(x.numpy())
            runners[backend] = (lambda _x, n=network, t=tiles: n(t), x)
        runners[backend] = (*runners[backend], time.perf_counter() - start)
    return runners


def forward_table(args: argparse.Namespace) -> tuple[str, dict]:
    import torch

    from lightseg.allocator import reuse_freed_memory
    from lightseg.benchmark.profile import measure_latency, measure_peak_memory

    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as lightseg predict runs (ONNX Runtime has its own arena)
    shape = (1, 4, args.size, args.size, args.size)
    backends = ["torch", "torch channels_last", "onnxruntime"] + (["torch.compile"] if args.compile else [])
    backends += ["openvino"] if importlib.util.find_spec("openvino") else []  # pip install 'lightseg[openvino]'
    rows: dict[tuple[str, str], dict] = {}
    for label, (name, kwargs) in MODELS.items():
        if args.models and name not in args.models:
            continue
        print(f"forward: {label}", file=sys.stderr, flush=True)
        runners = forward_runners(name, kwargs, shape, backends)
        for backend, (run, x, setup) in runners.items():
            forward_mb, _ = measure_peak_memory(run, x)  # the first forward: ONNX Runtime's arena grows in it
            measure_latency(run, x, warmup=args.warmup, repeats=0)
            rows[label, backend] = {"times": [], "setup": setup, "mb": forward_mb}
        for _ in range(args.repeats):  # interleaved rounds
            for backend, (run, x, _) in runners.items():
                rows[label, backend]["times"].extend(measure_latency(run, x, warmup=0, repeats=1))
        del runners
    for row in rows.values():
        row["median"] = statistics.median(row["times"])
    lines = ["| model | backend | median s | min s | setup s | forward peak MB |", "|---|---|---|---|---|---|"]
    for (label, backend), row in rows.items():
        lines.append(f"| {label} | {backend} | {row['median']:.3f} | {min(row['times']):.3f} | {row['setup']:.1f} | {row['mb']:.0f} |")
    return "\n".join(lines) + "\n", {f"{k[0]} / {k[1]}": v["median"] for k, v in rows.items()}


def targets(medians: dict, size: int) -> str:
    """The issue's two forward targets, from this run's medians."""
    def best(label: str, torch_only: bool = False) -> tuple[float, str] | None:
        found = [(t, k.split(" / ")[1]) for k, t in medians.items() if k.startswith(label + " / ")
                 and (not torch_only or k.split(" / ")[1].startswith("torch"))]
        return min(found) if found else None

    ours, base = best("LightMedSeg (ghost)"), best("plainunet")
    if ours is None:
        return ""
    lines = [f"- LightMedSeg (ghost) at 1x4x{size}^3: {ours[0]:.3f} s ({ours[1]}); target <= 0.5 s: "
             f"{'met' if ours[0] <= 0.5 else 'missed'}"]
    peer = best("MONAI UNet")
    if peer:
        lines.append(f"- vs MONAI UNet, best backend of each: {ours[0] / peer[0]:.2f}x its time ({ours[1]} {ours[0]:.3f} s / "
                     f"{peer[1]} {peer[0]:.3f} s); target <= 0.75x: {'met' if ours[0] / peer[0] <= 0.75 else 'missed'}")
    for torch_only in (False, True):
        ours, base = best("LightMedSeg (ghost)", torch_only), best("plainunet", torch_only)
        if ours and base:
            lines.append(f"- vs plainunet, {'PyTorch backends only' if torch_only else 'best backend of each'}: "
                         f"{base[0] / ours[0]:.1f}x ({base[1]} {base[0]:.2f} s / {ours[1]} {ours[0]:.3f} s); "
                         f"target >= 15x: {'met' if base[0] / ours[0] >= 15 else 'missed'}")
    return "\n".join(lines) + "\n"


FREE_CPU_THREADS = "beside a spinner at nice 0, threads as `predict` picks them"
BUSY = {"quiet": None, "beside a spinner at nice 19": 19, "beside a spinner at nice 0": 0, FREE_CPU_THREADS: 0}
"""The busy-neighbour conditions: the spinner's niceness, or no spinner. The last one runs on the
CPUs the spinner leaves free, as `lightseg predict` picks its threads (lightseg.inference.cpu_threads);
the others on --threads."""
SPIN = """\
import os, sys
os.nice(int(sys.argv[1]))
parent = os.getppid()
while os.getppid() == parent:  # ends by itself once the benchmark is gone, however it ended
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def spinner(niceness: int | None) -> Iterator[subprocess.Popen | None]:
    """One busy process (a Python spin loop at ``niceness``) for the duration of the block, yielded;
    none for ``None``. Killed on leaving the block whatever happened (Ctrl-C included), and it
    stops by itself if this process dies first (it watches its parent), so none is left behind."""
    if niceness is None:
        yield None
        return
    process = subprocess.Popen([sys.executable, "-c", SPIN, str(niceness)])
    try:
        time.sleep(0.2)  # running before the timed process starts
        yield process
    finally:
        process.kill()
        process.wait()


def busy_worker(args: argparse.Namespace) -> None:
    """LightMedSeg as ``predict`` runs it (accelerated, channels_last_3d, freed memory reused) in this
    process: ``--warmup`` forwards, then ``--repeats`` timed ones; prints their seconds and the
    thread count as JSON. With ``--free-cpu-threads``, the threads are the CPUs free while the model
    is built (at most ``--threads``), as ``predict`` counts them before a case."""
    import torch

    from lightseg.allocator import reuse_freed_memory
    from lightseg.benchmark.profile import measure_latency
    from lightseg.inference.cpu_threads import FreeCpuMeter

    torch.set_num_threads(args.threads)
    meter = FreeCpuMeter() if args.free_cpu_threads else None  # from before the model is built
    reuse_freed_memory()
    shape = (1, 4, args.size, args.size, args.size)
    run, x, _ = forward_runners("lightmedseg", {}, shape, ["torch channels_last"])["torch channels_last"]
    if meter is not None:
        time.sleep(0.3)  # a reading over at least this long, as predict's spans a case's reading and preprocessing
        torch.set_num_threads(min(args.threads, meter() or args.threads))
    threads = torch.get_num_threads()
    print(json.dumps({"seconds": measure_latency(run, x, warmup=args.warmup, repeats=args.repeats), "threads": threads}))


def run_worker(command: list[str], env: dict[str, str]) -> Any:
    """Run a worker process and return the JSON of its last stdout line; a failed worker stops the
    benchmark with its own stderr, not a bare exit status."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {' '.join(command[2:])} failed with exit status {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_table(args: argparse.Namespace) -> str:
    """LightMedSeg as ``predict`` runs it, quiet and beside one busy process (:data:`BUSY`): every
    measurement in its own fresh process (:func:`busy_worker`), the spinner a separate process
    around it (:func:`spinner`), conditions interleaved over ``--busy-rounds`` rounds; per
    condition the median over rounds of each process's median forward."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--busy-worker", "--size", str(args.size), "--threads", str(args.threads),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    medians: dict[str, list[float]] = {state: [] for state in BUSY}
    threads: dict[str, set[int]] = {state: set() for state in BUSY}
    for round_ in range(args.busy_rounds):
        for state, niceness in BUSY.items():
            print(f"busy neighbour, round {round_ + 1}/{args.busy_rounds}: {state}", file=sys.stderr, flush=True)
            with spinner(niceness):
                found = run_worker(command + (["--free-cpu-threads"] if state == FREE_CPU_THREADS else []), env)
            medians[state].append(statistics.median(found["seconds"]))
            threads[state].add(found["threads"])
    quiet = statistics.median(medians["quiet"])
    lines = [f"| LightMedSeg, torch channels_last, 1x4x{args.size}^3, at most {args.threads} threads | threads | median s "
             "| per round | vs quiet | target <= 1.5x |", "|---|---|---|---|---|---|"]
    for state, values in medians.items():
        median = statistics.median(values)
        verdict = "" if state == "quiet" else ("met" if median / quiet <= 1.5 else "missed")
        lines.append(f"| {state} | {'/'.join(map(str, sorted(threads[state])))} | {median:.3f} | "
                     f"{' '.join(f'{v:.3f}' for v in values)} | {median / quiet:.2f}x | {verdict} |")
    return "\n".join(lines) + "\n"


def scan_worker(args: argparse.Namespace) -> None:
    """One whole-scan prediction in this process; prints stage seconds, total and peak RSS as JSON."""
    from lightseg.benchmark.memory import process_peak_mb
    from lightseg.inference.pipeline import predict_folder

    if args.backend == "onnx":
        from lightseg.inference.onnx_predictor import load_onnx_predictor
        from lightseg.inference.window import StageTimer

        start = time.perf_counter()
        predictor, timer = load_onnx_predictor(args.model, threads=args.threads), StageTimer()
    else:
        import torch

        from lightseg.inference.predictor import load_predictor
        from lightseg.inference.sliding import StageTimer

        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        predictor, timer = load_predictor(args.model), StageTimer(torch.device("cpu"))
    load = time.perf_counter() - start
    predict_folder(predictor, args.images, args.out, progress=False, timer=timer)
    seconds = dict(timer.seconds)
    seconds["blending"] = seconds.pop("sliding window") - seconds["network"]
    print(json.dumps({"seconds": seconds, "total": time.perf_counter() - start - load, "load": load,
                      "peak_rss_mb": process_peak_mb()}))


def scan_table(args: argparse.Namespace) -> str:
    from lightseg.inference.export import export_run

    with tempfile.TemporaryDirectory(prefix="lightseg-speed-") as tmp:
        root = Path(tmp)
        predict_brats.build_run(root / "run", tuple(args.patch))
        predict_brats.write_scan(root / "images", tuple(args.shape))
        export_run(root / "run", root / "model.onnx")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        backends = {"torch": root / "run", "onnx": root / "model.onnx"}
        rounds: dict[str, list[Any]] = {backend: [] for backend in backends}
        for round_ in range(args.scan_rounds):
            for backend, model in backends.items():
                print(f"whole scan, round {round_ + 1}/{args.scan_rounds}: {backend}", file=sys.stderr, flush=True)
                out = root / f"out_{backend}_{round_}"
                command = [sys.executable, __file__, "--scan-worker", backend, "--model", str(model), "--images",
                           str(root / "images"), "--out", str(out), "--threads", str(args.threads)]
                rounds[backend].append(run_worker(command, env))
    header = ("| backend | " + " | ".join(STAGES) + " | total s (model load excluded) | every round's total | "
              "model load s | peak RSS MB | target: median <= 5 s |")
    lines = [header, "|" + "---|" * (len(STAGES) + 6)]
    for backend, runs in rounds.items():
        r = sorted(runs, key=lambda run: run["total"])[len(runs) // 2]  # the median round (the slower middle one)
        cells = [f"{r['seconds'].get(s, 0.0):.2f}" for s in STAGES]
        totals = " ".join(f"{run['total']:.2f}" for run in runs)
        lines.append(f"| {backend} | " + " | ".join(cells) + f" | {r['total']:.2f} | {totals} | {r['load']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {'met' if r['total'] <= 5 else 'missed'} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """Date, CPU model and vector extensions, torch and ONNX Runtime versions."""
    import datetime

    import onnxruntime
    import torch

    return (f"{datetime.date.today().isoformat()} on {cpu_description()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="registry names of MODELS to time (default: all)")
    count, side = bounded(int, (1, True, 10**6, True)), bounded(int, (16, True, 1024, True))
    parser.add_argument("--size", type=side, default=128)
    parser.add_argument("--threads", type=count, default=2)
    parser.add_argument("--warmup", type=bounded(int, (0, True, 10**6, True)), default=2)
    parser.add_argument("--repeats", type=count, default=5)
    parser.add_argument("--compile", action="store_true", help="add torch.compile (inductor) rows")
    parser.add_argument("--shape", type=side, nargs=3, default=(240, 240, 155))
    parser.add_argument("--patch", type=side, nargs=3, default=(128, 128, 128))
    parser.add_argument("--skip-scan", action="store_true", help="forward table only")
    parser.add_argument("--scan-rounds", type=count, default=3, help="interleaved rounds of the whole scan (median judged)")
    parser.add_argument("--quick", action="store_true", help="64^3 forward, 96x96x64 scan with 64^3 tiles, no docs")
    parser.add_argument("--busy-only", action="store_true", help="only the busy-neighbour part (1b); prints, no docs")
    parser.add_argument("--busy-rounds", type=count, default=3, help="interleaved rounds of the busy-neighbour part")
    parser.add_argument("--busy-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--free-cpu-threads", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scan-worker", choices=("torch", "onnx"), dest="backend", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        scan_worker(args)
        return 0
    if args.busy_worker:
        busy_worker(args)
        return 0
    if args.quick:
        args.size, args.shape, args.patch, args.warmup, args.repeats = 64, (96, 96, 64), (64, 64, 64), 1, 2
    if args.busy_only:
        print(f"Measured {machine()}, 1-minute load average {os.getloadavg()[0]:.1f} at the start ({os.cpu_count()} CPUs).\n\n"
              f"{busy_table(args)}")
        return 0
    load = os.getloadavg()[0]
    forward, medians = forward_table(args)
    busy = busy_table(args) if not args.models or "lightmedseg" in args.models else ""
    scan = "" if args.skip_scan else scan_table(args)
    from lightseg.benchmark.report import update_markdown_section
    from lightseg.io import atomic_write

    argv = " ".join(sys.argv[1:])
    text = (f"Measured {machine()} with `python benchmarks/speed.py{(' ' + argv) if argv else ''}`, "
            f"{args.threads} threads, 1-minute load average {load:.1f} at the start "
            f"({os.cpu_count()} CPUs; above about 1 the absolute times are inflated, the same-run ratios much less).\n\n"
            f"Forward, batch 1, 1x4x{args.size}^3, fp32, random weights (rounds interleaved):\n\n{forward}\n"
            f"{targets(medians, args.size)}")
    if busy:
        text += (f"\nBeside one busy process (the third target; each measurement a fresh process, the busy one "
                 f"a Python spin loop, rounds interleaved):\n\n{busy}")
    if scan:
        text += (f"\nWhole scan, `lightseg predict`, one 4x{'x'.join(map(str, args.shape))} case, tiles "
                 f"{'x'.join(map(str, args.patch))}, step 0.5, no TTA:\n\n{scan}")
    print(f"\n{text}")
    if not args.quick:
        doc = DOCS / "benchmarks.md"
        if not doc.exists():
            with atomic_write(doc, "w") as handle:
                handle.write("# Benchmarks\n\nEach section is written by the script it names; rerun it to refresh.\n")
        update_markdown_section(doc, "speed", f"## Speed (issue 9)\n\n{text}\n{NOTES}\n")
        print(f"wrote {DOCS / 'benchmarks.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
