"""Every registered model side by side, measured in one run (issue 4's benchmark).

Parameters, GMAC and GFLOPs at 1x4x128^3, CPU forward latency at 4x128^3 and 1x64^3 (batch 1,
inference mode, median after warm-up, 2 threads), peak memory, and each model's speed against
``plainunet`` from the same run. Writes the table into its section of ``docs/benchmarks.md``,
the raw rows as JSON and a params-vs-latency plot beside it.

    python benchmarks/models.py            # the real measurement (about 10-15 min on 2 cores)
    python benchmarks/models.py --quick    # smoke test: 64^3, 1 timed run, prints only

Each model runs in a fresh subprocess (see ``lightseg.benchmark.profile``); run it on an
otherwise idle machine, since other load shows up in the latencies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightseg.benchmark.profile import LAYOUTS, benchmark_models
from lightseg.benchmark.report import format_table, machine_info, plot_rows, save_rows, update_markdown_section
from lightseg.io import atomic_write
from lightseg.models import list_models

DOCS = Path(__file__).resolve().parent.parent / "docs"

METHOD = """\
Parameters and MACs come from `lightseg.benchmark.flops` (GMAC: convolutions, linear layers
and normalisation as the papers count them; GFLOPs: `torch.utils.flop_counter`, 2 x the
conv/linear MACs, no normalisation). Latency is the median of several forwards after warm-up,
batch 1, `torch.inference_mode`, each model in a fresh process with the stated intra-op
threads, in the memory layout of the *layout* column (by default the one `lightseg predict`
runs the model in). Peak memory is the peak resident set size during the first forward at the main shape:
"forward" is the increase over the memory held before it (activations and workspace),
"process" the whole process (Python, torch, weights, input). The speed column divides
`plainunet`'s latency by the model's, both from this run."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help="registered names (default: all)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layout", choices=list(LAYOUTS), default="predict",
                        help="memory format: each model's own as `lightseg predict` runs it (default), or one for all")
    parser.add_argument("--quick", action="store_true", help="smoke test: 64^3 and 1x32^3, one timed run, no files")
    parser.add_argument("--doc", type=Path, default=None, help="Markdown page to update (default docs/benchmarks.md)")
    args = parser.parse_args(argv)

    size, small, warmup, repeats = args.size, (1, 64, 64, 64), args.warmup, args.repeats
    if args.quick:
        size, small, warmup, repeats = 64, (1, 32, 32, 32), 1, 1
    rows = benchmark_models(
        args.models or list_models(), size, args.channels, args.threads, args.device,
        extra_shapes=[small], warmup=warmup, repeats=repeats, channels_last=LAYOUTS[args.layout],
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    table = format_table(rows, baseline="plainunet")
    print(f"\n{machine_info(rows)}\n\n{table}")
    doc = args.doc or (None if args.quick else DOCS / "benchmarks.md")
    if doc is None:
        return 0
    stem = doc.with_name(doc.stem + "_models")
    plot_rows(rows, stem.with_suffix(".png"))
    save_rows(rows, stem.with_suffix(".json"))
    command = "python benchmarks/models.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    section = (
        f"## Model zoo\n\nMeasured {machine_info(rows)}, with `{command}`.\n\n{table}\n"
        f"![parameters vs latency]({stem.with_suffix('.png').name})\n\n{METHOD}\n"
    )
    if not doc.exists():
        with atomic_write(doc, "w") as handle:
            handle.write("# Benchmarks\n\nEach section is written by the script it names; rerun it to refresh.\n")
    update_markdown_section(doc, "models", section)
    print(f"wrote {doc}, {stem.with_suffix('.png')} and {stem.with_suffix('.json')}", file=sys.stderr)
    return 0 if len(rows) == len(args.models or list_models()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
