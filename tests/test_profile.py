"""Profiling helpers: latency, peak memory, the per-model subprocess, the table and the CLI verb."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from lightseg.benchmark.flops import count_parameters
from lightseg.benchmark.memory import memory_peak, memory_start, reset_peak_rss, rss_kib
from lightseg.benchmark.profile import ModelSpec, Row, measure_latency, measure_peak_memory, profile_model
from lightseg.benchmark.report import cpu_description, format_table, load_rows, plot_rows, save_rows, update_markdown_section
from lightseg.cli import main
from lightseg.errors import ModelError
from lightseg.models import create_model


class _Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + 1


class _Allocating(torch.nn.Module):
    """Touches ``megabytes`` of fresh memory during forward, then frees it."""

    def __init__(self, megabytes: int) -> None:
        super().__init__()
        self.numel = megabytes * 2**20 // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(self.numel).sum()


def _row(label: str, latency: float | None, params: int = 1000) -> Row:
    return Row(
        label=label, model=label, params=params, gmac=1.5, gflops=2.9, shapes=((4, 8, 8, 8), (1, 4, 4, 4)),
        latency_s=(latency, None), forward_mb=12.0, process_mb=300.0, device="cpu", threads=1,
    )  # fmt: skip


def test_measure_latency_runs_warmup_then_timed_forwards() -> None:
    model = _Counting()
    times = measure_latency(model, torch.zeros(1), warmup=2, repeats=3)
    assert model.calls == 5
    assert len(times) == 3 and all(t > 0 for t in times)


def test_peak_memory_sees_allocations_inside_forward() -> None:
    x = torch.zeros(1)
    small, _ = measure_peak_memory(_Allocating(1), x)
    large, process = measure_peak_memory(_Allocating(200), x)
    assert large >= 150  # 200 MB touched inside forward and freed before it returns
    assert small < large / 4
    assert process >= large


class _Cycle:
    """Garbage only the cycle collector frees: a tensor held in a reference cycle."""

    def __init__(self, megabytes: int) -> None:
        self.me = self
        self.tensor = torch.ones(megabytes * 2**20 // 4)


def test_training_memory_helpers_see_a_freed_peak_and_reset_it() -> None:
    _Cycle(300)  # earlier work's garbage, freed by the next cycle collection
    start = memory_start("cpu")
    gc.collect()  # such a collection may come inside the measured stretch
    torch.ones(100 * 2**20 // 4).sum()  # 100 MB touched, freed at once
    above, peak = memory_peak("cpu", start)
    assert above >= 80 and peak >= above
    if reset_peak_rss():  # Linux: the peak drops back to the current resident size
        current, highest = rss_kib()
        assert highest - current < 80 * 1024


def test_profile_model_in_process() -> None:
    spec = ModelSpec("lunet", {"width": 4}, label="LUnet C=4")
    row = profile_model(spec, [(2, 16, 16, 16), (1, 16, 32, 16), (1, 8, 8, 8)], num_classes=3, threads=1, warmup=0, repeats=1)
    assert row.label == "LUnet C=4" and row.model == "lunet"
    assert row.params == count_parameters(create_model("lunet", 2, 3, width=4))
    assert row.gmac > 0 and row.gflops > 0
    assert row.latency_s[0] > 0 and row.latency_s[1] > 0
    assert row.latency_s[2] is None and "1x8x8x8" in row.notes[0]  # not a multiple of 16
    assert math.isfinite(row.forward_mb) and row.process_mb > row.forward_mb
    assert row.layout == "contiguous"  # the default for profile_model: one layout for every model


def test_profile_model_takes_the_layout_predict_uses() -> None:
    """``channels_last=None`` times each model in its prediction layout and says which."""
    shapes = [(1, 16, 16, 16)]
    lean = profile_model(ModelSpec("lunet", {"width": 4}), shapes, threads=1, warmup=0, repeats=1, channels_last=None)
    plain = profile_model(ModelSpec("plainunet", {"stages": 3}), shapes, threads=1, warmup=0, repeats=1, channels_last=None)
    assert (lean.layout, plain.layout) == ("channels_last_3d", "contiguous")


def test_profile_model_builds_fixed_size_models_per_shape() -> None:
    tiny = {"feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
    row = profile_model(ModelSpec("unetr", tiny), [(1, 32, 32, 32), (1, 16, 16, 16)], threads=1, warmup=0, repeats=1)
    assert all(latency is not None for latency in row.latency_s)


def test_format_table_ratio_against_baseline() -> None:
    rows = [_row("plainunet", 2.0), _row("lunet", 0.5), _row("unetr", None)]
    table = format_table(rows, baseline="plainunet")
    lines = table.splitlines()
    assert "latency 4x8³ (s)" in lines[0] and "speed vs plainunet" in lines[0]
    assert lines[2].endswith("| 1.00x |") and lines[3].endswith("| 4.00x |") and lines[4].endswith("| n/a |")
    assert "n/a" in format_table(rows[1:], baseline="plainunet").splitlines()[2]


def test_rows_round_trip_and_plot(tmp_path) -> None:
    rows = [_row("plainunet", 2.0, params=30_000_000), _row("lunet", 0.5, params=150_000)]
    assert load_rows(save_rows(rows, tmp_path / "rows.json")) == rows
    png = plot_rows(rows, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_description_names_the_model_and_vector_flags() -> None:
    """Every timing names its CPU: the model from /proc/cpuinfo and the AVX family it has."""
    text = cpu_description()
    with open("/proc/cpuinfo") as info:
        lines = info.read().splitlines()
    model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    assert text.startswith(model)
    assert ("avx2" in text) == ("avx2" in flags)


def test_update_markdown_section_keeps_the_rest(tmp_path) -> None:
    page = tmp_path / "benchmarks.md"
    update_markdown_section(page, "models", "table one")
    page.write_text("# Benchmarks\n\nintro\n\n" + page.read_text() + "\n## Speed\n\nkept\n")
    update_markdown_section(page, "models", "table two")
    text = page.read_text()
    assert "table two" in text and "table one" not in text
    assert text.startswith("# Benchmarks") and "## Speed\n\nkept" in text
    update_markdown_section(page, "speed", "speed table")
    assert page.read_text().count("<!-- begin:") == 2


@pytest.mark.slow  # a fresh interpreter importing torch and MONAI: 10-40 s on a busy 2-core machine
def test_cli_benchmark_runs_models_in_subprocesses(tmp_path, capsys) -> None:
    outputs = [str(tmp_path / n) for n in ("table.md", "plot.png", "rows.json")]
    code = main(["benchmark", "--models", "lunet", "--size", "16", "--channels", "2", "--extra", "1x32",
                 "--threads", "1", "--warmup", "0", "--repeats", "1", "--baseline", "lunet", "--output", *outputs])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| lunet | channels_last_3d |" in printed and "| 1.00x |" in printed  # predict's layout by default
    assert ", 1 threads, torch " in printed
    (row,) = load_rows(outputs[2])
    assert row.shapes == ((2, 16, 16, 16), (1, 32, 32, 32)) and row.threads == 1 and row.layout == "channels_last_3d"
    assert all(latency is not None and latency > 0 for latency in row.latency_s)
    assert row.params == count_parameters(create_model("lunet", 2, 4))
    assert "| lunet |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "rows.json").read_text())[0]["model"] == "lunet"


def test_cli_benchmark_rejects_bad_arguments(capsys) -> None:
    assert main(["benchmark", "--models", "no_such_model"]) == 1
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["benchmark", "--output", "table.txt"])
    with pytest.raises(ModelError):
        from lightseg.benchmark.profile import benchmark_models

        benchmark_models(["no_such_model"])


def test_the_machine_line_names_no_thread_count_when_nothing_ran() -> None:
    """Every model failing printed "0 threads" as if measured."""
    from lightseg.benchmark.report import machine_info

    line = machine_info([])
    assert "threads" not in line and "torch " in line
