"""Fast synthetic nnU-Net data sets (ellipsoids) for tests and quick experiments.

Each case holds nested ellipsoids: class k is drawn inside class k-1, so with ``regions=True``
the labels form BraTS-like nested regions (whole > core > enhancing). Every channel sees each
class at its own intensity plus noise, so any channel count is learnable.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from lightseg.io import write_json


def synthetic_case(
    shape: tuple[int, int, int], num_channels: int, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One case: image ``(C, *shape)`` float32 and label ``shape`` uint8 with values 0..K-1."""
    grid = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij"))
    label = np.zeros(shape, np.uint8)
    center = np.array(shape, np.float32) * rng.uniform(0.4, 0.6, 3)
    radii = np.array(shape, np.float32) * rng.uniform(0.25, 0.35, 3)
    for k in range(1, num_classes):
        inside = (((grid - center[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
        label[inside] = k
        center = center + rng.uniform(-0.15, 0.15, 3) * radii
        radii = radii * rng.uniform(0.5, 0.7, 3)
    levels = rng.uniform(0.0, 1.0, (num_channels, num_classes)).astype(np.float32)
    levels[:, 1:] += np.arange(1, num_classes, dtype=np.float32) * 0.8  # keep classes separable
    image = levels[:, label] + rng.normal(0, 0.15, (num_channels, *shape)).astype(np.float32)
    return image.astype(np.float32), label


def make_synthetic_dataset(
    out_dir: str | Path,
    num_cases: int = 4,
    shape: tuple[int, int, int] = (32, 32, 32),
    num_channels: int = 1,
    num_classes: int = 3,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    regions: bool = False,
    num_test: int = 0,
    channel_names: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """Write an nnU-Net v2 raw data set of ellipsoid cases and return its folder.

    With ``regions=True`` the ``dataset.json`` declares nested regions (each class k as the
    union of labels k..K-1) plus ``regions_class_order``, like BraTS in nnU-Net.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    names = channel_names or tuple(f"MR{c}" for c in range(num_channels))
    for split, count, with_label in (("Tr", num_cases, True), ("Ts", num_test, False)):
        for index in range(count):
            case = f"case_{split.lower()}{index:03d}"
            image, label = synthetic_case(shape, num_channels, num_classes, rng)
            for c in range(num_channels):
                path = out / f"images{split}" / f"{case}_{c:04d}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(image[c], affine), path)
            if with_label:
                (out / "labelsTr").mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / f"{case}.nii.gz")
    labels: dict[str, object] = {"background": 0}
    if regions:
        for k in range(1, num_classes):
            labels[f"region{k}"] = list(range(k, num_classes))
    else:
        labels.update({f"class{k}": k for k in range(1, num_classes)})
    spec = {
        "name": "synthetic",
        "channel_names": {str(c): n for c, n in enumerate(names)},
        "labels": labels,
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    if regions:
        spec["regions_class_order"] = list(range(1, num_classes))
    write_json(out / "dataset.json", spec)
    return out
