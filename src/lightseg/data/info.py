"""``lightseg info FILE``: what a NIfTI file holds, at a glance (in the spirit of TorchIO's ``tiohd``).

Shape, spacing, orientation codes, origin, stored dtype, intensity range, the qform and sform
codes (a common source of "my prediction is flipped"), and, for a label-like file (whole
numbers, at most :data:`MAX_LABEL_VALUES` distinct values), each value with its voxel share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from lightseg.data.verify import integer_value_counts
from lightseg.io import load_nifti, voxel_spacing

MAX_LABEL_VALUES = 32


@dataclass(frozen=True)
class ImageInfo:
    """A summary of one image file; :meth:`format` renders it for the terminal."""

    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    origin: tuple[float, ...]
    dtype: str
    minimum: float
    maximum: float
    mean: float
    non_finite: int
    qform: str
    sform: str
    label_counts: dict[int, int] | None
    file_bytes: int

    def format(self) -> str:
        def vector(values: tuple[float, ...]) -> str:
            return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

        rows = [
            ("shape", str(self.shape)),
            ("spacing", f"{vector(self.spacing)} mm"),
            ("orientation", self.orientation),
            ("origin", f"{vector(self.origin)} mm"),
            ("dtype", self.dtype),
            ("intensity", f"[{self.minimum:.6g}, {self.maximum:.6g}], mean {self.mean:.6g}"
             + (f" ({self.non_finite} NaN/Inf voxels ignored)" if self.non_finite else "")),
            ("qform/sform", f"{self.qform} / {self.sform}"),
        ]
        if self.label_counts is not None:
            total = sum(self.label_counts.values())
            rows.append(("labels", ", ".join(f"{v} ({100 * n / total:.1f}%)" for v, n in self.label_counts.items())))
        size = f"{self.file_bytes / 2**20:.1f} MiB" if self.file_bytes >= 2**20 else f"{self.file_bytes / 2**10:.1f} KiB"
        rows.append(("file", size))
        return "\n".join([str(self.path)] + [f"  {key:<12} {value}" for key, value in rows])


def image_info(path: str | Path) -> ImageInfo:
    """Read ``path`` once and summarise it; raises :class:`~lightseg.errors.ImageError` if unreadable."""
    path = Path(path)
    image = load_nifti(path)
    data = image.get_fdata(dtype=np.float32)
    finite = np.isfinite(data)
    values = data if finite.all() else data[finite]
    counts = integer_value_counts(values) if values.size else None
    header = image.header
    return ImageInfo(
        path=path,
        shape=tuple(int(s) for s in image.shape),
        spacing=voxel_spacing(image),
        orientation="".join(nib.aff2axcodes(image.affine)) + "+",
        origin=tuple(float(v) for v in image.affine[:3, 3]),
        dtype=str(header.get_data_dtype()),
        minimum=float(values.min()) if values.size else float("nan"),
        maximum=float(values.max()) if values.size else float("nan"),
        mean=float(values.mean(dtype=np.float64)) if values.size else float("nan"),
        non_finite=int(data.size - values.size),
        qform=_xform(header, "qform_code"),
        sform=_xform(header, "sform_code"),
        label_counts=counts if counts is not None and len(counts) <= MAX_LABEL_VALUES else None,
        file_bytes=path.stat().st_size,
    )


def _xform(header: nib.Nifti1Header, key: str) -> str:
    return f"{int(header[key])} ({header.get_value_label(key)})"
