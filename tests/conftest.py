"""Shared fixtures. Tests use tiny volumes and one torch thread per xdist worker."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def synthetic_dataset(tmp_path):
    """A 4-case, 1-channel, 3-class ellipsoid data set in nnU-Net v2 layout."""
    from lightseg.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path / "Dataset001_Synthetic", num_cases=4, shape=(24, 24, 24))
