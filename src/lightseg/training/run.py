"""``lightseg.train(...)``: from a raw data set or a cache to a finished run folder.

Steps: join the torchrun process group (if any); preprocess a raw data set when needed (rank 0
only, the other ranks waiting outside the collective timeout,
:func:`~lightseg.training.distributed.wait_for_main`; the cache goes to ``cache`` or, by
default, ``<RUN_DIR's parent>/<data set folder>_cache`` so several runs on one data set share it,
preprocessed with what a recipe needs of the plan, :func:`_prepare_cache`); resolve the configuration (defaults, the model's
recipe, explicit arguments) or, on ``resume``, read it back from ``config.json`` and refuse
explicit arguments that differ from it (``ConfigError``; see ``resume_conflicts``); a new run's
``precision`` defaults to the device's (:func:`lightseg.device.default_precision`); write
``config.json``, ``plan.json``, ``dataset.json`` and ``splits.json``; train.

Splits are by case (:mod:`lightseg.training.splits`): fold K of nnU-Net's ``splits_final.json``
with ``fold``, a ``splits`` file given by the user, otherwise ``val_fraction`` of the cases (at
least one when the fraction is > 0 and there are two or more cases) drawn with the seed. Only
``resume`` reuses the run folder's ``splits.json``.

:func:`training_config` resolves a new run's configuration on a cache without training, by the
same code: the benchmarks' jobs hold it and train it as ``--config`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from lightseg.allocator import reuse_freed_memory
from lightseg.data.dataset import DatasetSpec, read_dataset_json
from lightseg.data.plan import load_plan
from lightseg.data.sampling import cached_cases
from lightseg.device import check_precision, default_precision, default_workers
from lightseg.errors import ConfigError, PlanError, TrainingError
from lightseg.io import (
    CACHE, RAW_DATA_SET, RUN_FOLDER, check_output_folder, check_output_kind, copy_file, folder_lock, holds,
    remove_stale_temps, write_json,
)
from lightseg.run_folder import CONFIG_FILE, DATASET_FILE, PLAN_FILE, checkpoint_path
from lightseg.training.callbacks import Callback
from lightseg.training.config import TrainConfig, config_file_options, layer_options, resolve_config, resume_conflicts
from lightseg.training.distributed import DistInfo, barrier, init_distributed, shutdown_distributed, wait_for_main
from lightseg.training.recipes import check_recipe_plan, get_recipe, plan_needs
from lightseg.training.splits import choose_split


def train(
    data: str | Path | None,
    run_dir: str | Path,
    model: str | None = None,
    *,
    recipe: str | None = None,
    config: str | Path | TrainConfig | None = None,
    model_kwargs: dict[str, Any] | None = None,
    cache: str | Path | None = None,
    epochs: int | None = None,
    iters_per_epoch: int | None = None,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
    splits: str | Path | None = None,
    num_folds: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    **options: Any,
) -> Path:
    """Train ``model`` on ``data`` (a raw nnU-Net data set or a preprocessed cache) into ``run_dir``.

    ``model`` defaults to ``lunet``. ``options`` are further
    :class:`~lightseg.training.config.TrainConfig` values under their option names
    (:data:`~lightseg.training.config.OPTIONS`: ``optimizer``, ``schedule``, ``augment``,
    ``curriculum``, ``pruning``, ``pruning_window`` ...). ``recipe`` names a paper's setting
    (:mod:`lightseg.training.recipes`, model included; its name is recorded in ``config.json``);
    ``config`` is another run's ``config.json`` (or a :class:`TrainConfig`, e.g. from
    :func:`training_config`): its values (model and recipe name included)
    replace the recipe's, and the options given here replace both; ``data`` may then be ``None``
    (its cache is used). The recorded recipe's plan needs are checked against the cache. With
    ``resume`` the run's ``config.json`` is used and any option given here (not ``None``) must
    match it, else ``ConfigError``. ``workers=None``: the device's loader worker count
    (:func:`lightseg.device.default_workers`). Returns the run folder.
    """
    from lightseg.training.parts import build_parts
    from lightseg.training.trainer import Trainer

    run_dir = Path(run_dir)
    reuse_freed_memory()  # 1.1-1.2x per CPU training step: no page faults for each step's activations
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if resume and (config is not None or recipe is not None):
        raise ConfigError(f"--config and --recipe start a new run; --resume continues {run_dir} with its own "
                          "config.json: drop them to resume, or train into a new run folder (-o)")
    base = _base_options(recipe, config)
    if data is None:
        if config is None:
            raise ConfigError("no data to train on: pass a data set or cache, or --config RUN/config.json (its cache)")
        data = base["cache_dir"]
    dist = init_distributed(device)
    workers = default_workers(device, dist.world_size) if workers is None else workers
    owner = contextlib.ExitStack()
    try:
        owner.enter_context(_own_run_folder(run_dir, dist))
        stored = _stored_config(run_dir) if resume else None
        cache_dir = _prepare_cache(Path(data), run_dir, cache, workers, stored.recipe.name if stored else base.get("recipe"))
        spec = read_dataset_json(cache_dir / "dataset.json")
        plan = load_plan(cache_dir / "plan.json").to_json()
        explicit = dict(
            options, model=model, model_kwargs=model_kwargs, epochs=epochs, iters_per_epoch=iters_per_epoch,
            batch_size=batch_size, lr=lr, seed=seed, val_fraction=val_fraction, patch_size=patch_size,
        )
        if resume:
            resolved = _resumed_config(stored, run_dir, cache_dir, explicit)  # type: ignore[arg-type]
        else:
            if checkpoint_path(run_dir, "latest").exists():
                raise TrainingError(f"{run_dir} already holds a training; pass --resume to continue it or choose another -o")
            resolved = _new_config(spec, plan, cache_dir, base, explicit, device)
        if resolved.data.fold is not None and val_fraction is not None:
            raise ConfigError("--fold takes its validation cases from the fold; drop --val-fraction")
        split = choose_split(run_dir, cache_dir, cached_cases(cache_dir), splits, resolved.data.fold, num_folds,
                             resolved.data.val_fraction, resolved.runtime.seed, resume)
        if dist.is_main:
            _write_run_files(run_dir, resolved, cache_dir, split)
        barrier()
        torch_device = torch.device(f"cuda:{dist.local_rank}" if device == "cuda" else device)
        parts = build_parts(resolved, run_dir, split, torch_device, dist, workers, callbacks)
        trainer = Trainer(resolved, run_dir, parts, split["val"], _class_names(spec), torch_device, dist, workers)
        if dist.is_main and not resume:
            trainer.log(f"training {resolved.model.name} on {len(split['train'])} cases, validating on {len(split['val'])}; "
                        f"{dist.world_size} process(es) on {device}, {trainer.precision}, {workers} loader worker(s)")
        finished = trainer.fit(resume=resume)
        barrier()  # every rank done with the last collectives before any tears the group down
        return finished
    finally:
        owner.close()
        shutdown_distributed()


def training_config(
    cache: str | Path,
    model: str | None = None,
    *,
    recipe: str | None = None,
    config: str | Path | TrainConfig | None = None,
    device: str = "cpu",
    **options: Any,
) -> TrainConfig:
    """The configuration ``train(cache, RUN, model, recipe=..., config=..., device=..., **options)``
    writes to a new run's ``config.json``, resolved by the same code without training (``cache``:
    a preprocessed cache). :class:`~lightseg.benchmark.runs.TrainJob` holds it, and
    ``train(None, RUN, config=it)`` trains it: a resolved configuration resolves to itself."""
    cache_dir = Path(cache)
    spec, plan = read_dataset_json(cache_dir / "dataset.json"), load_plan(cache_dir / "plan.json").to_json()
    return _new_config(spec, plan, cache_dir, _base_options(recipe, config), dict(options, model=model), device)


def _base_options(recipe: str | None, config: str | Path | TrainConfig | None) -> dict[str, Any]:
    """The named recipe's options, its name as ``recipe``, under another run's ``config.json``
    (recipe < config file; the flags come later). A config file holds every value, so the
    recipe name recorded is the file's (``None`` if it had none), whose plan needs are then checked."""
    named = {**get_recipe(recipe).options, "recipe": recipe} if recipe else {}
    if config is None:
        return named
    stored = config_file_options(config)
    return {**layer_options(named, stored), "recipe": stored["recipe"]}


