"""Present profiled models: a Markdown table with a baseline ratio, a log-log plot, a doc section.

Kept apart from :mod:`lightseg.benchmark.profile` (which measures) so scripts can rebuild a
table or plot from saved rows without re-running anything.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import re
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from lightseg.benchmark.profile import Row, Shape
from lightseg.io import atomic_write, write_json


def save_rows(rows: Sequence[Row], path: str | Path) -> Path:
    """Raw rows as JSON, so a table or plot can be rebuilt (:func:`load_rows`) without re-measuring."""
    write_json(path, [asdict(r) for r in rows])
    return Path(path)


def load_rows(path: str | Path) -> list[Row]:
    return [Row.from_json(data) for data in json.loads(Path(path).read_text())]


def shape_name(shape: Shape) -> str:
    channels, *spatial = shape
    return f"{channels}x{spatial[0]}³" if len(set(spatial)) == 1 else f"{channels}x" + "x".join(map(str, spatial))


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(rows: Sequence[Row], baseline: str = "plainunet") -> str:
    """Markdown table of ``rows``; the last column is the baseline's latency over the model's.

    The baseline is the first row whose model name or label is ``baseline``; the ratio (how many
    times faster than the baseline, at the main shape) is only given when both were measured in
    the same run, which is the only place such a ratio means anything.
    """
    if not rows:
        return "_no models profiled_\n"
    shapes = rows[0].shapes
    base = next((r for r in rows if baseline in (r.model, r.label)), None)
    base_latency = base.latency_s[0] if base else None
    header = (
        ["model", "layout", "params (M)", "GMAC", "GFLOPs"]
        + [f"latency {shape_name(s)} (s)" for s in shapes]
        + [f"peak MB (forward {shape_name(shapes[0])})", "peak MB (process)", f"speed vs {baseline}"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        latency = row.latency_s[0]
        ratio = f"{base_latency / latency:.2f}x" if base_latency and latency else "n/a"
        cells = (
            [row.label, row.layout, f"{row.params / 1e6:.3f}", f"{row.gmac:.2f}", f"{row.gflops:.2f}"]
            + [_seconds(v) for v in row.latency_s]
            + [_megabytes(row.forward_mb), _megabytes(row.process_mb), ratio]
        )
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row.label}: {note}" for row in rows for note in row.notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _megabytes(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f}"


def plot_rows(rows: Sequence[Row], path: str | Path) -> Path:
    """Parameters vs main-shape latency, both on log axes, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r.params / 1e6, r.latency_s[0], r.label) for r in rows if r.latency_s[0] and r.params]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for params, latency, label in points:
        ax.scatter(params, latency, s=30)
        ax.annotate(label, (params, latency), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    first = rows[0] if rows else None
    where = f"{first.device}, {first.threads} threads" if first else ""
    ax.set_ylabel(f"forward latency {shape_name(first.shapes[0]) if first else ''} (s)")
    ax.set_title(f"Parameters vs latency ({where})")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return path


def cpu_description() -> str:
    """The CPU model and its x86 vector extensions (from /proc/cpuinfo): speed figures are
    only comparable between runs on the same CPU, so every timing names it."""
    fallback = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
    except OSError:
        return fallback
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), fallback)
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    vector = sorted({f for f in flags if f.startswith(("avx", "amx", "fma"))})
    return f"{model} ({' '.join(vector) or 'no AVX/AMX/FMA flags listed'})"


def device_description(device: str) -> str:
    """The processor that ran on ``device``: the GPU's name on CUDA, else the CPU's."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_description()


def machine_info(rows: Sequence[Row]) -> str:
    """One line saying where and when the figures were measured."""
    import torch

    processor = device_description(rows[0].device if rows else "cpu")
    threads = f", {rows[0].threads} threads" if rows else ""  # no row, no thread count measured
    today = datetime.date.today().isoformat()
    return f"{today}, {processor}{threads}, torch {torch.__version__}, Python {platform.python_version()}"


def update_markdown_section(path: str | Path, key: str, text: str) -> Path:
    """Replace the text between ``<!-- begin:key -->`` and ``<!-- end:key -->`` (appended if
    absent), so several benchmark scripts can share one page without overwriting each other."""
    path = Path(path)
    begin, end = f"<!-- begin:{key} -->", f"<!-- end:{key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    page = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    page = pattern.sub(lambda _: block, page) if pattern.search(page) else page.rstrip() + ("\n\n" if page else "") + block + "\n"
    with atomic_write(path, "w") as handle:
        handle.write(page)
    return path
