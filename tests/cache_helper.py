"""Build a preprocessed cache for the training tests.

Uses ``lightseg.data.preprocess.preprocess_dataset`` when it exists; until then it writes the
layout of docs/formats.md directly from the raw synthetic data (1 mm, no crop, no resampling).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from lightseg.io import save_npy, write_json


def make_cache(raw: Path, cache: Path) -> Path:
    try:
        from lightseg.data.preprocess import preprocess_dataset
    except ImportError:
        preprocess_dataset = None
    if preprocess_dataset is not None:
        preprocess_dataset(raw, cache)
        return cache
    (cache / "cases").mkdir(parents=True, exist_ok=True)
    shutil.copy(raw / "dataset.json", cache / "dataset.json")
    spec = json.loads((raw / "dataset.json").read_text())
    rng = np.random.default_rng(0)
    shapes = []
    for label_path in sorted((raw / "labelsTr").glob("*.nii.gz")):
        case = label_path.name[: -len(".nii.gz")]
        label = np.asarray(nib.load(label_path).dataobj).astype(np.uint8)
        channels = [np.asarray(nib.load(raw / "imagesTr" / f"{case}_{c:04d}.nii.gz").dataobj) for c in range(len(spec["channel_names"]))]
        image = np.stack(channels).astype(np.float32)
        image = (image - image.mean()) / (image.std() + 1e-8)
        save_npy(cache / "cases" / f"{case}_image.npy", image)
        save_npy(cache / "cases" / f"{case}_label.npy", label)
        locations = {}
        for v in np.unique(label):
            if v == 0:
                continue
            points = np.argwhere(label == v).astype(np.int32)
            locations[f"class_{v}"] = points[rng.choice(len(points), min(len(points), 1000), replace=False)]
        np.savez(cache / "cases" / f"{case}_locations.npz", **locations)
        shapes.append(label.shape)
        write_json(
            cache / "cases" / f"{case}.json",
            {"shape": list(label.shape), "spacing": [1.0, 1.0, 1.0], "classes_present": sorted(int(v) for v in np.unique(label) if v)},
        )
    write_json(cache / "plan.json", {"spacing": [1.0, 1.0, 1.0], "median_shape": list(np.median(shapes, 0).astype(int).tolist())})
    return cache
