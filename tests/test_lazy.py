"""Lazy package attributes: names resolve on first use, unknown ones are an AttributeError, and
importing the packages pulls in no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightseg
import lightseg.inference

SRC = Path(__file__).resolve().parent.parent / "src"


def test_public_names_resolve_to_their_modules():
    from lightseg.inference.predictor import load_predictor
    from lightseg.training.run import train

    assert lightseg.train is train and lightseg.inference.load_predictor is load_predictor
    assert set(lightseg.__all__) >= {"train", "predict", "evaluate", "create_model"}


@pytest.mark.parametrize("package, label", [(lightseg, "lightseg"), (lightseg.inference, "lightseg.inference")])
def test_an_unknown_name_is_an_attribute_error(package, label):
    with pytest.raises(AttributeError, match=f"module '{label}' has no attribute 'nothing_here'"):
        package.nothing_here  # noqa: B018
    assert not hasattr(package, "nothing_here")


def test_importing_the_packages_imports_no_torch():
    code = ("import sys, lightseg, lightseg.inference\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)},
                          timeout=120)
    assert done.returncode == 0, done.stderr
