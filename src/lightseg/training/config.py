"""The training configuration: one frozen dataclass, resolved once and written to ``config.json``.

Resolution order (later wins): the defaults below (nnU-Net's: SGD Nesterov, LR 1e-2, poly,
weight decay 3e-5, Dice + CE, deep supervision), the model's registry recipe
(``model_entry(name).recipe``), a named recipe (:mod:`lightseg.training.recipes`), another
run's ``config.json`` (``--config``), then the user's explicit arguments; the last three are
merged by :func:`layer_options`, the one place that applies overrides. ``in_channels``,
``num_classes``, ``regions`` and ``label_values`` always come from the data set. A data set with
regions (BraTS) trains on its classes and is validated on its regions (``eval_regions``, as
LightMedSeg's paper) unless ``region_training`` (or ``loss="region"``) asks for one sigmoid per
region (nnU-Net's region-based training; the ``nnunet`` recipe does). A run folder is reproducible from ``config.json`` alone; a
resumed run keeps it, and explicit arguments that contradict it are refused (``resume_conflicts``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from lightseg.data.dataset import DatasetSpec
from lightseg.errors import ConfigError, TrainingError
from lightseg.schema import check_fields


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
    # PSP-Seg (docs/pspseg.md): "progressive" = functional-decoupling loss + progressive pruning,
    # "fd" = the loss alone; the schedule's settings, published values as defaults (PruningConfig).
    pruning: str = "none"
    pruning_step: int = 2
    pruning_window: int = 10
    pruning_tolerance: float = 1e-3
    pruning_deadline: float = 0.4
    pruning_calibration_batches: int = 100
    pruning_min_branches: int = 1
    pruning_loss_keys: tuple[str, ...] = ("train_loss", "fd_enc", "fd_dec")
    # A data set that declares regions (BraTS): region_training trains one sigmoid per region
    # (``regions`` set, loss "region", nnU-Net's way); otherwise the net trains on the classes
    # and validation scores ``eval_regions`` (LightMedSeg's way).
    region_training: bool = False
    eval_regions: tuple[tuple[int, ...], ...] | None = None
    # Channel pruning of a unet/lunet (docs/lunet.md): "stamp", "random-in-stamp-layer",
    # "random-in-largest-layer" or "none"; the schedule, defaults as ChannelPruningConfig's.
    channel_pruning: str = "none"
    channel_pruning_channels_per_step: int = 1
    channel_pruning_recovery_epochs: int = 1
    channel_pruning_start_epoch: int = 1
    channel_pruning_target_params: int | None = None
    channel_pruning_max_steps: int | None = None
    channel_pruning_ranking_batches: int | None = None
    channel_pruning_min_channels: int = 1
    channel_pruning_initial_dropout: float = 0.005
    channel_pruning_max_dropout: float = 0.1
    ignore_label: int | None = None
    fold: int | Literal["all"] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "TrainConfig":
        values = dict(obj) if isinstance(obj, Mapping) else obj
        if isinstance(values, dict) and "amp" in values and "precision" not in values:  # older runs: amp meant fp16 on CUDA
            values["precision"] = "fp16" if values.pop("amp") else "fp32"
        check_fields(cls, values, "config.json", TrainingError)  # each key with its type, named if wrong
        values["patch_size"] = tuple(values["patch_size"])
        values["label_values"] = tuple(values["label_values"])
        if "pruning_loss_keys" in values:
            values["pruning_loss_keys"] = tuple(values["pruning_loss_keys"])
        for key in ("regions", "eval_regions"):
            if values.get(key) is not None:
                values[key] = tuple(tuple(r) for r in values[key])
        values.setdefault("region_training", values.get("regions") is not None)  # written before the field existed
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            return cls.from_json(_with_old_pruning_file(json.loads(path.read_text()), path.parent / OLD_PRUNING_FILE))
        except (OSError, ValueError, RecursionError, KeyError, TypeError, TrainingError) as exc:  # ValueError: not JSON, not UTF-8
            raise TrainingError(f"{path}: cannot read the training configuration ({exc})") from exc


OLD_PRUNING_FILE = "pruning.json"
PRUNING_MODES = ("none", "fd", "progressive")


def _with_old_pruning_file(obj: dict[str, Any], path: Path) -> dict[str, Any]:
    """Run folders written before the pruning settings moved into ``config.json`` kept them in
    ``pruning.json`` (``{"mode": ..., "config": {PruningConfig fields}}``); fold it in."""
    if "pruning" in obj or not path.is_file():
        return obj
    saved = json.loads(path.read_text())
    return {**obj, "pruning": saved["mode"], **{f"pruning_{k}": v for k, v in saved["config"].items()}}


TUNABLE = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "in_channels", "num_classes", "label_values", "regions",
                                                               "eval_regions", "ignore_label"}


def resolve_config(
    model: str,
    spec: DatasetSpec,
    patch_size: tuple[int, int, int],
    recipe: Mapping[str, Any],
    overrides: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
) -> tuple[TrainConfig, list[str]]:
    """Merge defaults, the model's registry ``recipe``, ``base`` (a named recipe and/or another
    run's config.json, already layered) and the explicit ``overrides`` (``None`` values are ignored).

    Returns the config and the registry recipe keys it could not use (the trainer logs them).
    """
    ignored = sorted(k for k in recipe if k not in TUNABLE)
    _check_known(base or {})
    _check_known(overrides)
    values = layer_options({k: v for k, v in recipe.items() if k in TUNABLE}, base or {}, overrides)
    values.setdefault("patch_size", patch_size)
    values["patch_size"] = tuple(int(p) for p in values["patch_size"])
    _resolve_regions(values, spec, overrides.get("loss"))
    regions = spec.regions if spec.has_regions else None
    config = TrainConfig(
        model=model,
        in_channels=spec.num_channels,
        num_classes=len(regions) if values["region_training"] else len(spec.class_values),  # type: ignore[arg-type]
        label_values=spec.class_values,
        regions=regions if values["region_training"] else None,
        eval_regions=None if values["region_training"] else regions,
        ignore_label=spec.ignore_label,
        **values,
    )
    if not 0.0 <= config.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.epochs < 1 or config.iters_per_epoch < 1 or config.batch_size < 1:
        raise ConfigError("epochs, iters_per_epoch and batch_size must all be >= 1")
    if config.pruning not in PRUNING_MODES:
        raise ConfigError(f"unknown pruning {config.pruning!r}; choose one of: {', '.join(PRUNING_MODES)}")
    if config.pruning != "none" and config.model != "pspseg":
        raise ConfigError(f"pruning {config.pruning!r} is PSP-Seg's (model pspseg), not {config.model!r}; drop it or use --model pspseg")
    if config.channel_pruning != "none":
        from lightseg.training.channel_pruning import channel_pruning_config

        channel_pruning_config(config)  # the rule and schedule checked now, not at the first pruning step
        if config.model not in ("unet", "lunet"):
            raise ConfigError(f"channel pruning removes channels of a unet or lunet, not {config.model!r}; "
                              "drop --channel-pruning or use --model unet")
    return config, ignored


def _resolve_regions(values: dict[str, Any], spec: DatasetSpec, explicit_loss: str | None) -> None:
    """Settle ``region_training``: it means "train on the regions where the data set declares
    them" (a recipe may ask for it on any data set); ``loss="region"`` asks for it too and then
    needs regions. Stored as what happened: true only when the net really trains on regions."""
    if values.get("loss") == "region":
        if not spec.has_regions:
            raise ConfigError("the region loss needs a data set whose dataset.json declares regions (labels given as "
                              "lists, BraTS-style); train on the classes with another loss")
        values["region_training"] = True
    values["region_training"] = bool(spec.has_regions and values.get("region_training"))
    if values["region_training"]:
        if explicit_loss not in (None, "region"):
            raise ConfigError(f"region training uses the region loss (one sigmoid per region), not {explicit_loss!r}; "
                              "drop --loss or region_training")
        values["loss"] = "region"


DATA_FIELDS = ("in_channels", "num_classes", "label_values", "regions", "eval_regions")


def config_file_options(path: str | Path) -> dict[str, Any]:
    """A run's ``config.json`` as training options (``model`` included), to train that run again.

    The data set's fields are left out: they always come from the data trained on.
    """
    options = TrainConfig.read(path).to_json()
    for key in DATA_FIELDS:
        options.pop(key)
    return options


def layer_options(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge option layers, later winning (recipe < config file < explicit); ``None`` = not given.

    ``model_kwargs`` merge key by key, so ``--model-kwargs '{"mode": "sequential"}'`` on a recipe
    that sets ``{"size": "L"}`` keeps the size.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "model_kwargs" and value is not None:
                value = {**merged.get("model_kwargs", {}), **value}
            if value is not None:
                merged[key] = value
    return merged


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
