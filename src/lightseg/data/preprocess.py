"""Apply a plan: crop to nonzero, normalise, resample; write the cache; undo it for predictions.

Cache layout (docs/formats.md)::

    CACHE/plan.json  CACHE/dataset.json
    CACHE/cases/{case}_image.npy       (C, X, Y, Z) float32 or float16
    CACHE/cases/{case}_label.npy       (X, Y, Z) uint8, raw label values
    CACHE/cases/{case}_locations.npz   int32 "class_{v}" (N, 3) sampled voxels of each label v
    CACHE/cases/{case}.json            properties, written last: the case is complete iff it exists,
                                       holds the current plan's cache key and the size and mtime
                                       of the raw files it was made from, as they are now
    CACHE/cases.json                   the data set's cases and folder: what training uses

The order of operations is nnU-Net's (crop, normalise, resample) so intensity statistics are
taken on the original voxels. Every file is written atomically and ``{case}.json`` last, so a
kill leaves finished cases intact and a rerun redoes only the rest. ``{case}.json`` also holds
the plan's :meth:`~lightseg.data.plan.Plan.cache_key`: after an edit of plan.json that changes
the arrays, every case is redone; after an edit of a raw file (a fixed label map, a replaced
scan), that case is redone. ``cases.json`` lists the data set's training cases when the cache
was last brought up to date, so a case removed from the data set is no longer trained on even
though its arrays stay in ``cases/``. The predictor uses :func:`preprocess_image` and
:func:`restore_to_original`, the same math without a label.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lightseg.data.dataset import Case, load_dataset
from lightseg.data.fingerprint import (
    BBox,
    bounding_box,
    case_seed,
    crop,
    fingerprint_case,
    full_box,
    load_case,
    make_fingerprint,
    nonzero_mask,
    channel_arrays,
)
from lightseg.data.intensity import percentile_scale, profile, zscore, zscore_regions
from lightseg.data.orientation import (
    CANONICAL,
    axis_codes,
    canonical_order,
    is_axis_codes,
    to_canonical,
)
from lightseg.data.parallel import map_progress
from lightseg.data.plan import Plan, check_plan_matches, load_plan, override, plan_dataset, save_plan
from lightseg.data.resample import resample_image, resample_label, resampled_shape
from lightseg.errors import DatasetError, ImageError, PlanError
from lightseg.io import (
    CACHE, atomic_write, check_output_folder, check_output_kind, read_json, remove_stale_temps, save_npy, voxel_spacing, write_json,
)
from lightseg.schema import check_fields

MANIFEST = "cases.json"
LOCATION_SAMPLES = 10_000  # voxels kept per foreground label value for foreground oversampling (nnU-Net)
MAX_ZOOM = 64.0  # per axis, either way: clinical data needs at most ~20x (10 mm slices to 0.5 mm)
MAX_VOXELS = 2**30  # a resampled case above 4 GiB per float32 channel is a wrong header, not a scan


@dataclass(frozen=True)
class CaseProperties:
    """Where a preprocessed case came from, enough to put a prediction back on its grid."""

    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    original_affine: tuple[tuple[float, ...], ...]
    crop_bbox: BBox
    shape_after_crop: tuple[int, int, int]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    classes_present: tuple[int, ...] = ()
    anisotropy_threshold: float = 3.0
    intensity_profile: tuple[tuple[float, ...], ...] = ()  # per channel, lightseg.data.intensity.profile
    reoriented_from: str = CANONICAL  # the input's axis codes when the plan turned it to RAS (lightseg.data.orientation)

    def to_json(self) -> dict[str, Any]:
        return {
            "original_shape": list(self.original_shape),
            "original_spacing": list(self.original_spacing),
            "original_affine": [list(row) for row in self.original_affine],
            "crop_bbox": [list(b) for b in self.crop_bbox],
            "shape_after_crop": list(self.shape_after_crop),
            "spacing": list(self.spacing),
            "shape": list(self.shape),
            "classes_present": list(self.classes_present),
            "anisotropy_threshold": self.anisotropy_threshold,
            "intensity_profile": [list(p) for p in self.intensity_profile],
            "reoriented_from": self.reoriented_from,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CaseProperties:
        return cls(
            original_shape=tuple(obj["original_shape"]),
            original_spacing=tuple(obj["original_spacing"]),
            original_affine=tuple(tuple(row) for row in obj["original_affine"]),
            crop_bbox=tuple(tuple(b) for b in obj["crop_bbox"]),  # type: ignore[arg-type]
            shape_after_crop=tuple(obj["shape_after_crop"]),
            spacing=tuple(obj["spacing"]),
            shape=tuple(obj["shape"]),
            classes_present=tuple(obj.get("classes_present", ())),
            anisotropy_threshold=float(obj.get("anisotropy_threshold", 3.0)),
            intensity_profile=tuple(tuple(p) for p in obj.get("intensity_profile", ())),
            reoriented_from=str(obj.get("reoriented_from", CANONICAL)),
        )  # type: ignore[arg-type]


def normalize(image: np.ndarray, plan: Plan, mask: np.ndarray | None) -> np.ndarray:
    """Normalise each channel in place by the plan's scheme; ``mask`` is the cropped nonzero mask.

    A z-scored (or percentile-scaled) channel takes its statistics inside the foreground when the
    plan's ``use_mask_for_norm`` says so, else over the whole image (:mod:`lightseg.data.intensity`).
    Training caches and prediction (:func:`preprocess_image`) both come through here.
    """
    return apply_normalization(image, plan, zscore_regions(image, plan.use_mask_for_norm, mask, plan.zscore_region))


def apply_normalization(image: np.ndarray, plan: Plan, regions: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`normalize` with the z-score regions already found (one mask per channel)."""
    for channel, norm, region, flag in zip(image, plan.normalization, regions, plan.use_mask_for_norm):
        if norm.scheme == "ct":
            assert norm.clip is not None and norm.mean is not None and norm.std is not None
            np.clip(channel, norm.clip[0], norm.clip[1], out=channel)
            channel -= norm.mean
            channel /= norm.std
        elif norm.scheme == "zscore":
            zscore(channel, region, zero_outside=flag and plan.zscore_region == "nonzero")
        elif norm.scheme == "percentile":
            assert norm.percentiles is not None
            percentile_scale(channel, region, norm.percentiles)
    return image