def _own_run_folder(run_dir: Path, dist: DistInfo) -> contextlib.AbstractContextManager[Any]:
    """One process owns a run folder for a whole training, ``--resume`` included: a second
    ``train`` into it is refused naming the holder (it would mix configs, splits and checkpoints).
    The other ranks of a torchrun job work under their main rank's lock."""
    check_output_folder(run_dir)
    check_output_kind(run_dir, RUN_FOLDER, "the run's files")
    return folder_lock(run_dir, "this run folder for a training") if dist.is_main else contextlib.nullcontext()


def _prepare_cache(data: Path, run_dir: Path, cache: str | Path | None, workers: int, recipe: str | None) -> Path:
    """The cache to train on: ``data`` if it is one (a plan the recipe cannot use is refused
    later, with the command that makes one), else the raw data set ``data`` preprocessed into
    ``cache`` with what ``recipe`` needs of the plan (:func:`~lightseg.training.recipes.plan_needs`,
    e.g. the percentile normalisation). The default cache, ``<RUN_DIR's parent>/<data set>_cache``,
    then carries the needed values in its name (``..._cache-percentile``), so it neither replaces
    nor reuses the shared one; an existing cache planned otherwise is refused before any work."""
    from lightseg.data.preprocess import check_cache, preprocess_dataset

    if holds(data, CACHE):
        check_cache(data)
        return data
    if holds(data, RUN_FOLDER) and not holds(data, RAW_DATA_SET):  # a run folder holds a dataset.json too
        raise PlanError(f"{data}: is a run folder (what `lightseg train -o` writes), not a data set or a cache; pass "
                        f"the data set or cache to train on, and {data} as -o with --resume to continue that run")
    if not (data / "dataset.json").is_file():
        raise PlanError(f"{data}: neither a preprocessed cache (plan.json + cases/) nor a raw data set (dataset.json)")
    needs = plan_needs(recipe)
    default = run_dir.resolve().parent / f"{data.resolve().name}_cache{''.join(f'-{v}' for v in needs.values())}"
    cache_dir = Path(cache) if cache else default
    if needs and (cache_dir / "plan.json").is_file():
        check_recipe_plan(recipe, load_plan(cache_dir / "plan.json").to_json(), cache_dir,
                          advice=f"pass `--cache NEW_FOLDER` and training preprocesses {data} with it there")
    wait_for_main(lambda: preprocess_dataset(data, cache_dir, workers=max(1, workers), **needs))
    return cache_dir


