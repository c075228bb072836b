"""The training configuration: nested frozen dataclasses, resolved once and written to ``config.json``.

:class:`TrainConfig` holds one section per concern: ``model``, ``data`` (the data set's facts
and sampling), ``augment``, ``optim`` (budget, optimiser, schedule), ``loss``, ``curriculum``,
``pruning`` (PSP-Seg), ``channel_pruning`` (STAMP), ``runtime`` (precision, seed) and ``recipe``
(the named recipe the run started from, so a ``--config`` rerun re-checks what it needs of the
cache's plan: :func:`lightseg.training.recipes.check_recipe_plan`). Each field
has one *option name*, the name a ``lightseg train`` flag, a ``lightseg.train(...)`` keyword, a
recipe and an old flat ``config.json`` use for it: the field's name, prefixed by its section's
``OPTION_PREFIX``, unless its metadata names it (``model.name`` is ``model``,
``pruning.step`` is ``pruning_step``). :data:`OPTIONS` maps every option name to its place;
:meth:`TrainConfig.from_options` is the one place options become a configuration, so a new
option is one new field.

Resolution order (later wins): the defaults below (nnU-Net's: SGD Nesterov, LR 1e-2, poly,
weight decay 3e-5, Dice + CE, deep supervision), the model's registry recipe
(``model_entry(name).recipe``), a named recipe (:mod:`lightseg.training.recipes`), another
run's ``config.json`` (``--config``), then the user's explicit arguments; the last three are
merged by :func:`layer_options`. ``in_channels``, ``num_classes``, ``regions`` and
``label_values`` always come from the data set. A data set with regions (BraTS) trains on its
classes and is validated on its regions (``eval_regions``, as LightMedSeg's paper) unless
``region_training`` (or ``loss="region"``) asks for one sigmoid per region (nnU-Net's
region-based training; the ``nnunet`` recipe does). A run folder is reproducible from
``config.json`` alone; a resumed run keeps it, and explicit arguments that contradict it are
refused (``resume_conflicts``). ``config.json`` files written before the sections existed (one
flat object of option names) are read through the same table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from lightseg.bounds import bounds_of, describe, within
from lightseg.data.dataset import DatasetSpec
from lightseg.errors import ConfigError, TrainingError
from lightseg.schema import build, check_fields
from lightseg.training.recipes import RECIPES


def _named(option: str, **kwargs: Any) -> Any:
    """A field whose option name is ``option`` rather than prefix + field name."""
    return field(metadata={"option": option}, **kwargs)


class _Section:
    """A configuration section: every int and float field is checked against its option's bounds
    (:mod:`lightseg.bounds`, the table the CLI parses with) when the section is made, so a value from
    the Python API, a ``--config`` file, a recipe or a run's config.json is refused as the CLI would
    refuse it, before anything is written."""

    def __post_init__(self) -> None:
        for attribute, name, kind, axes in _numeric_fields(type(self)):
            value = getattr(self, attribute)
            if value is None:
                continue
            bounds = bounds_of(name, kind)
            if axes is None:
                items: tuple[Any, ...] | None = (value,)
            else:  # a patch size: one value per axis
                items = value if isinstance(value, tuple) and len(value) == axes else None
            if items is None or not all(_is_number(item, kind) and within(item, bounds) for item in items):
                wanted = f"{axes} values, each {describe(kind, bounds)}" if axes else describe(kind, bounds)
                raise ConfigError(f"training option {name!r} must be {wanted}, got {value!r}")


@functools.cache
def _numeric_fields(section: type) -> tuple[tuple[str, str, type, int | None], ...]:
    """``(attribute, option name, int or float, axes)`` of each numeric field of a section class,
    worked out once per class (type hints are resolved from strings)."""
    prefix = getattr(section, "OPTION_PREFIX", "")
    hints = typing.get_type_hints(section)
    found = []
    for f in dataclasses.fields(section):
        kind, axes = _number_kind(hints[f.name])
        if kind is not None:
            found.append((f.name, f.metadata.get("option", prefix + f.name), kind, axes))
    return tuple(found)


def _number_kind(hint: Any) -> tuple[type | None, int | None]:
    """``(int or float, None)`` for a field of that type or optional; ``(int, 3)`` for a
    ``tuple[int, int, int]`` (a patch size); ``(None, None)`` for anything else (labels and regions
    are checked against the data set)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    items = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(set(items)) == 1 and items[0] in (int, float):
        return items[0], len(items)
    return (hint, None) if hint in (int, float) else (None, None)


