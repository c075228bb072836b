"""Overlap and surface metrics of one case: Dice, IoU, HD95 (mm) and surface Dice (NSD).

MONAI computes every metric (``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance``,
``compute_surface_dice``, each default set explicitly); this module only turns label maps into
one binary mask per target and applies one empty-mask policy, the BraTS challenge's:

* both masks empty: Dice 1, IoU 1, HD95 0 mm, NSD 1 (a correct "nothing here" is perfect);
* exactly one empty: Dice 0, IoU 0, NSD 0, and HD95 = the image diagonal in mm (373.13 for a
  240x240x155 1 mm BraTS volume), the largest distance the grid allows. A finite penalty keeps
  every per-class mean defined, unlike NaN, which would silently drop the worst cases.

HD95 is MONAI's symmetric 95th percentile: the larger of the two directed 95th percentiles of
boundary-voxel distances, in mm from the voxel spacing. NSD counts boundary voxels whose distance
to the other boundary is within the tolerance in mm (``use_subvoxels=False``: boundary voxels,
not DeepMind's area-weighted surfels), so both metrics use the same boundary.

The data set's ignore label (nnU-Net's ``"ignore"``): its voxels in the reference are removed
from both masks before any metric, so neither a prediction there nor the ignore label itself
counts; it is never a target.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

from lightseg.data.dataset import IGNORE_NAME, DatasetSpec

# MONAI 1.6 passes its own deprecated ``always_return_as_numpy`` argument internally.
warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)

METRICS = ("Dice", "IoU", "HD95", "NSD")
COUNTS = ("TP", "FP", "FN", "n_ref", "n_pred")


@dataclass(frozen=True)
class Target:
    """One evaluated structure: a label value, or a region (the union of several label values)."""

    labels: tuple[int, ...]
    name: str
    region: bool = False

    @property
    def key(self) -> str:
        """``"2"`` for a label, ``"(1, 2, 3)"`` for a region and ``"(3,)"`` for a region declared as a
        one-element list, as in nnU-Net's summary.json."""
        return str(tuple(self.labels)) if self.region or len(self.labels) > 1 else str(self.labels[0])


def targets_from_spec(spec: DatasetSpec) -> tuple[Target, ...]:
    """Every foreground label value (not the ignore label), then every region declared as a list
    (BraTS: WT, TC, ET), in dataset.json's order."""
    names = {v: n for n, v in spec.labels.items() if isinstance(v, int)}
    out = [Target((v,), names.get(v, f"label {v}")) for v in spec.class_values if v != 0]
    out += [Target(v, n, region=True) for n, v in spec.labels.items() if isinstance(v, tuple) and v != (0,)]
    return tuple(out)


def foreground_keys(spec: DatasetSpec, targets: Sequence[Target]) -> list[str]:
    """The targets the network was trained on: the classes, or for a region data set its regions
    (lists, and labels declared as a plain integer beside them), as nnU-Net's foreground mean."""
    if not spec.has_regions:
        return [t.key for t in targets]
    plain = {v for n, v in spec.labels.items() if isinstance(v, int) and v != 0 and n != IGNORE_NAME}
    return [t.key for t in targets if t.region or t.labels[0] in plain]


def targets_from_values(values: Sequence[int]) -> tuple[Target, ...]:
    """One target per foreground label value, named after it (no dataset.json given)."""
    return tuple(Target((int(v),), f"label {int(v)}") for v in sorted(set(values)) if v != 0)


def masks(label: np.ndarray, targets: Sequence[Target]) -> torch.Tensor:
    """Boolean one-hot ``(1, T, *spatial)``: channel t is where ``label`` is in target t's values."""
    return torch.from_numpy(np.stack([np.isin(label, t.labels) for t in targets]))[None]


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the grid's diagonal in mm: the HD95 penalty when exactly one mask is empty."""
    return float(np.linalg.norm(np.asarray(shape, np.float64) * np.asarray(spacing, np.float64)))


def empty_metrics() -> dict[str, float]:
    """Metrics of a target absent from both masks (the both-empty policy)."""
    return {"Dice": 1.0, "IoU": 1.0, "HD95": 0.0, "NSD": 1.0, "TP": 0, "FP": 0, "FN": 0, "n_ref": 0, "n_pred": 0}


def case_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    targets: Sequence[Target],
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
    ignore_label: int | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of one case per target key: Dice, IoU, HD95 (mm), NSD and voxel counts.

    ``reference`` and ``prediction`` are integer label maps on the same grid; ``spacing`` is the
    voxel size in mm along each axis. Voxels where ``reference`` holds ``ignore_label`` are left out.
    """
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    if not targets:
        return {}
    ref, pred = masks(reference, targets), masks(prediction, targets)
    if ignore_label is not None:
        annotated = torch.from_numpy(reference != ignore_label)
        ref, pred = ref & annotated, pred & annotated
    dims = tuple(range(2, ref.ndim))
    n_ref, n_pred = ref.sum(dims)[0].numpy(), pred.sum(dims)[0].numpy()
    tp = (ref & pred).sum(dims)[0].numpy()
    dice = compute_dice(pred, ref, include_background=True, ignore_empty=False, num_classes=None,
                        per_component=False, ignore_index=None)[0].numpy()
    iou = compute_iou(pred, ref, include_background=True, ignore_empty=False, ignore_index=None)[0].numpy()
    none = (n_ref == 0) & (n_pred == 0)
    both = (n_ref > 0) & (n_pred > 0)
    hd95 = np.where(none, 0.0, image_diagonal_mm(reference.shape, spacing))
    nsd = np.where(none, 1.0, 0.0)
    if both.any():
        pick = torch.from_numpy(both)
        spacing_list = [float(s) for s in spacing]
        hd95[both] = compute_hausdorff_distance(
            pred[:, pick], ref[:, pick], include_background=True, distance_metric="euclidean",
            percentile=95, directed=False, spacing=spacing_list, ignore_index=None,
        )[0].numpy()
        nsd[both] = compute_surface_dice(
            pred[:, pick], ref[:, pick], class_thresholds=[float(nsd_tolerance_mm)] * int(both.sum()),
            include_background=True, distance_metric="euclidean", spacing=spacing_list,
            use_subvoxels=False, ignore_index=None,
        )[0].numpy()
    return {
        t.key: {
            "Dice": float(dice[i]), "IoU": float(iou[i]), "HD95": float(hd95[i]), "NSD": float(nsd[i]),
            "TP": int(tp[i]), "FP": int(n_pred[i] - tp[i]), "FN": int(n_ref[i] - tp[i]),
            "n_ref": int(n_ref[i]), "n_pred": int(n_pred[i]),
        }
        for i, t in enumerate(targets)
    }