def _class_names(spec: DatasetSpec) -> list[str]:
    """Foreground class (or region) names in output-channel order."""
    if spec.has_regions:
        return [n for n, v in spec.labels.items() if v != (0,) and v != 0 and v != spec.ignore_label]
    by_value = {v: n for n, v in spec.labels.items()}
    return [by_value[v] for v in spec.class_values if v != 0]


def _resolve_patch(requested: Sequence[int] | None, plan: dict[str, Any], model: Any) -> tuple[int, int, int]:
    """The training patch: the requested one (``--patch``, a recipe, a ``--config`` file), or
    the plan's rounded down to the model's divisibility (at least one step per axis). Axis
    order: the cache's, as every ``--patch``. :func:`_new_config` checks it with the batch."""
    if requested is not None:
        return tuple(int(p) for p in requested)  # type: ignore[return-value]
    if "patch_size" not in plan:
        raise PlanError("plan.json has no 'patch_size'; pass --patch X Y Z")
    return tuple(max(d, (int(p) // d) * d) for p, d in zip(plan["patch_size"], model.size_divisor))  # type: ignore[return-value]


def _new_config(
    spec: DatasetSpec, plan: dict[str, Any], cache_dir: Path, base: dict[str, Any], explicit: dict[str, Any], device: str
) -> TrainConfig:
    """A new run's configuration: ``base`` (recipe < config file) under the ``explicit`` options
    (``model`` among them; ``None`` = not given), the precision the device's by default."""
    from lightseg.models import check_input_size, create_model, model_entry

    check_recipe_plan(base.get("recipe"), plan, cache_dir)
    base, overrides = dict(base), dict(explicit)
    base_model = base.pop("model", None)
    model = overrides.pop("model", None) or base_model or "lunet"
    precision = overrides.get("precision") or base.get("precision") or default_precision(device)
    check_precision(precision, device)
    overrides.update(precision=precision, cache_dir=str(cache_dir.resolve()))
    entry = model_entry(model)
    given = layer_options(base, overrides)
    probe = create_model(model, spec.num_channels, spec.num_classes, **given.get("model_kwargs", {}))
    patch = _resolve_patch(given.get("patch_size"), plan, probe)
    config, ignored = resolve_config(model, spec, patch, entry.recipe, {**overrides, "patch_size": patch}, base)
    # before anything is written: the model's size rule, with the batch (a ModelError names a legal size)
    check_input_size(probe, patch, training_batch=config.data.batch_size)
    if ignored:
        print(f"lightseg train: recipe keys {ignored} of model {model!r} are not training options; ignored")
    return config


def _stored_config(run_dir: Path) -> TrainConfig:
    """The configuration of the run to resume (read before its cache is prepared: its recipe may need a plan)."""
    path = run_dir / CONFIG_FILE
    if not checkpoint_path(run_dir, "latest").is_file() or not path.is_file():
        raise TrainingError(f"{run_dir}: nothing to resume (no config.json + checkpoint_latest.pth); train without --resume")
    return TrainConfig.read(path)


def _resumed_config(config: TrainConfig, run_dir: Path, cache_dir: Path, explicit: dict[str, Any]) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    conflicts = resume_conflicts(config, explicit)
    if conflicts:
        raise ConfigError(f"{path}: --resume continues the stored configuration, but these options differ from it: "
                          f"{'; '.join(conflicts)}. Drop them to resume as stored, or train into a new run folder (-o).")
    if not Path(config.data.cache_dir).is_dir():
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, cache_dir=str(cache_dir.resolve())))
    return config


def _write_run_files(run_dir: Path, config: TrainConfig, cache_dir: Path, split: dict[str, list[str]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # Half-written temp files of a killed process (atomic_write), whether this run resumes it or,
    # killed before its first checkpoint, starts over in the same folder.
    remove_stale_temps(run_dir)
    write_json(run_dir / CONFIG_FILE, config.to_json())
    write_json(run_dir / "splits.json", split)
    for name in (PLAN_FILE, DATASET_FILE):
        if os.path.abspath(cache_dir / name) != os.path.abspath(run_dir / name):
            copy_file(cache_dir / name, run_dir / name)