def _is_number(value: Any, kind: type) -> bool:
    """An int (not a bool), or for ``float`` an int or a float."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))


@dataclass(frozen=True)
class ModelConfig(_Section):
    OPTION_PREFIX: ClassVar[str] = "model_"
    name: str = _named("model")
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig(_Section):
    """The data set's facts (from its dataset.json), the cache, the split and patch sampling."""

    in_channels: int
    num_classes: int
    label_values: tuple[int, ...]
    patch_size: tuple[int, int, int]
    # A data set that declares regions (BraTS): region_training trains one sigmoid per region
    # (``regions`` set, loss "region", nnU-Net's way); otherwise the net trains on the classes
    # and validation scores ``eval_regions`` (LightMedSeg's way).
    regions: tuple[tuple[int, ...], ...] | None = None
    eval_regions: tuple[tuple[int, ...], ...] | None = None
    region_training: bool = False
    ignore_label: int | None = None
    cache_dir: str = ""
    fold: int | Literal["all"] | None = None
    val_fraction: float = 0.2
    val_patches_per_case: int = 2
    batch_size: int = 2
    oversample_foreground: float = 1 / 3
    class_balanced: bool = False


@dataclass(frozen=True)
class AugmentConfig(_Section):
    name: str = _named("augment", default="default")
    elastic: bool = False


@dataclass(frozen=True)
class OptimConfig(_Section):
    """The budget, the optimiser and its LR schedule."""

    epochs: int = 50
    iters_per_epoch: int = 250
    optimizer: str = "sgd"
    lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    schedule: str = "poly"
    warmup_epochs: int = 0
    min_lr: float = 1e-6
    grad_clip: float = 12.0


@dataclass(frozen=True)
class LossConfig(_Section):
    name: str = _named("loss", default="dice_ce")
    deep_supervision: bool = True


@dataclass(frozen=True)
class CurriculumConfig(_Section):
    """A patch-size curriculum (docs/pgps.md) and the caps on its batch."""

    name: str = _named("curriculum", default="none")
    pgps_version: str = "v2"
    batch_memory: float = 1.0
    max_batch: int | None = None


PRUNING_MODES = ("none", "fd", "progressive")


@dataclass(frozen=True)
class PruningConfig(_Section):
    """PSP-Seg (docs/pspseg.md, spec section 4): ``mode`` "progressive" = functional-decoupling
    loss + progressive pruning, "fd" = the loss alone; the schedule's settings, published values
    as defaults (:mod:`lightseg.training.pruning`)."""

    OPTION_PREFIX: ClassVar[str] = "pruning_"
    mode: str = _named("pruning", default="none")
    step: int = 2
    window: int = 10
    tolerance: float = 1e-3
    deadline: float = 0.4
    calibration_batches: int = 100
    min_branches: int = 1
    loss_keys: tuple[str, ...] = ("train_loss", "fd_enc", "fd_dec")


CHANNEL_RULES = ("stamp", "random-in-stamp-layer", "random-in-largest-layer")