def preprocess_arrays(
    image: np.ndarray | Sequence[np.ndarray], label: np.ndarray | None, reference: nib.Nifti1Image, plan: Plan
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Turn (when the plan says ``reorient``), crop, normalise and resample one case given as
    arrays on ``reference``'s grid: ``image`` is ``(C, X, Y, Z)`` or its channels (prediction
    passes them unstacked: each is cropped before the one copy, no full-size stack is made).

    Returns the float32 image, the uint8 label (or ``None``) and the case's properties; the
    ``original_*`` properties describe the input's grid as given, before any turn.
    """
    if len(image) != len(plan.channel_names):
        raise ImageError(
            f"image has {len(image)} channels but the plan expects {len(plan.channel_names)} "
            f"({', '.join(plan.channel_names)}); pass one file per channel in that order"
        )
    original_spacing = voxel_spacing(reference)
    original_shape = image[0].shape
    codes = axis_codes(reference.affine) if plan.reorient else CANONICAL
    channels, spacing = [to_canonical(c, codes) for c in image], canonical_order(original_spacing, codes)
    label = None if label is None else to_canonical(label, codes)
    mask = nonzero_mask(channels) if plan.crop_to_nonzero else None
    bbox = bounding_box(mask) if mask is not None else full_box(channels[0].shape)
    image = np.stack([crop(c, bbox) for c in channels]).astype(np.float32, copy=False)
    regions = zscore_regions(image, plan.use_mask_for_norm, None if mask is None else crop(mask, bbox),
                             plan.zscore_region)
    apply_normalization(image, plan, regions)
    found = tuple(tuple(profile(channel, region)) for channel, region in zip(image, regions))
    shape_after_crop = image.shape[1:]
    shape = resampled_shape(shape_after_crop, spacing, plan.target_spacing)
    check_resampling(spacing, plan.target_spacing, shape, reference.get_filename() or "the image")
    image = resample_image(image, spacing, plan.target_spacing, shape, threshold=plan.anisotropy_threshold)
    classes: tuple[int, ...] = ()
    if label is not None:
        label = resample_label(crop(label, bbox), spacing, plan.target_spacing, shape, plan.anisotropy_threshold)
        classes = tuple(int(v) for v in np.unique(label) if v > 0)
    props = CaseProperties(
        original_shape=tuple(int(n) for n in original_shape),  # type: ignore[arg-type]
        original_spacing=original_spacing,  # type: ignore[arg-type]
        original_affine=tuple(tuple(float(v) for v in row) for row in np.asarray(reference.affine)),
        crop_bbox=bbox,
        shape_after_crop=tuple(int(n) for n in shape_after_crop),  # type: ignore[arg-type]
        spacing=plan.target_spacing,
        shape=tuple(int(n) for n in shape),  # type: ignore[arg-type]
        classes_present=classes,
        anisotropy_threshold=plan.anisotropy_threshold,
        intensity_profile=found,
        reoriented_from=codes,
    )
    return image, label, props


def check_resampling(spacing: Sequence[float], target: Sequence[float], shape: Sequence[int], where: str) -> None:
    """Refuse a zoom beyond ``MAX_ZOOM`` per axis or a grid beyond ``MAX_VOXELS``: such a case has
    a wrong spacing in its header (or the plan is for other data), and resampling it would fill
    the memory or shrink the scan to a few voxels instead of failing clearly."""
    zoom = [s / t for s, t in zip(spacing, target)]
    if any(not 1 / MAX_ZOOM <= z <= MAX_ZOOM for z in zoom) or math.prod(shape) > MAX_VOXELS:
        raise ImageError(
            f"{where}: spacing {[round(s, 6) for s in spacing]} mm resampled to the plan's target spacing "
            f"{list(target)} mm gives a grid of {list(shape)} voxels (zoom {[round(z, 4) for z in zoom]}); "
            "the header's spacing is probably wrong (fix its affine or pixdim), or the plan was made for other data"
        )


def preprocess_image(
    images: Sequence[nib.Nifti1Image] | np.ndarray, plan: Plan, affine: np.ndarray | None = None
) -> tuple[np.ndarray, CaseProperties]:
    """Preprocess a new case for prediction: one NIfTI per channel, or a ``(C, X, Y, Z)`` array
    with its 4x4 ``affine``. Returns the float32 ``(C, X', Y', Z')`` array and its properties."""
    if isinstance(images, np.ndarray):
        if affine is None:
            raise ImageError("an image array needs its 4x4 affine (pass affine=...)")
        array = np.asarray(images, dtype=np.float32)
        if array.ndim != 4:
            raise ImageError(f"an image array must be (C, X, Y, Z), got shape {array.shape}")
        reference = nib.Nifti1Image(array[0], np.asarray(affine, dtype=np.float64))
    else:
        array, reference = channel_arrays(images, "input image"), images[0]
    image, _, props = preprocess_arrays(array, None, reference, plan)
    return image, props


def sample_locations(label: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Up to 10,000 voxel coordinates of each foreground label value, seeded (nnU-Net style)."""
    rng = np.random.default_rng(seed)
    flat = label.reshape(-1)
    out = {}
    for value in np.unique(flat):
        if value == 0:
            continue
        where = np.flatnonzero(flat == value)
        if len(where) > LOCATION_SAMPLES:
            where = np.sort(rng.choice(where, LOCATION_SAMPLES, replace=False))
        out[f"class_{int(value)}"] = np.stack(np.unravel_index(where, label.shape), axis=1).astype(np.int32)
    return out


def case_paths(cases_dir: Path, name: str) -> dict[str, Path]:
    return {
        "image": cases_dir / f"{name}_image.npy",
        "label": cases_dir / f"{name}_label.npy",
        "locations": cases_dir / f"{name}_locations.npz",
        "properties": cases_dir / f"{name}.json",
    }


def source_stamp(case: Case) -> dict[str, list[int] | None]:
    """Size and mtime (ns) of each raw file a case is made from, by file name (so a data set moved
    with its timestamps kept stays fresh); ``None`` for a missing file."""
    stamp: dict[str, list[int] | None] = {}
    for path in (*case.images, *([case.label] if case.label is not None else [])):
        try:
            info = path.stat()
            stamp[path.name] = [info.st_size, info.st_mtime_ns]
        except OSError:
            stamp[path.name] = None
    return stamp


def is_complete(cases_dir: Path, name: str, plan: Plan, sources: dict[str, Any] | None = None) -> bool:
    """A case is done iff its ``{case}.json`` exists, was written under this plan's cache key and,
    given ``sources`` (:func:`source_stamp` now), from raw files of that size and mtime."""
    path = case_paths(cases_dir, name)["properties"]
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (isinstance(stored, dict) and stored.get("plan_key") == plan.cache_key()
            and (sources is None or stored.get("sources") == sources))


def _changed_sources(cache: Path, plan: Plan) -> list[str]:
    """Cases of the cache's data set (as ``cases.json`` records it) that were added, removed or
    edited since preprocessing; [] when the data set folder is not reachable from here."""
    try:
        manifest = json.loads((cache / MANIFEST).read_text())
        dataset = load_dataset(manifest["dataset"])
    except (OSError, ValueError, KeyError, TypeError, DatasetError):
        return []
    names = {case.name for case in dataset.training}
    changed = sorted(names ^ set(manifest.get("cases", [])))
    return changed + [case.name for case in dataset.training
                      if case.name not in changed and not is_complete(cache / "cases", case.name, plan, source_stamp(case))]


def check_cache(cache_dir: str | Path) -> Plan:
    """The cache's validated plan; :class:`PlanError` if a case was written under other plan values
    (plan.json edited after preprocessing): training on it would silently mix two preprocessings."""
    cache = Path(cache_dir)
    plan = load_plan(cache / "plan.json")
    names = sorted(p.stem for p in (cache / "cases").glob("*.json"))
    stale = [name for name in names if not is_complete(cache / "cases", name, plan)]
    if stale:
        raise PlanError(
            f"{cache}: {len(stale)} of {len(names)} cases ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}) "
            f"were preprocessed under other values than {cache / 'plan.json'} (was it edited?); run `lightseg "
            f"preprocess DATASET -o {cache}` to redo them, or train on the raw data set"
        )
    changed = _changed_sources(cache, plan)
    if changed:
        raise PlanError(
            f"{cache}: the raw data set changed since preprocessing ({len(changed)} case(s) added, removed or edited: "
            f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); run `lightseg preprocess DATASET -o "
            f"{cache}` to bring the cache up to date, or train on the raw data set"
        )
    return plan


def preprocess_case(case: Case, plan: Plan, cases_dir: Path) -> None:
    """Preprocess one training case into ``cases_dir``; ``{case}.json`` is written last."""
    sources = source_stamp(case)  # before reading: an edit during the read makes the case stale
    image, label, reference = load_case(case)
    unknown = sorted(set(np.unique(label).tolist()) - set(plan.label_values))
    if unknown:
        raise ImageError(
            f"{case.label}: label values {unknown} are not in the plan's label_values "
            f"{list(plan.label_values)}; run `lightseg verify` and fix the label or dataset.json"
        )
    image, label, props = preprocess_arrays(image, label, reference, plan)
    assert label is not None
    paths = case_paths(cases_dir, case.name)
    save_npy(paths["image"], image.astype(plan.image_dtype, copy=False))
    save_npy(paths["label"], label)
    with atomic_write(paths["locations"], "wb") as handle:
        np.savez(handle, **sample_locations(label, case_seed(case.name)))
    write_json(paths["properties"], {**props.to_json(), "plan_key": plan.cache_key(), "sources": sources})


def default_workers() -> int:
    """Two processes at most: each holds a few full volumes in memory, and 2 cores is the target."""
    return min(2, os.cpu_count() or 1)


def preprocess_dataset(
    dataset_dir: str | Path,
    cache_dir: str | Path,
    workers: int | None = None,
    patch_size: Sequence[int] | None = None,
    target_spacing: Sequence[float] | None = None,
    image_dtype: str | None = None,
    progress: bool = True,
    normalization: str | None = None,
) -> Plan:
    """Fingerprint, plan and preprocess a raw data set into ``cache_dir``; returns the plan.

    An existing ``cache_dir/plan.json`` is reused (so edits stick) after checking it matches
    the data set. ``patch_size``, ``target_spacing``, ``image_dtype`` and ``normalization`` (one
    scheme for every channel, e.g. ``"percentile"``) override the plan, new or existing. Complete
    cases are skipped; cases written under other array-changing plan values are redone.
    """
    dataset = load_dataset(dataset_dir)
    cache = check_output_folder(cache_dir)
    check_output_kind(cache, CACHE, "the cache")
    plan_path = cache / "plan.json"
    workers = workers or default_workers()
    if plan_path.is_file():
        plan = load_plan(plan_path)
        check_plan_matches(plan, dataset.spec, str(plan_path))
        plan = override(plan, target_spacing, patch_size, image_dtype, normalization)
    else:
        cases = map_progress(fingerprint_case, dataset.training, workers, "fingerprint", progress)
        fingerprint = make_fingerprint(cases, dataset.spec.num_channels)
        plan = plan_dataset(dataset.spec, fingerprint, target_spacing, patch_size, image_dtype or "float32",
                            normalization=normalization)
    save_plan(plan, plan_path)
    with atomic_write(cache / "dataset.json", "wb") as handle:
        handle.write((dataset.root / "dataset.json").read_bytes())
    cases_dir = cache / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cases_dir)  # left by a killed run; atomic writes never expose them
    todo = [case for case in dataset.training if not is_complete(cases_dir, case.name, plan, source_stamp(case))]
    map_progress(partial(preprocess_case, plan=plan, cases_dir=cases_dir), todo, workers, "preprocess", progress)
    write_json(cache / MANIFEST, {"dataset": str(dataset.root.resolve()), "cases": [c.name for c in dataset.training]})
    return plan


def load_case_properties(cache_dir: str | Path, name: str) -> CaseProperties:
    """Read ``CACHE/cases/{name}.json``; :class:`PlanError` if the case is not preprocessed."""
    path = case_paths(Path(cache_dir) / "cases", name)["properties"]
    if not path.is_file():
        raise PlanError(f"{path}: case {name!r} is not preprocessed; run `lightseg preprocess` again")
    obj = read_json(path, PlanError, "run `lightseg preprocess` again")
    obj = {k: v for k, v in obj.items() if k not in ("plan_key", "sources")} if isinstance(obj, dict) else obj
    check_fields(CaseProperties, obj, str(path), PlanError)
    if not is_axis_codes(obj.get("reoriented_from", CANONICAL)):
        raise PlanError(f"{path}: 'reoriented_from' must be axis codes such as \"LSA\"; run `lightseg preprocess` again")
    return CaseProperties.from_json(obj)
