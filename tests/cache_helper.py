"""A preprocessed cache for the training tests, built in-process (no worker pool) by the real
``preprocess_dataset``."""

from __future__ import annotations

from pathlib import Path

from lightseg.data.preprocess import preprocess_dataset


def make_cache(raw: Path, cache: Path) -> Path:
    preprocess_dataset(raw, cache, workers=1, progress=False)
    return cache
