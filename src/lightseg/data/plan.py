"""The preprocessing plan: target spacing, normalisation, crop, patch size, as editable JSON.

:func:`plan_dataset` turns a :class:`~lightseg.data.fingerprint.Fingerprint` into a
:class:`Plan` with nnU-Net's rules (Isensee et al., Nat. Methods 2021, "rule-based
parameters"); it reads no files, so each rule is tested on plain numbers. ``plan.json`` is the
plan's JSON form: a user may edit it, and :func:`load_plan` checks every key and names the
wrong one in a :class:`~lightseg.errors.PlanError`. docs/preprocessing.md lists the keys.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightseg.data.dataset import DatasetSpec
from lightseg.data.fingerprint import Fingerprint
from lightseg.data.intensity import PERCENTILE_RANGE, summarize_profiles, use_mask_for_norm_rule
from lightseg.data.resample import ANISOTROPY_THRESHOLD, RESAMPLING_VERSION, reaches_threshold, resampled_shape
from lightseg.errors import PlanError
from lightseg.io import write_json

FORMAT_VERSION = 1
SCHEMES = ("ct", "zscore", "percentile", "none")
CHOSEN_SCHEMES = ("zscore", "percentile", "none")  # --normalization: the schemes that need no data-set statistics
ZSCORE_REGIONS = ("foreground", "nonzero")  # lightseg.data.intensity; "nonzero": plans written before the rule
IMAGE_DTYPES = ("float32", "float16")
PATCH_MULTIPLE = 16  # four 2x poolings in every axis
PATCH_MAX = 128
ANISOTROPIC_PERCENTILE = 10.0
SPACING_DECIMALS = 5  # NIfTI stores float32: 0.800000011920929 is written as 0.8


@dataclass(frozen=True)
class ChannelNormalization:
    """How one channel is normalised.

    ``ct``: clip to ``clip`` (the data set's foreground 0.5/99.5 percentiles), then subtract the
    foreground ``mean`` and divide by its ``std`` (both over the whole data set).
    ``zscore``: per case, over the nonzero region when cropping to nonzero, else the whole image.
    ``percentile``: per case, clip to the case's own ``percentiles`` and scale that range to [0, 1]
    (:func:`lightseg.data.intensity.percentile_scale`).
    ``none``: unchanged.
    """

    scheme: str
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    percentiles: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        if self.scheme == "percentile":
            return {"scheme": "percentile", "percentiles": list(self.percentiles or PERCENTILE_RANGE)}
        if self.scheme != "ct":
            return {"scheme": self.scheme}
        return {"scheme": "ct", "clip": list(self.clip or ()), "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class Plan:
    """Everything preprocessing needs; ``median_shape`` is informational (shown, not used)."""

    dataset_name: str
    channel_names: tuple[str, ...]
    label_values: tuple[int, ...]
    target_spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    normalization: tuple[ChannelNormalization, ...]
    crop_to_nonzero: bool = True
    image_dtype: str = "float32"
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD
    median_shape: tuple[int, int, int] | None = None
    format_version: int = FORMAT_VERSION
    use_mask_for_norm: tuple[bool, ...] = ()  # per channel; () = z-score inside the nonzero mask iff cropping
    intensity_profile: tuple[dict[str, list[float]] | None, ...] = ()  # per channel; informs, never changes arrays
    zscore_region: str = "nonzero"  # plan_dataset writes "foreground"; absent in older plans = their behaviour
    reorient: bool = False  # turn cases to RAS voxel order (lightseg.data.orientation); plan_dataset writes true

    def __post_init__(self) -> None:
        if not self.use_mask_for_norm:  # plans written before the rule: the old behaviour
            flags = tuple(self.crop_to_nonzero and n.scheme == "zscore" for n in self.normalization)
            object.__setattr__(self, "use_mask_for_norm", flags)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["normalization"] = [n.to_json() for n in self.normalization]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def cache_key(self) -> str:
        """Digest of the keys that change the cached arrays (not ``patch_size``), and of the
        resampling code's version: a case written under another key is stale and is preprocessed again.
        ``reorient`` counts only when true, so caches written before the key existed stay fresh."""
        keys = ("channel_names", "label_values", "target_spacing", "normalization", "crop_to_nonzero",
                "image_dtype", "anisotropy_threshold", "use_mask_for_norm", "zscore_region")
        turned = {"reorient": True} if self.reorient else {}
        payload = json.dumps({**{k: self.to_json()[k] for k in keys}, **turned, "resampling": RESAMPLING_VERSION},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def target_spacing_rule(
    spacings: np.ndarray, shapes: np.ndarray, threshold: float = ANISOTROPY_THRESHOLD
) -> tuple[float, float, float]:
    """Median spacing per axis, except for a strongly anisotropic axis (nnU-Net's rule).

    If the coarsest median spacing is ``>= threshold`` times each other axis's median spacing
    (:func:`~lightseg.data.resample.reaches_threshold`, the resampler's test) and that axis is also short (median size times ``threshold`` below every other axis's
    median size), its target is the 10th percentile of its spacings, not the median: a finer
    target keeps more of the thin-slice cases' detail. It never goes below the other axes'
    coarsest median spacing.
    """
    target = np.median(spacings, axis=0)
    sizes = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    coarsest_other = max(target[a] for a in others)
    if reaches_threshold(target[worst], coarsest_other, threshold) and sizes[worst] * threshold < min(sizes[a] for a in others):
        target[worst] = max(np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE), coarsest_other)
    return tuple(float(s) for s in target)  # type: ignore[return-value]


def default_patch_size(median_shape: Sequence[int]) -> tuple[int, int, int]:
    """Each axis: the median shape rounded (half up) to a multiple of 16, at least 16, at most 128."""
    return tuple(
        min(PATCH_MAX, max(PATCH_MULTIPLE, PATCH_MULTIPLE * math.floor(n / PATCH_MULTIPLE + 0.5)))
        for n in median_shape
    )  # type: ignore[return-value]


def channel_normalization(name: str, fingerprint: Fingerprint, channel: int, scheme: str | None = None) -> ChannelNormalization:
    """``CT`` -> global clip + z-score; ``noNorm`` -> none; any other name -> per-case z-score.

    ``scheme`` (one of :data:`CHOSEN_SCHEMES`, ``lightseg preprocess --normalization``) replaces the
    choice by name."""
    if scheme is not None:
        return chosen_normalization(scheme)
    if name.lower() == "ct":
        stats = fingerprint.intensity[channel]
        return ChannelNormalization(
            "ct", (stats.percentile_00_5, stats.percentile_99_5), stats.mean, max(stats.std, 1e-8)
        )
    if name.lower() == "nonorm":
        return ChannelNormalization("none")
    return ChannelNormalization("zscore")


def chosen_normalization(scheme: str) -> ChannelNormalization:
    """A scheme of :data:`CHOSEN_SCHEMES` with its default settings (no data-set statistics needed)."""
    return ChannelNormalization(scheme, percentiles=PERCENTILE_RANGE if scheme == "percentile" else None)


def intensity_profiles(fingerprint: Fingerprint, use_mask: Sequence[bool], schemes: Sequence[str]) -> tuple:
    """Per channel, the training cases' normalised-intensity profile (z-scored channels only)."""
    if not fingerprint.cases or not all(c.norm_profiles for c in fingerprint.cases):
        return ()
    out = []
    for channel, (flag, scheme) in enumerate(zip(use_mask, schemes)):
        per_case = [[c.norm_profiles[flag][channel]] for c in fingerprint.cases]
        out.append(summarize_profiles(per_case)[0] if scheme == "zscore" else None)
    return tuple(out)


def plan_dataset(
    spec: DatasetSpec,
    fingerprint: Fingerprint,
    target_spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    image_dtype: str = "float32",
    crop_to_nonzero: bool = True,
    normalization: str | None = None,
) -> Plan:
    """The plan for a data set from its fingerprint; explicit arguments override the rules
    (``normalization``: one of :data:`CHOSEN_SCHEMES` for every channel)."""
    _check_chosen_scheme(normalization)
    if target_spacing is None:
        target_spacing = target_spacing_rule(fingerprint.spacings, fingerprint.shapes_after_crop)
    spacing = tuple(round(float(s), SPACING_DECIMALS) for s in target_spacing)
    shapes = [resampled_shape(c.shape_after_crop, c.spacing, spacing) for c in fingerprint.cases]
    median_shape = tuple(int(round(n)) for n in np.median(np.array(shapes), axis=0))
    norms = tuple(channel_normalization(name, fingerprint, c, normalization) for c, name in enumerate(spec.channel_names))
    schemes = [n.scheme for n in norms]
    use_mask = use_mask_for_norm_rule(
        np.array([c.shape for c in fingerprint.cases]), fingerprint.shapes_after_crop, schemes, crop_to_nonzero
    )
    plan = Plan(
        dataset_name=spec.name,
        channel_names=spec.channel_names,
        label_values=spec.label_values,
        target_spacing=spacing,  # type: ignore[arg-type]
        patch_size=tuple(patch_size) if patch_size else default_patch_size(median_shape),  # type: ignore[arg-type]
        normalization=norms,
        crop_to_nonzero=crop_to_nonzero,
        image_dtype=image_dtype,
        median_shape=median_shape,  # type: ignore[arg-type]
        use_mask_for_norm=use_mask,
        intensity_profile=intensity_profiles(fingerprint, use_mask, schemes),
        zscore_region="foreground",
        reorient=True,
    )
    return parse_plan(plan.to_json(), "the computed plan")


def check_plan_matches(plan: Plan, spec: DatasetSpec, source: str) -> None:
    """Raise :class:`PlanError` if ``plan`` was made for other channels or labels than ``spec``."""
    for key, planned, actual in (
        ("channel_names", plan.channel_names, spec.channel_names),
        ("label_values", plan.label_values, spec.label_values),
    ):
        if tuple(planned) != tuple(actual):
            raise PlanError(
                f"{source}: '{key}' is {list(planned)} but the data set has {list(actual)}; the cache "
                "belongs to another data set: use a new cache folder, or delete plan.json to plan again"
            )


def override(
    plan: Plan,
    target_spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    image_dtype: str | None = None,
    normalization: str | None = None,
) -> Plan:
    """``plan`` with the given values replaced, validated like an edited plan.json.

    ``normalization`` sets every channel's scheme. A channel becomes ``zscore`` only if it already
    is: whether it z-scores inside a mask is decided from the fingerprint (a :class:`PlanError` says
    to plan again); a channel changed to another scheme takes no mask and no intensity profile."""
    _check_chosen_scheme(normalization)
    changes: dict[str, Any] = {}
    if normalization and any(n.scheme != normalization for n in plan.normalization):
        if normalization == "zscore":
            raise PlanError("normalization 'zscore': this plan normalises a channel otherwise, and the z-score's "
                            "mask rule needs the data set's fingerprint; preprocess into a new cache folder, or "
                            "delete its plan.json, to plan z-scores again")
        keep = [n.scheme == normalization for n in plan.normalization]
        changes["normalization"] = [
            (n if same else chosen_normalization(normalization)).to_json() for n, same in zip(plan.normalization, keep)
        ]
        changes["use_mask_for_norm"] = [flag and same for flag, same in zip(plan.use_mask_for_norm, keep)]
        if plan.intensity_profile:
            changes["intensity_profile"] = [p if same else None for p, same in zip(plan.intensity_profile, keep)]
    if image_dtype:
        changes["image_dtype"] = image_dtype
    if target_spacing:
        changes["target_spacing"] = [float(s) for s in target_spacing]
    if patch_size:
        changes["patch_size"] = [int(n) for n in patch_size]
    if not changes:
        return plan
    return parse_plan({**plan.to_json(), **changes}, "the command-line override")


def _check_chosen_scheme(scheme: str | None) -> None:
    if scheme is not None and scheme not in CHOSEN_SCHEMES:
        raise PlanError(f"normalization {scheme!r} cannot be chosen for every channel; choose one of: "
                        f"{', '.join(CHOSEN_SCHEMES)} (ct takes its statistics from channels named CT)")


def save_plan(plan: Plan, path: str | Path) -> None:
    write_json(path, plan.to_json())


def load_plan(path: str | Path) -> Plan:
    """Read and validate ``plan.json``."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: plan.json not found; run `lightseg preprocess DATASET -o CACHE` first")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise PlanError(f"{path}: not valid JSON ({exc}); fix it or delete it to plan again") from exc
    return parse_plan(obj, str(path))


_REQUIRED = ("dataset_name", "channel_names", "label_values", "target_spacing", "patch_size", "normalization")
_OPTIONAL = ("crop_to_nonzero", "image_dtype", "anisotropy_threshold", "median_shape", "format_version",
             "use_mask_for_norm", "intensity_profile", "zscore_region", "reorient")


def parse_plan(obj: Any, source: str) -> Plan:
    """Validate a parsed plan and build a :class:`Plan`; each error names the key."""

    def fail(key: str, what: str) -> PlanError:
        return PlanError(f"{source}: '{key}' {what}; fix it, or delete plan.json to plan again")

    if not isinstance(obj, dict):
        raise PlanError(f"{source}: top level must be a JSON object")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise fail(unknown[0], f"is not a plan key (known keys: {', '.join(_REQUIRED + _OPTIONAL)})")
    for key in _REQUIRED:
        if key not in obj:
            raise fail(key, "is missing")
    version = obj.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise fail("format_version", f"is {version!r}, this lightseg reads version {FORMAT_VERSION}")
    if not isinstance(obj["dataset_name"], str):
        raise fail("dataset_name", "must be a string")
    channels = obj["channel_names"]
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
        raise fail("channel_names", "must be a non-empty list of strings")
    labels = obj["label_values"]
    if not _int_list(labels, 0, 255) or 0 not in labels or sorted(set(labels)) != labels:
        raise fail("label_values", "must be a sorted list of distinct integers 0..255 including 0")
    spacing = obj["target_spacing"]
    if not _number_list(spacing, 3) or not all(s > 0 for s in spacing):
        raise fail("target_spacing", "must be a list of 3 positive numbers (mm, voxel axis order)")
    patch = obj["patch_size"]
    if not _int_list(patch, 1, 4096) or len(patch) != 3:
        raise fail("patch_size", "must be a list of 3 positive integers (voxels)")
    median = obj.get("median_shape")
    if median is not None and (not _int_list(median, 1, 1 << 20) or len(median) != 3):
        raise fail("median_shape", "must be a list of 3 positive integers or null")
    crop_flag = obj.get("crop_to_nonzero", True)
    if not isinstance(crop_flag, bool):
        raise fail("crop_to_nonzero", "must be true or false")
    dtype = obj.get("image_dtype", "float32")
    if dtype not in IMAGE_DTYPES:
        raise fail("image_dtype", f"must be one of {list(IMAGE_DTYPES)}")
    threshold = obj.get("anisotropy_threshold", ANISOTROPY_THRESHOLD)
    if not _number_list([threshold], 1) or threshold < 1:
        raise fail("anisotropy_threshold", "must be a number >= 1")
    norms = obj["normalization"]
    if not isinstance(norms, list) or len(norms) != len(channels):
        raise fail("normalization", f"must be a list with one entry per channel ({len(channels)})")
    use_mask = obj.get("use_mask_for_norm", [])
    if not isinstance(use_mask, list) or not all(isinstance(v, bool) for v in use_mask) or len(use_mask) not in (0, len(channels)):
        raise fail("use_mask_for_norm", f"must be a list of true/false, one per channel ({len(channels)})")
    region = obj.get("zscore_region", "nonzero")
    if region not in ZSCORE_REGIONS:
        raise fail("zscore_region", f"must be one of {list(ZSCORE_REGIONS)}")
    reorient = obj.get("reorient", False)
    if not isinstance(reorient, bool):
        raise fail("reorient", "must be true or false")
    profiles = obj.get("intensity_profile", [])
    if not isinstance(profiles, list) or len(profiles) not in (0, len(channels)) or not all(
        p is None or _profile_ok(p) for p in profiles
    ):
        raise fail("intensity_profile", "must be a list with one {quantiles, mean, std} object (or null) per channel")
    return Plan(
        dataset_name=obj["dataset_name"],
        channel_names=tuple(channels),
        label_values=tuple(labels),
        target_spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        patch_size=tuple(patch),  # type: ignore[arg-type]
        normalization=tuple(_parse_normalization(n, i, fail) for i, n in enumerate(norms)),
        crop_to_nonzero=crop_flag,
        image_dtype=dtype,
        anisotropy_threshold=float(threshold),
        median_shape=None if median is None else tuple(median),  # type: ignore[arg-type]
        use_mask_for_norm=tuple(use_mask),
        intensity_profile=tuple(profiles),
        zscore_region=region,
        reorient=reorient,
    )


def _profile_ok(entry: Any) -> bool:
    return (isinstance(entry, dict) and set(entry) == {"quantiles", "mean", "std"}
            and all(_number_list(entry[k], len(entry["quantiles"])) for k in ("quantiles", "mean", "std")))


def _parse_normalization(entry: Any, index: int, fail: Any) -> ChannelNormalization:
    key = f"normalization[{index}]"
    if not isinstance(entry, dict) or entry.get("scheme") not in SCHEMES:
        raise fail(key, f"must be an object with 'scheme' one of {list(SCHEMES)}")
    scheme = entry["scheme"]
    allowed = {"ct": {"scheme", "clip", "mean", "std"}, "percentile": {"scheme", "percentiles"}}.get(scheme, {"scheme"})
    extra = sorted(set(entry) - allowed)
    if extra:
        raise fail(f"{key}.{extra[0]}", f"is not used by scheme {scheme!r}")
    if scheme == "percentile":
        bounds = entry.get("percentiles", list(PERCENTILE_RANGE))
        if not _number_list(bounds, 2) or not 0 <= bounds[0] < bounds[1] <= 100:
            raise fail(f"{key}.percentiles", "must be [low, high] with 0 <= low < high <= 100 (the paper's: [0.5, 99.5])")
        return ChannelNormalization("percentile", percentiles=(float(bounds[0]), float(bounds[1])))
    if scheme != "ct":
        return ChannelNormalization(scheme)
    clip, mean, std = entry.get("clip"), entry.get("mean"), entry.get("std")
    if not _number_list(clip, 2) or clip[0] >= clip[1]:
        raise fail(f"{key}.clip", "must be [low, high] with low < high")
    if not _number_list([mean], 1):
        raise fail(f"{key}.mean", "must be a number")
    if not _number_list([std], 1) or std <= 0:
        raise fail(f"{key}.std", "must be a positive number")
    return ChannelNormalization("ct", (float(clip[0]), float(clip[1])), float(mean), float(std))


def _number_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _int_list(value: Any, low: int, high: int) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in value
    )

