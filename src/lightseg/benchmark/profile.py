"""Profile registered models: parameters, MACs, forward latency and peak memory.

``benchmark_models`` runs every model in a fresh subprocess (``python -m
lightseg.benchmark.profile SPEC``), so one model's allocator state, oneDNN caches or thread
pool never colour the next one's figures, and the process's peak memory belongs to that model
alone. The same code backs ``benchmarks/models.py`` and ``lightseg benchmark``.

How each figure is measured (also in ``docs/benchmarks.md``):

* parameters and MACs: :mod:`lightseg.benchmark.flops` at batch 1 and the main shape;
  ``gmac`` is the papers' convention (conv/linear + normalisation), ``gflops`` is what
  ``FlopCounterMode`` reports (2 x conv/linear MAC).
* latency: batch 1, ``torch.inference_mode``, eval mode, ``warmup`` untimed forwards then the
  median of ``repeats`` timed ones; the subprocess runs with ``threads`` intra-op threads
  (``torch.set_num_threads`` and ``OMP_NUM_THREADS``), reusing freed memory as ``lightseg
  predict`` does (:mod:`lightseg.allocator`). On CUDA each run is synchronised.
* peak memory (:mod:`lightseg.benchmark.memory`), CPU: the peak resident set size
  (``VmHWM``), reset just before the first forward at the main shape. ``forward_mb`` is that
  peak minus the RSS before the forward (activations and workspace); ``process_mb`` is the
  whole process's peak (interpreter, torch, weights, input included). Where ``/proc`` is
  missing, ``resource.getrusage`` gives the never-reset peak instead. On CUDA:
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the forward, and the
  absolute maximum.
* A model whose input size is fixed by construction (its builder takes ``img_size``, e.g.
  UNETR) is built for each measured shape; a shape a model cannot take gets no latency.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lightseg.allocator import reuse_freed_memory
from lightseg.benchmark.memory import memory_peak, memory_start

Shape = tuple[int, int, int, int]  # (channels, X, Y, Z); batch is always 1

# ``--layout`` choices and the ``channels_last`` argument each stands for: "predict" gives each
# model the layout ``lightseg predict`` runs it in, so a benchmark times what users get.
LAYOUTS: dict[str, bool | None] = {"predict": None, "contiguous": False, "channels_last": True}


@dataclass(frozen=True)
class ModelSpec:
    """A model to profile: registry name, builder arguments and the label shown in tables."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Row:
    """One model's figures. Latencies are medians in seconds, ``None`` where not measured."""

    label: str
    model: str
    params: int
    gmac: float
    gflops: float
    shapes: tuple[Shape, ...]
    latency_s: tuple[float | None, ...]
    forward_mb: float
    process_mb: float
    device: str
    threads: int
    notes: tuple[str, ...] = ()
    layout: str = "contiguous"  # the memory format it ran in: "contiguous" or "channels_last_3d"

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "Row":
        data = dict(data)
        data["shapes"] = tuple(tuple(s) for s in data["shapes"])
        data["latency_s"] = tuple(data["latency_s"])
        data["notes"] = tuple(data["notes"])
        return Row(**data)


def measure_peak_memory(model: Any, x: Any) -> tuple[float, float]:
    """(forward MB, process MB) of one inference forward (:mod:`lightseg.benchmark.memory`)."""
    import torch

    start = memory_start(x.device.type)
    with torch.inference_mode():
        model(x)
    return memory_peak(x.device.type, start)


def measure_latency(model: Any, x: Any, warmup: int = 2, repeats: int = 5) -> list[float]:
    """Wall-clock seconds of ``repeats`` inference forwards after ``warmup`` untimed ones."""
    import torch

    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def _build(spec: ModelSpec, shape: Shape, num_classes: int) -> Any:
    """Build ``spec`` for ``shape``'s channels (and size, when the builder takes ``img_size``)."""
    from lightseg.models import create_model, model_entry

    kwargs = dict(spec.kwargs)
    if "img_size" in inspect.signature(model_entry(spec.name).builder).parameters and "img_size" not in kwargs:
        kwargs["img_size"] = tuple(shape[1:])
    return create_model(spec.name, shape[0], num_classes, **kwargs).eval()


