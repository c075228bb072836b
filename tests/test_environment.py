"""The environment variables lightseg reads: parsed strictly, a bad value a clear error before any work."""

from __future__ import annotations

import warnings

import pytest

from lightseg import cli, environment
from lightseg.errors import SettingError


@pytest.mark.parametrize("value, on", [("", True), ("1", True), ("ON", True), ("true", True), (" yes ", True),
                                       ("0", False), ("off", False), ("False", False), ("no", False)])
def test_switch_spellings(monkeypatch, value, on):
    monkeypatch.setenv("LIGHTSEG_ACCEL", value)
    assert environment.switch("LIGHTSEG_ACCEL") is on


def test_an_unset_switch_is_on(monkeypatch):
    monkeypatch.delenv("LIGHTSEG_REUSE_MEMORY", raising=False)
    assert environment.switch("LIGHTSEG_REUSE_MEMORY") is True


@pytest.mark.parametrize("value", ["2", "disable", "0ff", "-"])
def test_a_switch_that_is_not_a_switch_is_an_error(monkeypatch, value):
    monkeypatch.setenv("LIGHTSEG_NATIVE", value)
    with pytest.raises(SettingError, match=rf"LIGHTSEG_NATIVE='{value}' is not a switch.*set it to 0"):
        environment.switch("LIGHTSEG_NATIVE")


@pytest.mark.parametrize("value, threads", [(None, None), ("", None), ("3", 3), (" 2 ", 2), ("4,1", 4)])
def test_omp_threads_as_openmp_reads_it(monkeypatch, value, threads):
    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert environment.omp_threads() == threads


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", ",2"])
def test_a_bad_thread_count_is_an_error(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(SettingError, match="OMP_NUM_THREADS=.* is not a thread count"):
        environment.omp_threads()


@pytest.mark.parametrize("name, value", [("LIGHTSEG_ACCEL", "maybe"), ("OMP_NUM_THREADS", "two")])
def test_the_cli_stops_before_any_work(monkeypatch, tmp_path, capsys, name, value):
    """The check runs before the verb: nothing is read or written, one clear line, exit 1."""
    monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    code = cli.main(["predict", "-i", str(tmp_path / "no-such-input"), "-o", str(out), "-m", str(tmp_path / "no-run")])
    err = capsys.readouterr().err
    assert code == 1 and f"lightseg predict: error: {name}='{value}'" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_warnings_are_one_line_without_source(monkeypatch, capsys):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    cli._show_warnings_as("predict")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("lightseg: something to know", RuntimeWarning)
    err = capsys.readouterr().err
    assert err == "lightseg predict: warning: something to know\n"
