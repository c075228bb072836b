"""Evaluate a folder of predicted label maps against ground truth into an nnU-Net-like summary.json.

Predictions are matched to references by file name. Each pair must share its grid (shape and
affine within ``affine_tolerance`` mm): a mismatch is an :class:`EvaluationError` naming both
files, never a number computed on misaligned voxels. References without a prediction are listed
under ``missing_predictions`` and left out of the means (a warning says so). Cases are read and
scored in ``num_workers`` threads (NIfTI decompression and MONAI's distance transforms release
the interpreter lock for most of their time).

``summary.json`` holds ``metric_per_case`` (files and per-target metrics), ``mean`` (per target,
over cases), ``foreground_mean`` (over the data set's network targets: the classes, or the regions
when dataset.json declares regions), ``targets`` (key -> name and label values) and ``settings``
(tolerance and the empty-mask policy). Metrics and the policy: :mod:`lightseg.evaluation.metrics`.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lightseg.data.dataset import DatasetSpec, read_dataset_json
from lightseg.errors import EvaluationError, ImageError
from lightseg.evaluation.metrics import (
    COUNTS,
    METRICS,
    Target,
    case_metrics,
    empty_metrics,
    foreground_keys,
    targets_from_spec,
    targets_from_values,
)
from lightseg.io import check_output_file, load_nifti, voxel_spacing, why_not_a_folder, write_json

POLICY = {
    "both_empty": {"Dice": 1.0, "IoU": 1.0, "HD95": 0.0, "NSD": 1.0},
    "one_empty": {"Dice": 0.0, "IoU": 0.0, "HD95": "image diagonal in mm", "NSD": 0.0},
}


def read_label_map(path: Path) -> tuple[np.ndarray, Any]:
    """An integer label map and its NIfTI image (for the geometry); non-integer or negative values are an error."""
    try:
        image = load_nifti(path)
    except ImageError as exc:
        raise EvaluationError(str(exc)) from exc
    data = image.get_fdata(dtype=np.float32)
    image.uncache()
    if data.ndim != 3:
        raise EvaluationError(f"{path}: a label map must be 3D, this file has shape {data.shape}")
    labels = np.rint(data)
    if not np.array_equal(labels, data):
        raise EvaluationError(f"{path}: holds non-integer values; a label map must hold class numbers")
    if labels.size and labels.min() < 0:  # without -d every value found is a class: -1 would be scored as one
        raise EvaluationError(f"{path}: holds negative values (lowest {int(labels.min())}); a label map holds class "
                              "numbers 0 (background), 1, 2, ...: map the negative value to 0 or to its class")
    return labels.astype(np.int32), image


def check_same_grid(reference: Path, ref_image: Any, prediction: Path, pred_image: Any, tolerance: float) -> None:
    """Raise :class:`EvaluationError` unless both images share shape and affine (within ``tolerance`` mm)."""
    if ref_image.shape != pred_image.shape:
        raise EvaluationError(
            f"{prediction} has shape {pred_image.shape} but its reference {reference} has {ref_image.shape}; "
            "predictions must be saved on the reference grid"
        )
    difference = float(np.abs(np.asarray(ref_image.affine) - np.asarray(pred_image.affine)).max())
    if difference > tolerance:
        raise EvaluationError(
            f"{prediction} and its reference {reference} have different affines (largest difference "
            f"{difference:.4g} mm > {tolerance} mm): different orientation, spacing or origin; resample the "
            "prediction onto the reference grid"
        )


def check_declared(path: Path, labels: np.ndarray, declared: Sequence[int] | None, where: str) -> None:
    """Refuse label values that ``dataset.json`` does not declare: scored against its targets they
    would count as background, so a prediction that paints a quarter of the background 7 would
    score 1.0 everywhere."""
    if declared is None:
        return
    unknown = sorted(set(np.unique(labels).tolist()) - set(declared))
    if unknown:
        raise EvaluationError(
            f"{path}: holds label values {unknown} that {where} does not declare (it declares {list(declared)}); "
            "fix the file, or pass the dataset.json it was made for (or none: every value is then a class)"
        )


def _score_case(
    reference: Path, prediction: Path, targets: Sequence[Target] | None, tolerance: float, affine_tolerance: float,
    declared: tuple[int, ...] | None = None, where: str = "dataset.json", ignore_label: int | None = None,
) -> dict[str, Any]:
    ref, ref_image = read_label_map(reference)
    pred, pred_image = read_label_map(prediction)
    check_same_grid(reference, ref_image, prediction, pred_image, affine_tolerance)
    check_declared(reference, ref, declared, where)
    check_declared(prediction, pred, declared, where)
    chosen = targets if targets is not None else targets_from_values(np.union1d(np.unique(ref), np.unique(pred)))
    metrics = case_metrics(ref, pred, chosen, voxel_spacing(ref_image), tolerance, ignore_label)
    return {"reference_file": str(reference), "prediction_file": str(prediction), "metrics": metrics}


def _mean(cases: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = {m: [case["metrics"][key][m] for case in cases] for m in METRICS + COUNTS}
    return {m: float(np.mean(v)) for m, v in values.items()}


def _summary_path(path: Path) -> Path:
    """``path`` as the summary to (re)write: a ``.json`` path, absent or holding an earlier summary.

    Anything else there is the user's (a label map, a dataset.json) and is never replaced: ``-o
    labelsTr/case.nii.gz`` once overwrote a ground-truth file with the summary.
    """
    if not path.name.endswith(".json"):
        raise EvaluationError(f"{path}: the summary is JSON; give a path ending in .json (default: PRED_DIR/summary.json)")
    path = check_output_file(path)
    if path.is_file():
        try:
            earlier = json.loads(path.read_bytes())
        except (ValueError, RecursionError):
            earlier = None
        if not (isinstance(earlier, dict) and {"metric_per_case", "foreground_mean"} <= earlier.keys()):
            raise EvaluationError(f"{path}: exists and is not an evaluation summary (a training's validation summary "
                                  "or a file of yours), so it is not replaced; choose another -o path, such as "
                                  f"{path.with_name('evaluation.json')}, or move that file")
    return path


def evaluate(
    gt_dir: str | Path,
    pred_dir: str | Path,
    dataset_json: str | Path | None = None,
    output: str | Path | None = None,
    nsd_tolerance_mm: float = 1.0,
    affine_tolerance: float = 1e-3,
    num_workers: int = 2,
) -> dict[str, Any]:
    """Score every prediction in ``pred_dir`` against ``gt_dir`` and write ``summary.json``.

    ``dataset_json`` names the classes and declares regions (BraTS whole tumour, tumour core,
    enhancing tumour); without it, every label value found in the files is a class. With it, a
    file holding a value it does not declare is an :class:`EvaluationError` (:func:`check_declared`).
    ``output`` defaults to ``pred_dir/summary.json``. Returns the summary.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    spec: DatasetSpec | None = read_dataset_json(dataset_json) if dataset_json is not None else None
    ending = spec.file_ending if spec is not None else ".nii.gz"
    if not gt_dir.is_dir():
        raise EvaluationError(f"{gt_dir}: {why_not_a_folder(gt_dir, 'ground-truth')}")
    if not pred_dir.is_dir():
        raise EvaluationError(f"{pred_dir}: {why_not_a_folder(pred_dir, 'prediction')}")
    if os.path.samefile(gt_dir, pred_dir):
        raise EvaluationError(f"{pred_dir}: is the ground-truth folder {gt_dir}; files scored against themselves score 1.0; "
                              "pass the folder of predictions (`lightseg predict -o`) as PRED_DIR")
    references = sorted(p for p in gt_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    if not references:
        raise EvaluationError(f"{gt_dir}: no ground-truth files ending in {ending}")
    pairs = [(r, pred_dir / r.name) for r in references if (pred_dir / r.name).is_file()]
    missing = [r.name for r in references if not (pred_dir / r.name).is_file()]
    if not pairs:
        raise EvaluationError(f"{pred_dir}: none of the {len(references)} cases in {gt_dir} has a prediction")
    fixed = targets_from_spec(spec) if spec is not None else None
    declared = spec.label_values if spec is not None else None
    output = _summary_path(Path(output) if output is not None else pred_dir / "summary.json")
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        ignore = spec.ignore_label if spec is not None else None
        cases = list(pool.map(lambda p: _score_case(*p, fixed, nsd_tolerance_mm, affine_tolerance, declared,
                                                    str(dataset_json), ignore), pairs))
    if fixed is not None:
        targets = fixed
        foreground = foreground_keys(spec, targets)
    else:
        found = sorted({int(k) for case in cases for k in case["metrics"]})
        targets = targets_from_values(found)
        for case in cases:
            case["metrics"] = {t.key: case["metrics"].get(t.key, empty_metrics()) for t in targets}
        foreground = [t.key for t in targets]
    mean = {t.key: _mean(cases, t.key) for t in targets}
    summary = {
        "metric_per_case": cases,
        "mean": mean,
        "foreground_mean": {m: float(np.mean([mean[k][m] for k in foreground])) if foreground else float("nan")
                            for m in METRICS + COUNTS},
        "targets": {t.key: {"name": t.name, "labels": list(t.labels)} for t in targets},
        "foreground_targets": foreground,
        "num_cases": len(cases),
        "missing_predictions": missing,
        "settings": {"nsd_tolerance_mm": nsd_tolerance_mm, "hd95_percentile": 95, "empty_mask_policy": POLICY},
    }
    write_json(output, summary)
    if missing:
        print(f"warning: {len(missing)} of {len(references)} cases have no prediction in {pred_dir} and are "
              f"left out of the means: {', '.join(missing)}", file=sys.stderr)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: one row per target (mean over cases), then the foreground mean."""
    rows = [(f"{info['name']} [{key}]", summary["mean"][key]) for key, info in summary["targets"].items()]
    rows.append(("foreground mean", summary["foreground_mean"]))
    width = max(len(name) for name, _ in rows)
    tolerance = summary["settings"]["nsd_tolerance_mm"]
    header = f"{'target':<{width}}  {'Dice':>6}  {'IoU':>6}  {'HD95 mm':>8}  {f'NSD@{tolerance:g}mm':>10}"
    lines = [f"{summary['num_cases']} cases", header, "-" * len(header)]
    lines += [f"{n:<{width}}  {m['Dice']:6.4f}  {m['IoU']:6.4f}  {m['HD95']:8.2f}  {m['NSD']:10.4f}" for n, m in rows]
    return "\n".join(lines)
