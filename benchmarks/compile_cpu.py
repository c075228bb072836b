"""``torch.compile`` (inductor) against eager PyTorch for LightMedSeg on the CPU, one run.

Both run in ``channels_last_3d``, batch 1, fp32, random weights, ``--threads`` threads; rounds
are interleaved so background load hits both alike. ``--freeze`` turns on inductor's weight
freezing (constant-folds the weights and lets oneDNN prepack the convolutions and fuse their
activations), which is where the CPU gain comes from. Prints the compile time (the first call),
the largest output difference and the median forward time of each, with the ratio.

    python benchmarks/compile_cpu.py --size 64 --freeze      # minutes: compiling is the slow part

Not part of ``lightseg predict``: on 2 cores the compilation costs many minutes per tile shape
(docs/benchmarks.md), more than it saves on a handful of scans.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="cubic input side (default 64)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--freeze", action="store_true", help="inductor weight freezing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from torch._inductor import config as inductor_config

    from lightseg.models import create_model

    torch.set_num_threads(args.threads)
    inductor_config.freezing = args.freeze
    torch.manual_seed(0)
    layout = torch.channels_last_3d
    model = create_model("lightmedseg", args.channels, 4).eval().to(memory_format=layout)
    x = torch.randn(1, args.channels, args.size, args.size, args.size).contiguous(memory_format=layout)
    with torch.no_grad():
        reference = model(x)
        start = time.perf_counter()
        compiled = torch.compile(model)
        difference = (compiled(x) - reference).abs().max().item()
        compile_s = time.perf_counter() - start
        eager, fast = [], []
        for _ in range(args.repeats):
            for run, times in ((model, eager), (compiled, fast)):
                start = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - start)
    print(f"LightMedSeg 1x{args.channels}x{args.size}^3, {args.threads} threads, freezing {args.freeze}")
    print(f"compile (first call) {compile_s:.1f} s, max |compiled - eager| {difference:.2e}")
    print(f"eager {statistics.median(eager):.3f} s, compiled {statistics.median(fast):.3f} s, "
          f"ratio {statistics.median(eager) / statistics.median(fast):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
