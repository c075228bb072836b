"""Data set fingerprint: what the plan is computed from (nnU-Net's "dataset fingerprint").

Per case: voxel spacing, shape before and after cropping to the nonzero region, the label
values present, and a seeded sample of foreground intensities per channel. Over the data set:
foreground intensity statistics per channel (mean, std, 0.5/99.5 percentiles, min, max) from
the pooled samples, which the CT normalisation uses (Isensee et al., Nat. Methods 2021).

Loading and cropping live here because the fingerprint is the first stage that needs them;
preprocessing reuses the same functions, so training and inference crop identically.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from lightseg.data.dataset import Case
from lightseg.data.intensity import profile, zscore, zscore_regions
from lightseg.data.orientation import axis_codes, canonical_order, to_canonical
from lightseg.errors import DatasetError, ImageError
from lightseg.io import load_nifti, voxel_spacing

FOREGROUND_SAMPLES = 10_000  # foreground voxels sampled per case for intensity statistics (nnU-Net)
GRID_ATOL_MM = 1e-3  # affine tolerance between the files of one case (the predictor's and verify's origin tolerance)
BBox = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def case_seed(name: str) -> int:
    """A stable per-case seed, so sampling does not depend on worker order or process."""
    return zlib.crc32(name.encode())


def volume_problems(image: nib.Nifti1Image, data: np.ndarray) -> list[tuple[str, str]]:
    """What makes a volume unusable, as ``(check, message)`` pairs; ``lightseg verify`` lists them
    with the very words :func:`check_volume` raises on every read."""
    if data.size == 0:
        return [("empty", f"has no voxels (shape {data.shape}); re-export the volume")]
    if data.ndim != 3:
        return [("not-3d", f"has {data.ndim} dimensions {data.shape}, expected a 3-D volume; save one 3-D file "
                           "per channel ({case}_XXXX), or convert 4-D MSD data with `lightseg convert-msd`")]
    problems = []
    if not np.isfinite(data).all():
        nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        problems.append(("non-finite", f"{nan + inf} NaN or Inf voxels ({nan} NaN, {inf} Inf); replace them with "
                                       "finite values (for example the image minimum) and save the file again"))
    spacing = voxel_spacing(image)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        problems.append(("spacing", f"voxel spacing {spacing} mm is not positive and finite; fix the header's affine "
                                    "(sform/qform) or pixdim"))
    return problems


def check_volume(image: nib.Nifti1Image, data: np.ndarray, where: str) -> None:
    """Raise :class:`ImageError` unless ``data`` is 3-D, not empty, finite, with a finite positive spacing.

    Checked on every read, not only by ``lightseg verify``: one NaN voxel would turn a case's
    z-score, and then the training loss, into NaN; a zero spacing would resample it to nothing.
    """
    problems = volume_problems(image, data)
    if problems:
        raise ImageError(f"{where}: {problems[0][1]}")


def same_grid(image: nib.Nifti1Image, reference: nib.Nifti1Image) -> bool:
    """Same shape and affine (to ``GRID_ATOL_MM``, float32 header rounding)."""
    return image.shape == reference.shape and np.allclose(image.affine, reference.affine, atol=GRID_ATOL_MM)


def stack_channels(images: Sequence[nib.Nifti1Image], source: str) -> np.ndarray:
    """``(C, X, Y, Z)`` float32 array of the channels (:func:`channel_arrays`)."""
    return np.stack(channel_arrays(images, source))


def channel_arrays(images: Sequence[nib.Nifti1Image], source: str) -> list[np.ndarray]:
    """The channels as float32 ``(X, Y, Z)`` arrays, each passing :func:`check_volume`, all on one
    grid (shape and affine); each problem names the file. Unstacked, so that prediction crops
    before it copies (:func:`lightseg.data.preprocess.preprocess_arrays`)."""
    arrays = []
    for index, image in enumerate(images):
        where = image.get_filename() or f"{source}, channel {index}"
        data = image.get_fdata(dtype=np.float32)  # cached by load_nifti's read check: no second decode
        check_volume(image, data, where)
        if index and not same_grid(image, images[0]):
            raise ImageError(
                f"{where}: its grid (shape {image.shape}, affine) differs from channel 0 (shape {images[0].shape}); "
                "all channels of a case must be co-registered on one grid: run `lightseg verify`"
            )
        arrays.append(data)
    return arrays


def load_case(case: Case) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Read one training case: image ``(C, X, Y, Z)`` float32, label uint8, and the first
    channel's NIfTI (its affine and spacing define the case's grid)."""
    niftis = [load_nifti(path) for path in case.images]
    image = stack_channels(niftis, f"case {case.name!r}")
    if case.label is None or not case.label.is_file():
        raise DatasetError(f"case {case.name!r}: label file {case.label} not found; add it or remove the case")
    label = load_nifti(case.label)
    label_data = label.get_fdata(dtype=np.float32)
    if label_data.shape != image.shape[1:] or not same_grid(label, niftis[0]):
        raise ImageError(
            f"{case.label}: label grid (shape {label_data.shape}, affine) differs from the image's (shape "
            f"{image.shape[1:]}); a label must lie on its image's voxel grid: run `lightseg verify`"
        )
    rounded = np.rint(label_data)
    if rounded.min() < 0 or rounded.max() > 255 or not np.array_equal(rounded, label_data):
        raise ImageError(f"{case.label}: label values must be integers in 0..255; run `lightseg verify`")
    return image, rounded.astype(np.uint8), niftis[0]