def profile_model(
    spec: ModelSpec,
    shapes: Sequence[Shape],
    num_classes: int = 4,
    threads: int = 2,
    device: str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    channels_last: bool | None = False,
) -> Row:
    """Profile one model in this process (``benchmark_models`` calls it in a fresh subprocess).

    ``shapes[0]`` is the main shape: MACs and peak memory are taken there. ``channels_last``:
    run in ``channels_last_3d`` (True), contiguous (False), or in the layout ``lightseg predict``
    gives the model on that device (None, :func:`lightseg.device.prefers_channels_last`).
    """
    import torch

    from lightseg.benchmark.flops import count_macs, count_parameters
    from lightseg.errors import ModelError
    from lightseg.accel import accelerate
    from lightseg.device import prefers_channels_last
    from lightseg.models import check_input_size

    torch.set_num_threads(threads)
    reuse_freed_memory()  # as `lightseg predict` runs
    latencies: list[float | None] = []
    notes: list[str] = []
    params, macs, forward_mb, process_mb, layout_name = 0, None, float("nan"), float("nan"), "contiguous"
    for index, shape in enumerate(shapes):
        torch.manual_seed(0)
        model = _build(spec, shape, num_classes)
        if index == 0:  # on the plain model: the network as its paper specifies it
            params, macs = count_parameters(model), count_macs(model, (1, *shape))
        model = accelerate(model, device)  # timed as `lightseg predict` runs it (lightseg.accel)
        in_channels_last = prefers_channels_last(model, device) if channels_last is None else channels_last
        layout = torch.channels_last_3d if in_channels_last else torch.contiguous_format
        if index == 0:
            layout_name = "channels_last_3d" if in_channels_last else "contiguous"
        model = model.to(device=device, memory_format=layout)
        x = torch.randn(1, *shape, device=device).contiguous(memory_format=layout)
        try:
            check_input_size(model, shape[1:])
            if index == 0:
                forward_mb, process_mb = measure_peak_memory(model, x)
            latencies.append(statistics.median(measure_latency(model, x, warmup, repeats)))
        except (ModelError, ValueError, RuntimeError) as exc:
            if index == 0:
                raise  # no figures without the main shape
            latencies.append(None)  # e.g. too small for the model: keep the other shapes' figures
            notes.append(f"no latency at {'x'.join(map(str, shape))}: {exc}")
        del model, x
    assert macs is not None
    return Row(
        label=spec.title,
        model=spec.name,
        params=params,
        gmac=macs.total_paper / 1e9,
        gflops=macs.flop_counter_flops / 1e9,
        shapes=tuple(tuple(s) for s in shapes),  # type: ignore[misc]
        latency_s=tuple(latencies),
        forward_mb=forward_mb,
        process_mb=process_mb,
        device=device,
        threads=threads,
        notes=tuple(notes),
        layout=layout_name,
    )


def benchmark_models(
    models: Sequence[str | ModelSpec],
    size: int = 128,
    channels: int = 4,
    threads: int = 2,
    device: str = "cpu",
    *,
    extra_shapes: Sequence[Shape] = ((1, 64, 64, 64),),
    num_classes: int = 4,
    warmup: int = 2,
    repeats: int = 5,
    channels_last: bool | None = False,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Profile each model in its own subprocess; the main shape is ``channels x size^3``
    (``channels_last``: see :func:`profile_model`).

    A model whose subprocess fails is reported through ``progress`` and left out, so one broken
    model does not cost the figures of the others.
    """
    from lightseg.models import model_entry

    specs = [m if isinstance(m, ModelSpec) else ModelSpec(m) for m in models]
    for spec in specs:
        model_entry(spec.name)  # an unknown name is a ModelError before any work starts
    shapes = [(channels, size, size, size), *extra_shapes]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    rows = []
    for i, spec in enumerate(specs, 1):
        job = dict(
            spec=asdict(spec), shapes=shapes, num_classes=num_classes, threads=threads, device=device,
            warmup=warmup, repeats=repeats, channels_last=channels_last,
        )  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "lightseg.benchmark.profile", json.dumps(job)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            if progress:
                progress(f"[{i}/{len(specs)}] {spec.title}: failed ({reason})")
            continue
        row = Row.from_json(json.loads(done.stdout.strip().splitlines()[-1]))
        rows.append(row)
        if progress:
            latency = row.latency_s[0]
            shown = f"{latency:.3f} s" if latency is not None else "n/a"
            progress(f"[{i}/{len(specs)}] {spec.title}: {row.params / 1e6:.2f} M params, {row.gmac:.1f} GMAC, {shown}")
    return rows


def _main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    spec = ModelSpec(job["spec"]["name"], job["spec"]["kwargs"], job["spec"]["label"])
    shapes = [tuple(s) for s in job["shapes"]]
    row = profile_model(
        spec, shapes, job["num_classes"], job["threads"], job["device"], job["warmup"], job["repeats"], job["channels_last"]
    )
    print(json.dumps(asdict(row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
