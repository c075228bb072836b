"""Cross-validation results, as nnU-Net reports them: each fold's validation predictions, merged,
scored, and the best model or two-model ensemble picked (``nnUNetv2_find_best_configuration``).

* After training, every validation case is kept in ``RUN/validation/``: ``{case}{file_ending}``
  (uint8 labels on the case's original grid, from the cache's recorded geometry) and
  ``{case}.npz`` (float16 ``probabilities`` on the same grid, as ``predict --save-probabilities``).
* :func:`merge_folds` copies the folds' predictions into one folder, refusing a case predicted by
  two folds, and scores it with :func:`lightseg.evaluation.evaluate`: the folds together score
  every case once (``lightseg crossval``).
* :func:`find_best` does that per model, adds every two-model ensemble (mean of the probabilities,
  then labels as ``predict`` makes them) and writes ``find_best.json`` and ``find_best.md``
  naming the best by foreground-mean Dice (``lightseg find-best``).
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from lightseg.data.dataset import DatasetSpec, read_dataset_json
from lightseg.errors import EvaluationError, OutputError
from lightseg.io import atomic_write, check_output_folder, check_output_kind, copy_file, save_nifti, write_json
from lightseg.run_folder import DATASET_FILE, read_config

VALIDATION = "validation"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A model's name in ``find_best``: a plain folder name without '+', which joins an ensemble's members."""


def save_validation_case(run_dir: Path, config: Any, name: str, logits: np.ndarray) -> None:
    """Write one validation case's labels and probabilities on its original grid into ``RUN/validation``."""
    from lightseg.data.preprocess import load_case_properties
    from lightseg.inference.pipeline import restore_prediction

    spec = read_dataset_json(run_dir / DATASET_FILE)
    props = load_case_properties(config.data.cache_dir, name)
    order = spec.regions_class_order if config.data.regions is not None else None
    labels, probs = restore_prediction(logits, props, config.data.label_values, order, True)  # as prediction restores
    out = run_dir / VALIDATION
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{name}.npz", "wb") as handle:
        np.savez(handle, probabilities=probs.astype(np.float16))
    save_nifti(out / f"{name}{spec.file_ending}", labels, nib.Nifti1Image(labels, np.asarray(props.original_affine)))


def _run_spec(run: Path) -> DatasetSpec:
    if not (run / VALIDATION).is_dir():
        raise EvaluationError(f"{run}: no {VALIDATION}/ folder; train with validation cases (--fold K) first")
    return read_dataset_json(run / DATASET_FILE)


def _check_output(out_dir: str | Path, labels_dir: str | Path, runs: Sequence[str | Path]) -> Path:
    """``out_dir`` as a folder to write merged predictions into, never one of the inputs: merged
    into the ground-truth folder they would replace the labels they are scored against (and score
    1.0), into a fold's ``validation/`` they would be copied onto themselves."""
    out = check_output_folder(out_dir)
    check_output_kind(out, None, "the merged predictions")
    inputs = [(Path(labels_dir), "the ground-truth folder")]
    inputs += [(Path(run) / VALIDATION, "a fold's folder") for run in runs]  # a run folder itself is refused by its kind
    for folder, what in inputs:
        if out.is_dir() and folder.is_dir() and os.path.samefile(out, folder):
            raise OutputError(f"{out}: is {what} {folder}; the merged predictions would overwrite its files there; "
                              "choose a new folder (it is created)")
    return out


def merge_folds(labels_dir: str | Path, runs: Sequence[str | Path], out_dir: str | Path, num_workers: int = 2) -> dict[str, Any]:
    """Gather the runs' validation predictions into ``out_dir`` and evaluate them against ``labels_dir``.

    Returns the summary (also ``out_dir/summary.json``). A case in two runs' validation is an
    :class:`EvaluationError`: folds of one cross-validation never share a validation case. The
    output may not be an input folder (:func:`_check_output`), and its files are written whole,
    never through a link.
    """
    from lightseg.evaluation.report import evaluate

    runs = [Path(r) for r in runs]
    out = _check_output(out_dir, labels_dir, runs)
    spec = _run_spec(runs[0])
    seen: dict[str, Path] = {}
    for run in runs:
        if _run_spec(run).class_values != spec.class_values:
            raise EvaluationError(f"{run}: predicts other label values than {runs[0]}; merge folds of one model")
        for path in sorted((run / VALIDATION).glob(f"*{spec.file_ending}")):
            if path.name in seen:
                raise EvaluationError(f"{path.name} is a validation case of both {seen[path.name]} and {run}; "
                                      "folds of one cross-validation never share a case")
            seen[path.name] = run
    if not seen:
        raise EvaluationError(f"{', '.join(map(str, runs))}: no validation predictions ({VALIDATION}/*{spec.file_ending})")
    out.mkdir(parents=True, exist_ok=True)
    for name, run in seen.items():
        case = name[: -len(spec.file_ending)]
        for file in (name, f"{case}.npz"):
            if (run / VALIDATION / file).is_file():
                copy_file(run / VALIDATION / file, out / file)
    return evaluate(labels_dir, out, dataset_json=runs[0] / DATASET_FILE, num_workers=num_workers)