def nonzero_mask(image: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Voxels nonzero in any channel of ``image`` (``(C, X, Y, Z)`` or its channels), holes filled
    (nnU-Net's crop mask).

    Holes are filled only inside the nonzero voxels' bounding box, padded by one background
    voxel: everything outside the box is background connected to the border, so the mask is the
    same as filling the whole grid, for a fraction of the work (a BraTS-size scan's brain box:
    0.28 s -> 0.09 s, docs/prediction.md). A hole is a background component (face-connected) that
    does not reach the border: the padded box's background is labelled once
    (``ndimage.label``) and every component but the border's is filled, the same mask as
    ``ndimage.binary_fill_holes``, whose dilation repeats until nothing changes (0.30 -> 0.10 s on
    that box, the masks equal: tests/test_preprocess.py)."""
    nonzero = image[0] != 0
    for channel in image[1:]:
        nonzero |= channel != 0
    bbox = bounding_box(nonzero)
    box = tuple(slice(lo, hi) for lo, hi in bbox)
    components, _ = ndimage.label(~np.pad(nonzero[box], 1))  # the padding: one component along the whole border
    filled = np.zeros_like(nonzero)
    filled[box] = (components != components[0, 0, 0])[1:-1, 1:-1, 1:-1]
    return filled


def full_box(shape: Sequence[int]) -> BBox:
    return tuple((0, int(n)) for n in shape)  # type: ignore[return-value]


def bounding_box(mask: np.ndarray) -> BBox:
    """``[lo, hi)`` per axis of the mask's True voxels; the whole grid if the mask is empty."""
    if not mask.any():
        return full_box(mask.shape)
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def crop(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """Crop the last three axes of ``array`` to ``bbox``."""
    return array[(..., *(slice(lo, hi) for lo, hi in bbox))]


@dataclass(frozen=True, eq=False)
class CaseFingerprint:
    """What the plan needs to know about one training case."""

    name: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    shape_after_crop: tuple[int, int, int]
    classes_present: tuple[int, ...]
    foreground_samples: np.ndarray  # (C, N) float32 intensities of sampled foreground voxels
    norm_profiles: dict[bool, list[list[float]]] | None = None  # use_mask_for_norm -> per-channel z-score profile


@dataclass(frozen=True)
class ChannelStats:
    """Foreground intensity statistics of one channel over the whole data set."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    min: float
    max: float


@dataclass(frozen=True, eq=False)
class Fingerprint:
    """The data set fingerprint: one entry per training case plus pooled intensity statistics."""

    cases: tuple[CaseFingerprint, ...]
    intensity: tuple[ChannelStats, ...]

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.int64)


def fingerprint_arrays(
    name: str, image: np.ndarray, label: np.ndarray, spacing: Sequence[float], crop_to_nonzero: bool = True
) -> CaseFingerprint:
    """Fingerprint one case from arrays (pure: no files), cropped like preprocessing crops it."""
    shape = label.shape
    nonzero = nonzero_mask(image) if crop_to_nonzero else None
    bbox = bounding_box(nonzero) if nonzero is not None else full_box(shape)
    image, label = crop(image, bbox), crop(label, bbox)
    profiles = {flag: zscore_profiles(image, flag, None if nonzero is None else crop(nonzero, bbox))
                for flag in (True, False)}
    foreground = np.flatnonzero(label > 0)
    if len(foreground) > FOREGROUND_SAMPLES:
        rng = np.random.default_rng(case_seed(name))
        foreground = rng.choice(foreground, FOREGROUND_SAMPLES, replace=False)
    return CaseFingerprint(
        name=name,
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        shape=tuple(int(n) for n in shape),  # type: ignore[arg-type]
        shape_after_crop=tuple(int(n) for n in label.shape),  # type: ignore[arg-type]
        classes_present=tuple(int(v) for v in np.unique(label) if v > 0),
        foreground_samples=image.reshape(image.shape[0], -1)[:, foreground].astype(np.float32),
        norm_profiles=profiles,
    )


def zscore_profiles(image: np.ndarray, use_mask: bool, nonzero: np.ndarray | None) -> list[list[float]]:
    """Each channel's :func:`~lightseg.data.intensity.profile` after a z-score with ``use_mask`` (either
    value of the plan's rule, which is decided after every case is fingerprinted)."""
    out = []
    for region, channel in zip(zscore_regions(image, [use_mask] * len(image), nonzero, "foreground"), image):
        normalised = np.array(channel, dtype=np.float32)
        zscore(normalised, region)
        out.append(profile(normalised, region))
    return out


def fingerprint_case(case: Case, crop_to_nonzero: bool = True) -> CaseFingerprint:
    """Read one training case from disk and fingerprint it in RAS voxel order, the order of the
    plans it feeds (``reorient: true``), so spacings and shapes are compared axis for axis."""
    image, label, reference = load_case(case)
    codes = axis_codes(reference.affine)
    return fingerprint_arrays(case.name, to_canonical(image, codes), to_canonical(label, codes),
                              canonical_order(voxel_spacing(reference), codes), crop_to_nonzero)


def pool_statistics(cases: Sequence[CaseFingerprint], num_channels: int) -> tuple[ChannelStats, ...]:
    """Per-channel statistics over the pooled foreground samples of every case."""
    stats = []
    for channel in range(num_channels):
        values = np.concatenate([c.foreground_samples[channel] for c in cases]).astype(np.float64)
        if values.size == 0:
            raise DatasetError("no training case has foreground voxels (every label map is all 0); check the "
                              "label files in labelsTr/ with `lightseg info` or `lightseg verify`")
        low, high = np.percentile(values, [0.5, 99.5])
        stats.append(
            ChannelStats(
                mean=float(values.mean()),
                std=float(values.std()),
                percentile_00_5=float(low),
                percentile_99_5=float(high),
                min=float(values.min()),
                max=float(values.max()),
            )
        )
    return tuple(stats)


def make_fingerprint(cases: Sequence[CaseFingerprint], num_channels: int) -> Fingerprint:
    """Combine case fingerprints (in any order) into the data set fingerprint, sorted by name."""
    ordered = tuple(sorted(cases, key=lambda c: c.name))
    if not ordered:
        raise DatasetError("the data set has no training cases; add cases to imagesTr/labelsTr")
    return Fingerprint(cases=ordered, intensity=pool_statistics(ordered, num_channels))
