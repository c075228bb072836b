"""Which cases a run trains and validates on: nnU-Net's cross-validation folds, a user's split file,
or a seeded hold-out fraction.

* ``fold`` (0..N-1): fold ``K`` of ``splits_final.json``, nnU-Net v2's file: a list of N
  ``{"train": [...], "val": [...]}``. A user's file (``--splits``) is read as it is; otherwise
  the cache's ``splits_final.json`` is used, and written first when absent, made the way nnU-Net
  makes it (:func:`crossval_splits`), so both tools train fold K on the same cases.
* ``fold="all"``: every case trains, none validates (nnU-Net's ``all`` fold).
* otherwise a ``{"train": [...], "val": [...]}`` file, or ``val_fraction`` of the cases drawn
  with the seed.

A fresh start always derives its split from these inputs, never from a ``splits.json`` a failed
earlier start left in the run folder; only ``--resume`` reuses the stored one. Every split is
checked: its cases are in the cache, the training list is not empty and no case is in both lists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lightseg.errors import ConfigError, TrainingError
from lightseg.io import write_json

NNUNET_SEED = 12345  # nnU-Net v2's seed for its 5-fold split (generate_crossval_split)
SPLITS_FILE = "splits_final.json"
Split = dict[str, list[str]]


def crossval_splits(cases: Sequence[str], num_folds: int = 5, seed: int = NNUNET_SEED) -> list[Split]:
    """nnU-Net v2's split: scikit-learn ``KFold(num_folds, shuffle=True, random_state=seed)`` over the sorted names.

    KFold shuffles ``arange(n)`` with ``RandomState(seed).shuffle``, cuts the shuffled order into
    ``num_folds`` consecutive parts (the first ``n % num_folds`` one longer) and returns each
    part's and the rest's indices in ascending order; reproduced here with NumPy alone, so
    scikit-learn is no dependency (``tests/test_splits.py`` compares both).
    """
    names = sorted(cases)
    if not 2 <= num_folds <= len(names):
        raise ConfigError(f"--num-folds {num_folds}: needs 2 <= folds <= the number of cases ({len(names)})")
    order = np.arange(len(names))
    np.random.RandomState(seed).shuffle(order)
    sizes = [len(names) // num_folds + (1 if k < len(names) % num_folds else 0) for k in range(num_folds)]
    bounds = np.cumsum([0, *sizes])
    splits = []
    for k in range(num_folds):
        val = set(order[bounds[k] : bounds[k + 1]].tolist())
        splits.append({"train": [n for i, n in enumerate(names) if i not in val],
                       "val": [n for i, n in enumerate(names) if i in val]})
    return splits


def choose_split(
    run_dir: Path, cache_dir: Path, cases: Sequence[str], user: str | Path | None, fold: int | str | None,
    num_folds: int | None, val_fraction: float, seed: int, resume: bool,
) -> Split:
    """The run's split (see the module docstring); every problem is a ConfigError or TrainingError naming the file."""
    stored = run_dir / "splits.json"
    if resume and stored.is_file():
        split = as_split(read_json(stored), stored)
        if user and fold is None and split != as_split(read_json(Path(user)), Path(user)):
            raise ConfigError(f"{user}: --resume keeps the run's {stored}, but this --splits file differs from it; "
                              "drop --splits to resume as stored, or train into a new run folder (-o)")
        return check_split(split, cases, stored, cache_dir)
    if fold is not None:
        return check_split(fold_split(cache_dir, cases, user, fold, num_folds), cases, Path(user or cache_dir / SPLITS_FILE), cache_dir)
    if num_folds is not None:
        raise ConfigError("--num-folds needs --fold K (or --fold all)")
    if user:
        obj = read_json(Path(user))
        if isinstance(obj, list):
            raise ConfigError(f"{user}: holds {len(obj)} cross-validation folds (nnU-Net's splits_final.json); "
                              f"pick one with --fold 0..{len(obj) - 1}")
        return check_split(as_split(obj, Path(user)), cases, Path(user), cache_dir)
    order = list(np.random.default_rng(seed).permutation(len(cases)))
    n_val = 0 if val_fraction == 0 or len(cases) < 2 else max(1, round(val_fraction * len(cases)))
    val = sorted(cases[i] for i in order[:n_val])
    return {"train": [c for c in cases if c not in val], "val": val}


def fold_split(cache_dir: Path, cases: Sequence[str], user: str | Path | None, fold: int | str, num_folds: int | None) -> Split:
    """Fold ``fold`` of the user's or the cache's ``splits_final.json`` (written when absent), or every case for ``"all"``."""
    if fold == "all":
        return {"train": sorted(cases), "val": []}
    path = Path(user) if user else cache_dir / SPLITS_FILE
    if path.is_file():
        obj = read_json(path)
        if not isinstance(obj, list) or not obj:
            raise ConfigError(f"{path}: --fold needs a list of folds [{{\"train\": [...], \"val\": [...]}}, ...] "
                              "(nnU-Net's splits_final.json)")
        folds = [as_split(entry, path) for entry in obj]
        unused = sorted(set(cases) - {c for f in folds for c in f["train"] + f["val"]})
        if unused:
            print(f"lightseg train: warning: {len(unused)} cases of the cache are in no fold of {path} and are not used "
                  f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})", file=sys.stderr)
        if num_folds is not None and num_folds != len(folds):
            raise ConfigError(f"{path}: holds {len(folds)} folds, not --num-folds {num_folds}; drop --num-folds, "
                              f"or delete {path} to make a new {num_folds}-fold split")
    else:
        folds = crossval_splits(cases, num_folds or 5)
        write_json(path, folds)
    if not isinstance(fold, int) or not 0 <= fold < len(folds):
        raise ConfigError(f"--fold {fold}: {path} has folds 0..{len(folds) - 1} (or use --fold all)")
    return folds[fold]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path}: cannot read the splits file ({exc}); fix or remove it") from exc


def as_split(obj: Any, path: Path) -> Split:
    """``{"train": [...], "val": [...]}`` with string case names, else a TrainingError naming ``path``."""
    if (not isinstance(obj, dict) or not isinstance(obj.get("train"), list) or not isinstance(obj.get("val"), list)
            or not all(isinstance(n, str) for n in obj["train"] + obj["val"])):
        raise TrainingError(f"{path}: a split must be {{\"train\": [case names], \"val\": [case names]}}")
    return {"train": list(obj["train"]), "val": list(obj["val"])}


def check_split(split: Split, cases: Sequence[str], source: Path, cache_dir: Path) -> Split:
    """Refuse unknown cases, an empty training list, and a case in both lists (it would validate on training data)."""
    both = sorted(set(split["train"]) & set(split["val"]))
    if both:
        raise TrainingError(f"{source}: cases {both[:5]} are in both 'train' and 'val', so validation would score "
                            "training cases; list each case once")
    missing = sorted(set(split["train"] + split["val"]) - set(cases))
    if missing:
        raise TrainingError(f"{source}: cases {missing[:5]} are not in the cache {cache_dir}; fix the splits file "
                            f"(one lightseg wrote, {cache_dir / SPLITS_FILE}, may be deleted: the next --fold makes it again)")
    if not split["train"]:
        raise TrainingError(f"{source}: no training cases")
    return split
