"""The environment lightseg runs in: an empty or relative ``LIGHTSEG_CACHE`` never makes it build
or load compiled code from the current folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import pytest

from lightseg.accel.native_library import native_cache_dir

from .helpers import subprocess_env


@pytest.mark.parametrize("value", ["", "relative/cache", "~/x"])
def test_an_empty_or_relative_cache_variable_falls_back_to_the_home_cache(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LIGHTSEG_CACHE", value)
    if value == "~/x":  # ~ is expanded: an absolute path under the home folder
        assert native_cache_dir() == tmp_path / "x" / "native"
        return
    with pytest.warns(RuntimeWarning, match="not an absolute path") if value else contextlib.nullcontext():
        assert native_cache_dir() == tmp_path / ".cache" / "lightseg" / "native"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the kernels are never built")
def test_the_kernels_are_never_built_in_the_current_folder(tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    env = dict(subprocess_env(), LIGHTSEG_CACHE="", HOME=str(home))
    code = "from lightseg.accel.native import library; assert library() is not None"
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert os.listdir(cwd) == []
    assert list((home / ".cache" / "lightseg" / "native").glob("kernels-*.so"))
