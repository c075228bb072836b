"""The training configuration: one frozen dataclass, resolved once and written to ``config.json``.

Resolution order (later wins): the defaults below (nnU-Net's: SGD Nesterov, LR 1e-2, poly,
weight decay 3e-5, Dice + CE, deep supervision), the model's registry recipe
(``model_entry(name).recipe``), then the user's explicit arguments. ``in_channels``,
``num_classes``, ``regions`` and ``label_values`` always come from the data set; a data set with
regions trains with the region loss (one sigmoid per region, nnU-Net's region-based training)
unless a loss is named explicitly. A run folder is reproducible from ``config.json`` alone; a
resumed run keeps it, and explicit arguments that contradict it are refused (``resume_conflicts``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lightseg.data.dataset import DatasetSpec
from lightseg.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class TrainConfig:
    model: str
    in_channels: int
    num_classes: int
    patch_size: tuple[int, int, int]
    label_values: tuple[int, ...]
    regions: tuple[tuple[int, ...], ...] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    iters_per_epoch: int = 250
    batch_size: int = 2
    optimizer: str = "sgd"
    lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    schedule: str = "poly"
    warmup_epochs: int = 0
    min_lr: float = 1e-6
    grad_clip: float = 12.0
    loss: str = "dice_ce"
    deep_supervision: bool = True
    precision: str = "fp32"  # fp32 | fp16 | bf16; resolved per device when a run starts (lightseg.device)
    seed: int = 0
    val_fraction: float = 0.2
    val_patches_per_case: int = 2
    oversample_foreground: float = 1 / 3
    class_balanced: bool = False
    augment: str = "default"
    elastic: bool = False
    curriculum: str = "none"
    pgps_version: str = "v2"
    batch_memory: float = 1.0
    max_batch: int | None = None
    cache_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "TrainConfig":
        values = dict(obj)
        if "amp" in values and "precision" not in values:  # written before --precision: amp meant fp16 on CUDA
            values["precision"] = "fp16" if values.pop("amp") else "fp32"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TrainingError(f"config.json: unknown keys {unknown}; was it written by another lightseg version?")
        values["patch_size"] = tuple(values["patch_size"])
        values["label_values"] = tuple(values["label_values"])
        if values.get("regions") is not None:
            values["regions"] = tuple(tuple(r) for r in values["regions"])
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TrainingError(f"{path}: cannot read the training configuration ({exc})") from exc


TUNABLE = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "in_channels", "num_classes", "label_values", "regions"}


def resolve_config(
    model: str, spec: DatasetSpec, patch_size: tuple[int, int, int], recipe: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[TrainConfig, list[str]]:
    """Merge defaults, recipe and explicit ``overrides`` (``None`` values are ignored).

    Returns the config and the recipe keys it could not use (the trainer logs them).
    """
    ignored = sorted(k for k in recipe if k not in TUNABLE)
    values: dict[str, Any] = {k: v for k, v in recipe.items() if k in TUNABLE}
    if spec.has_regions:
        values["loss"] = "region"
    _check_known(overrides)
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.setdefault("patch_size", patch_size)
    values["patch_size"] = tuple(int(p) for p in values["patch_size"])
    config = TrainConfig(
        model=model,
        in_channels=spec.num_channels,
        num_classes=spec.num_classes,
        label_values=spec.label_values,
        regions=spec.regions if spec.has_regions else None,
        **values,
    )
    if not 0.0 <= config.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.epochs < 1 or config.iters_per_epoch < 1 or config.batch_size < 1:
        raise ConfigError("epochs, iters_per_epoch and batch_size must all be >= 1")
    return config, ignored


def resume_conflicts(stored: TrainConfig, explicit: Mapping[str, Any]) -> list[str]:
    """The explicit options (``None`` = not given) that differ from a resumed run's config, as ``name=value (stored: ...)``.

    No option is safe to change mid-run: the LR schedule and the PGPS stages are functions of
    ``epochs``, sampling of the seed, batch and patch, so a changed value would give a run that is
    neither the stored one nor a fresh one (docs/training.md). ``model`` counts too; values are
    compared as ``config.json`` stores them (tuples as lists).
    """
    given = {k: v for k, v in explicit.items() if v is not None}
    _check_known({k: v for k, v in given.items() if k != "model"})
    stored_json = _as_json(stored.to_json())
    return [f"{k}={_as_json(v)!r} (stored: {stored_json[k]!r})" for k, v in given.items() if _as_json(v) != stored_json[k]]


def _check_known(options: Mapping[str, Any]) -> None:
    unknown = sorted(k for k in options if k not in TUNABLE)
    if unknown:
        raise ConfigError(f"unknown training options {unknown}; valid ones: {', '.join(sorted(TUNABLE))}")


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))