def ensemble_folder(members: Sequence[Path], out_dir: Path, spec: DatasetSpec, label_values: Sequence[int], regions: bool) -> None:
    """Average the members' ``{case}.npz`` probabilities per case and write labels (and the mean) to ``out_dir``."""
    from lightseg.inference.window import logits_to_labels, probabilities_as_logits

    out_dir.mkdir(parents=True, exist_ok=True)
    cases = sorted(set.intersection(*({p.stem for p in m.glob("*.npz")} for m in members)))
    for case in cases:
        mean = np.mean([np.load(m / f"{case}.npz")["probabilities"].astype(np.float32) for m in members], axis=0)
        reference = nib.load(members[0] / f"{case}{spec.file_ending}")
        scores = probabilities_as_logits(mean, regions)
        labels = logits_to_labels(scores, label_values, spec.regions_class_order if regions else None)
        with atomic_write(out_dir / f"{case}.npz", "wb") as handle:
            np.savez(handle, probabilities=mean.astype(np.float16))
        save_nifti(out_dir / f"{case}{spec.file_ending}", labels, reference)


def find_best(
    labels_dir: str | Path, models: dict[str, Sequence[str | Path]], out_dir: str | Path, num_workers: int = 2
) -> dict[str, Any]:
    """Score each model's cross-validation and every two-model ensemble; write the report; return it."""
    from lightseg.evaluation.report import evaluate

    for name in models:
        if not MODEL_NAME.fullmatch(name):
            raise EvaluationError(f"model name {name!r}: use letters, digits, '_', '-' and '.' only, starting with a letter "
                                  "or digit (it names a folder in the output and the ensembles 'ensemble(a+b)')")
    out = _check_output(out_dir, labels_dir, [run for runs in models.values() for run in runs])
    scores: dict[str, float] = {}
    folders: dict[str, Path] = {}
    for name, runs in models.items():
        summary = merge_folds(labels_dir, runs, out / name, num_workers)
        scores[name], folders[name] = summary["foreground_mean"]["Dice"], out / name
    first = Path(next(iter(models.values()))[0])
    spec, config = read_dataset_json(first / DATASET_FILE), read_config(first)
    for name, runs in models.items():
        if read_dataset_json(Path(runs[0]) / DATASET_FILE).class_values != spec.class_values:
            raise EvaluationError(f"model {name!r} predicts other label values than {first}; only models of one data set compare")
    for a, b in itertools.combinations(models, 2):
        name = f"ensemble({a}+{b})"
        ensemble_folder([folders[a], folders[b]], out / name, spec, config.data.label_values, config.data.regions is not None)
        summary = evaluate(labels_dir, out / name, dataset_json=first / DATASET_FILE, num_workers=num_workers)
        scores[name], folders[name] = summary["foreground_mean"]["Dice"], out / name
    best = max(scores, key=lambda k: scores[k])
    members = best[len("ensemble(") : -1].split("+") if best.startswith("ensemble(") else [best]
    command = "lightseg predict -i IMAGES -o OUT -m " + " ".join(str(r) for m in members for r in models[m])
    report = {"metric": "foreground-mean Dice over the merged cross-validation predictions",
              "scores": scores, "best": best, "predict": command}
    write_json(out / "find_best.json", report)
    lines = ["| model or ensemble | foreground-mean Dice |", "|---|---|"]
    lines += [f"| {k}{' (best)' if k == best else ''} | {v:.4f} |" for k, v in sorted(scores.items(), key=lambda kv: -kv[1])]
    with atomic_write(out / "find_best.md", "w") as handle:
        handle.write("# Best configuration from cross-validation\n\n" + "\n".join(lines) +
                     f"\n\nPredict with all folds of the best:\n\n    {command}\n")
    return report
