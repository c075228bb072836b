"""Fixtures of the reliability suite: one tiny two-channel data set, its cache and a trained run.

The volumes (12^3) are smaller than the training patch (16^3), so every test that uses the run
also exercises padding in training, validation and prediction.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lightseg.data import make_synthetic_dataset

from .helpers import cli

TINY_MODEL = ("--model", "lunet", "--model-kwargs", '{"width": 2, "levels": 2}')
TINY_TRAIN = (*TINY_MODEL, "--epochs", "1", "--iters-per-epoch", "1", "--batch", "1", "--patch", "16", "16", "16",
              "--workers", "0", "--device", "cpu")


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> dict[str, Path]:
    """``raw`` (3 cases, 2 channels, 12^3, plus 2 test cases), ``cache`` and the trained ``run``."""
    root = tmp_path_factory.mktemp("base")
    raw = make_synthetic_dataset(root / "raw", num_cases=3, num_test=2, shape=(12, 12, 12), num_channels=2)
    code, err = cli("preprocess", raw, "-o", root / "cache", "--workers", "1")
    assert code == 0, err
    code, err = cli("train", root / "cache", "-o", root / "run", *TINY_TRAIN)
    assert code == 0, err
    return {"raw": raw, "cache": root / "cache", "run": root / "run", "images": raw / "imagesTs"}


@pytest.fixture
def raw_copy(base, tmp_path) -> Path:
    return Path(shutil.copytree(base["raw"], tmp_path / "raw"))


@pytest.fixture
def run_copy(base, tmp_path) -> Path:
    return Path(shutil.copytree(base["run"], tmp_path / "run"))