@dataclass(frozen=True)
class ChannelPruningConfig(_Section):
    """Channel pruning of a unet/lunet (docs/lunet.md, :mod:`lightseg.training.channel_pruning`):
    ``rule`` one of :data:`CHANNEL_RULES` or "none", and its schedule."""

    OPTION_PREFIX: ClassVar[str] = "channel_pruning_"
    rule: str = _named("channel_pruning", default="none")
    channels_per_step: int = 1
    recovery_epochs: int = 1
    start_epoch: int = 1
    target_params: int | None = None
    max_steps: int | None = None
    ranking_batches: int | None = None  # None: one epoch's batches, STAMP's pass over the training data
    min_channels: int = 1
    initial_dropout: float = 0.005
    max_dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in ("none", *CHANNEL_RULES):
            raise ConfigError(f"unknown channel-pruning rule {self.rule!r}; choose one of: {', '.join(CHANNEL_RULES)}")

    @property
    def ranks(self) -> bool:
        """Whether the rule ranks channels (and so trains with targeted dropout)."""
        return self.rule != "random-in-largest-layer"


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    precision: str = "fp32"  # fp32 | fp16 | bf16; resolved per device when a run starts (lightseg.device)
    seed: int = 0


@dataclass(frozen=True)
class RecipeConfig(_Section):
    """The named recipe (:mod:`lightseg.training.recipes`) the run's values started from, ``None``
    for none. Not an override: it is set by ``--recipe``, or taken from a ``--config`` file."""

    name: str | None = _named("recipe", default=None)

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in RECIPES:  # a config.json edited by hand
            raise TrainingError(f"'name' of section 'recipe' is {self.name!r}, not a recipe lightseg knows "
                                f"({', '.join(RECIPES)}); set it to one of them or to null")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    channel_pruning: ChannelPruningConfig = field(default_factory=ChannelPruningConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "TrainConfig":
        """The configuration of flat option values (:data:`OPTIONS`; unknown names are a
        :class:`ConfigError`, sequences become the declared tuples)."""
        _check_known(options, OPTIONS)
        return build(cls, _nest(options))

    def to_options(self) -> dict[str, Any]:
        """Every value under its option name (the inverse of :meth:`from_options`)."""
        return {name: getattr(getattr(self, section), key) for name, (section, key) in OPTIONS.items()}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "TrainConfig":
        values = _from_flat(dict(obj)) if isinstance(obj, Mapping) and _is_flat(obj) else obj
        check_fields(cls, values, "config.json", TrainingError)  # each key with its type, named if wrong
        return build(cls, values)  # type: ignore[arg-type]

    @classmethod
    def read(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            return cls.from_json(_with_old_pruning_file(json.loads(path.read_text()), path.parent / OLD_PRUNING_FILE))
        except (OSError, ValueError, RecursionError, KeyError, TypeError, TrainingError) as exc:  # ValueError: not JSON, not UTF-8
            raise TrainingError(f"{path}: cannot read the training configuration ({exc})") from exc


def _section_options(name: str, section: type) -> dict[str, tuple[str, str]]:
    prefix = getattr(section, "OPTION_PREFIX", "")
    return {f.metadata.get("option", prefix + f.name): (name, f.name) for f in dataclasses.fields(section)}


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)
OPTIONS: dict[str, tuple[str, str]] = {k: v for name, section in SECTIONS.items() for k, v in _section_options(name, section).items()}
"""Option name (flag dest, ``train`` keyword, recipe key, flat config.json key) -> (section, field)."""

DATA_FIELDS = ("in_channels", "num_classes", "label_values", "regions", "eval_regions")
TUNABLE = set(OPTIONS) - {"model", "recipe", *DATA_FIELDS, "ignore_label"}


def _is_flat(obj: Mapping[str, Any]) -> bool:
    """Whether ``obj`` is a config.json written before the sections (``"model"`` was the name)."""
    return isinstance(obj.get("model"), str)


def _from_flat(values: dict[str, Any]) -> dict[str, Any]:
    """A flat config.json (option names at the top) as the nested object, older spellings included."""
    if "amp" in values and "precision" not in values:  # older runs: amp meant fp16 on CUDA
        values["precision"] = "fp16" if values.pop("amp") else "fp32"
    values.setdefault("region_training", values.get("regions") is not None)  # written before the field existed
    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise TrainingError(f"config.json: unknown keys {unknown}; was it written by another lightseg version?")
    return _nest(values)


def _nest(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat option values (all known) grouped into the sections' objects."""
    nested: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, value in options.items():
        section, key = OPTIONS[name]
        nested[section][key] = value
    return nested


OLD_PRUNING_FILE = "pruning.json"


def _with_old_pruning_file(obj: dict[str, Any], path: Path) -> dict[str, Any]:
    """Run folders written before the pruning settings moved into ``config.json`` kept them in
    ``pruning.json`` (``{"mode": ..., "config": {PruningConfig fields}}``); fold it in."""
    if not isinstance(obj, dict) or not _is_flat(obj) or "pruning" in obj or not path.is_file():
        return obj
    saved = json.loads(path.read_text())
    return {**obj, "pruning": saved["mode"], **{f"pruning_{k}": v for k, v in saved["config"].items()}}


def resolve_config(
    model: str,
    spec: DatasetSpec,
    patch_size: tuple[int, int, int],
    recipe: Mapping[str, Any],
    overrides: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
) -> tuple[TrainConfig, list[str]]:
    """Merge defaults, the model's registry ``recipe``, ``base`` (a named recipe and/or another
    run's config.json, already layered; its ``recipe`` is the name recorded) and the explicit
    ``overrides`` (``None`` values are ignored).

    Returns the config and the registry recipe keys it could not use (the trainer logs them).
    """
    ignored = sorted(k for k in recipe if k not in TUNABLE)
    _check_known(base or {}, TUNABLE | {"recipe"})
    _check_known(overrides, TUNABLE)
    values = layer_options({k: v for k, v in recipe.items() if k in TUNABLE}, base or {}, overrides)
    values.setdefault("patch_size", patch_size)
    _resolve_regions(values, spec, overrides.get("loss"))
    regions = spec.regions if spec.has_regions else None
    config = TrainConfig.from_options(dict(
        values,
        model=model,
        in_channels=spec.num_channels,
        num_classes=len(regions) if values["region_training"] else len(spec.class_values),  # type: ignore[arg-type]
        label_values=spec.class_values,
        regions=regions if values["region_training"] else None,
        eval_regions=None if values["region_training"] else regions,
        ignore_label=spec.ignore_label,
    ))
    if config.pruning.mode not in PRUNING_MODES:
        raise ConfigError(f"unknown pruning {config.pruning.mode!r}; choose one of: {', '.join(PRUNING_MODES)}")
    if config.pruning.mode != "none" and config.model.name != "pspseg":
        raise ConfigError(f"pruning {config.pruning.mode!r} is PSP-Seg's (model pspseg), not {config.model.name!r}; "
                          "drop it or use --model pspseg")
    if config.channel_pruning.rule != "none" and config.model.name not in ("unet", "lunet"):
        raise ConfigError(f"channel pruning removes channels of a unet or lunet, not {config.model.name!r}; "
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


def config_file_options(config: str | Path | TrainConfig) -> dict[str, Any]:
    """A run's ``config.json`` (or a configuration in memory) as training options (``model`` and
    ``recipe`` included), to train that run again.

    The data set's fields are left out: they always come from the data trained on.
    """
    options = (config if isinstance(config, TrainConfig) else TrainConfig.read(config)).to_options()
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
    check_options(given)
    stored_json = _as_json(stored.to_options())
    return [f"{k}={_as_json(v)!r} (stored: {stored_json[k]!r})" for k, v in given.items() if _as_json(v) != stored_json[k]]


def check_options(options: Mapping[str, Any]) -> None:
    """A :class:`ConfigError` naming every key of ``options`` that is no training option
    (``model`` and :data:`TUNABLE`), for callers that hold options before a training starts."""
    _check_known({k: v for k, v in options.items() if k != "model"}, TUNABLE)


def _check_known(options: Mapping[str, Any], known: set[str] | Mapping[str, Any]) -> None:
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise ConfigError(f"unknown training options {unknown}; valid ones: {', '.join(sorted(TUNABLE))}")


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))
