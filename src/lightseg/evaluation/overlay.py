"""An overlay figure: one scan's axial, coronal and sagittal slices with label maps side by side.

Rows are the three planes through the volume centre; the first column is the image alone, each
further column the image with one label map drawn over it (ground truth, then one or more
predictions), so a reader compares them at a glance. Volumes are brought to RAS first
(:func:`nibabel.as_closest_canonical`), so "axial" means the same plane for any stored
orientation, and each slice is drawn with its physical aspect ratio. Rendering uses matplotlib's
Agg backend (no display needed) and the PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from lightseg.errors import ImageError
from lightseg.io import atomic_write, load_nifti

PLANES = ("axial", "coronal", "sagittal")
PALETTE = ("#1f77b4", "#2ca02c", "#ffbf00", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
ALPHA = 0.45


def canonical(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3D volume in RAS voxel order and its spacing (mm)."""
    image = nib.as_closest_canonical(load_nifti(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim != 3:
        raise ImageError(f"{path}: the overlay needs a 3D volume, this one has shape {data.shape}")
    return np.asarray(data), tuple(float(z) for z in image.header.get_zooms()[:3])  # type: ignore[return-value]


def centre_slices(volume: np.ndarray, spacing: Sequence[float]) -> dict[str, tuple[np.ndarray, float]]:
    """Per plane, the centre slice of a RAS volume as (rows, columns) for ``imshow(origin="lower")``
    (superior or anterior up, patient's right on the left) and the aspect ratio (row mm / column mm)."""
    x, y, z = (n // 2 for n in volume.shape)
    sx, sy, sz = spacing
    return {
        "axial": (volume[:, :, z].T, sy / sx),
        "coronal": (volume[:, y, :].T, sz / sx),
        "sagittal": (volume[x, :, :].T, sz / sy),
    }


def save_overlay(
    image: str | Path,
    labels: Mapping[str, str | Path],
    out_png: str | Path,
    class_names: Mapping[int, str],
    title: str = "",
) -> Path:
    """Draw ``image`` with each of ``labels`` (column title -> label map file) over it into ``out_png``.

    Every label map must share the image's grid (shape after reorientation). ``class_names``
    maps foreground label values to the legend's names; value 0 is left transparent.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    volume, spacing = canonical(image)
    maps = {}
    for name, path in labels.items():
        label, _ = canonical(path)
        if label.shape != volume.shape:
            raise ImageError(f"{path}: label map shape {label.shape} differs from the image {image} {volume.shape}; "
                             "an overlay needs both on one grid")
        maps[name] = np.rint(label).astype(np.int16)
    values = sorted(v for v in class_names if v > 0)
    colours = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(values)}
    cmap = ListedColormap([colours[v] for v in values]) if values else None
    low, high = np.percentile(volume, (0.5, 99.5))
    columns = ["image", *maps]
    figure, axes = plt.subplots(len(PLANES), len(columns), figsize=(2.6 * len(columns), 2.6 * len(PLANES)), squeeze=False)
    image_slices = centre_slices(volume, spacing)
    label_slices = {name: centre_slices(label, spacing) for name, label in maps.items()}
    for row, plane in enumerate(PLANES):
        picture, aspect = image_slices[plane]
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(picture, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect, interpolation="nearest")
            if name in label_slices and cmap is not None:
                label = label_slices[name][plane][0]
                index = np.searchsorted(values, label)
                shown = np.ma.masked_where(~np.isin(label, values), index)
                ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(values) - 0.5, alpha=ALPHA, origin="lower",
                          aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(plane, fontsize=10)
    handles = [Patch(facecolor=colours[v], alpha=ALPHA + 0.3, label=class_names[v]) for v in values]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.05 if handles else 0, 1, 0.95 if title else 1))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)
    return out
