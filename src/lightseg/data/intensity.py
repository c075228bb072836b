"""Where z-score statistics are taken (nnU-Net's ``use_mask_for_norm``), and the training intensity profile.

**The rule** (Isensee et al., Nat. Methods 2021; nnU-Net v2's ``determine_whether_to_use_mask_for_norm``):
a z-scored channel is normalised inside a foreground mask only when cropping to the nonzero region
shrinks the median training case below 3/4 of its voxels, i.e. when the data set's background is
exactly 0 (skull-stripped brains, zero-padded scans). Otherwise the whole image is z-scored. The
decision is made once per data set and kept in the plan (``use_mask_for_norm``, one flag per channel),
so training and prediction run the same function.

**The mask**, when the flag is on, is meant to be the same voxels whatever the background: the
nonzero voxels above a noise floor (:func:`noise_floor`: two-class Otsu on log intensities, kept only
when it separates a much darker class), holes filled. Its mean and standard deviation then z-score
every voxel. So a case, its twin with the background set to 0, and its twin cut by a generous
skull-strip mask are normalised with (nearly) the same brain statistics: exactly, when the floor
separates noise from tissue (tests/test_demo_normalisation.py). nnU-Net itself would z-score a
noisy-background case over the whole volume, background included, and the same brain would reach
the network shifted by about two standard deviations.

**Choice, unlike nnU-Net**: nnU-Net sets the voxels outside the mask to 0 after the z-score, which
is the brain's mean intensity: a skull-stripped background then looks like grey matter, and unlike a
noisy background (about -2). Here the background keeps the affine map like every voxel (an exact 0
becomes ``-mean/std``, about -2.5 for a T1 brain), darker than every tissue as in the raw image, and
next to where a noisy background lands. Measured on the demo at 456 steps: held-out CSF Dice 0.47
with nnU-Net's convention, 0.69 with this one (docs/demo.md). The plan says which it uses
(``zscore_region``: ``"foreground"`` for new plans; ``"nonzero"``, the nonzero mask with the rest set
to 0, for plans written before, so models trained on them are fed as they were trained).

**Percentile scaling** (:func:`percentile_scale`, plan scheme ``"percentile"``; LightMedSeg's ACDC
setting, specs/lightmedseg.md section 5): per case and channel, clip to the channel's own
:data:`PERCENTILE_RANGE` percentiles (0.5 and 99.5 unless the plan says otherwise) and map that range
linearly onto [0, 1]. Choice where the paper is silent: the percentiles are taken over the same voxels
a z-score would use (the whole cropped image unless ``use_mask_for_norm`` is on), every voxel is
mapped alike, and a constant channel becomes all 0. The map depends only on the case's own
percentiles, so a scan and its intensity-rescaled copy (``x * a + b``, ``a > 0``) give the same array.

**The profile**: the quantiles :data:`PROFILE_QUANTILES` of the normalised values inside that region,
per training case; the plan keeps their mean and spread over the cases, and prediction warns
(:class:`OutOfDistributionWarning`) when a case's quantiles fall far outside them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

NORM_MASK_SHRINK = 0.75  # nnU-Net: median (voxels after crop / voxels before) below this -> mask for norm
PROFILE_QUANTILES = (5, 25, 50, 75, 95)
PROFILE_SIGMAS = 4.0  # a quantile this many training standard deviations off is out of distribution ...
PROFILE_MIN_GAP = 0.35  # ... and at least this far (z units), so a very uniform training set does not cry wolf
OTSU_BINS = 256
PERCENTILE_RANGE = (0.5, 99.5)  # the percentile scheme's default clip (specs/lightmedseg.md section 5)
FLOOR_RATIO = 0.2  # an Otsu split is background/tissue only if the lower class is this much darker


class OutOfDistributionWarning(UserWarning):
    """A case's normalised intensities differ from every training case's: its prediction is suspect."""


def use_mask_for_norm_rule(
    shapes: np.ndarray, shapes_after_crop: np.ndarray, schemes: Sequence[str], crop_to_nonzero: bool
) -> tuple[bool, ...]:
    """One flag per channel: z-score inside the foreground mask (see the module docstring)."""
    if not crop_to_nonzero or len(shapes) == 0:
        return tuple(False for _ in schemes)
    relative = np.prod(np.asarray(shapes_after_crop, np.float64), axis=1) / np.prod(np.asarray(shapes, np.float64), axis=1)
    shrinks = float(np.median(relative)) < NORM_MASK_SHRINK
    return tuple(shrinks and scheme == "zscore" for scheme in schemes)


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Two-class Otsu threshold (largest between-class variance) of ``values`` on a histogram."""
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    p = hist / max(hist.sum(), 1)
    omega, mu = np.cumsum(p), np.cumsum(p * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def noise_floor(channel: np.ndarray, where: np.ndarray) -> float | None:
    """The intensity below which ``channel``'s voxels in ``where`` are background, or None if none are.

    Two-class Otsu on the log of the positive values: in log space the split falls between a noise
    floor and the darkest tissue (on the intensities themselves it would split dark tissue from
    bright). It is accepted as a floor only when the lower class is far darker than the upper
    (mean ratio below :data:`FLOOR_RATIO`): in a clean skull-stripped brain the split lands between
    tissues (CSF against GM/WM, a ratio of about 0.4), and no voxel is dropped.
    """
    values = channel[where]
    values = values[values > 0]
    if values.size < 2:
        return None
    threshold = float(np.exp(otsu_threshold(np.log(values))))
    low, high = values[values <= threshold], values[values > threshold]
    if not low.size or not high.size or low.mean() >= FLOOR_RATIO * high.mean():
        return None
    return threshold


def normalization_region(image: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """The voxels whose statistics z-score the image: ``nonzero`` above each channel's
    :func:`noise_floor` (any channel), holes filled; ``nonzero`` itself when no channel has a floor.

    ``image`` is ``(C, X, Y, Z)``, ``nonzero`` its filled nonzero mask (both cropped alike). A noisy
    background, and the dark rim a generous skull-strip mask keeps, thus do not move the statistics.
    """
    from lightseg.data.fingerprint import nonzero_mask

    floors = [noise_floor(channel, nonzero) for channel in image]
    if all(floor is None for floor in floors):
        return nonzero
    above = np.zeros(nonzero.shape, bool)
    for channel, floor in zip(image, floors):
        above |= channel > floor if floor is not None else nonzero
    region = nonzero_mask(above[None]) & nonzero
    return region if region.any() else nonzero


def zscore_regions(
    image: np.ndarray, use_mask: Sequence[bool], nonzero: np.ndarray | None, kind: str = "foreground"
) -> list[np.ndarray]:
    """Per channel, the z-score region if its ``use_mask`` flag is on, else the whole image.

    ``kind`` is the plan's ``zscore_region``: ``"foreground"`` (:func:`normalization_region`) or
    ``"nonzero"`` (the nonzero mask itself: plans written before the rule). ``nonzero`` (the filled
    nonzero mask, cropped like ``image``) is computed when not given.
    """
    from lightseg.data.fingerprint import nonzero_mask

    whole = np.ones(image.shape[1:], bool)
    masked = None
    if any(use_mask):
        nonzero = nonzero if nonzero is not None else nonzero_mask(image)
        masked = nonzero if kind == "nonzero" else normalization_region(image, nonzero)
    return [masked if flag and masked is not None else whole for flag in use_mask]


def zscore(channel: np.ndarray, region: np.ndarray, zero_outside: bool = False) -> None:
    """Z-score all of ``channel`` in place with the statistics of ``region`` (the whole channel if empty).

    Every voxel gets the same affine map, so the background stays darker than the tissue it was
    darker than: an exact-zero background becomes ``-mean/std`` and a noisy one lands next to it.
    ``zero_outside`` sets the voxels outside ``region`` to 0 instead (nnU-Net; plans written before
    the rule, whose models were trained so).
    """
    values = channel[region] if region.any() else channel.ravel()
    mean, std = float(values.mean()), max(float(values.std()), 1e-8)
    channel -= mean
    channel /= std
    if zero_outside and region.any():
        channel[~region] = 0


def percentile_scale(channel: np.ndarray, region: np.ndarray, percentiles: Sequence[float] = PERCENTILE_RANGE) -> None:
    """Map all of ``channel`` in place so that its ``percentiles`` (low, high) inside ``region`` (the
    whole channel if empty) become 0 and 1, clipping beyond; a range of width 0 gives all 0."""
    values = channel[region] if region.any() else channel.ravel()
    low, high = sorted_percentiles(values, percentiles)
    channel -= low
    if high > low:
        channel /= high - low
    np.clip(channel, 0.0, 1.0, out=channel)  # after scaling: exactly [0, 1] despite float32 rounding


def profile(channel: np.ndarray, region: np.ndarray) -> list[float]:
    """The quantiles :data:`PROFILE_QUANTILES` of a normalised channel inside ``region``."""
    values = channel[region] if region.any() else channel.ravel()
    return sorted_percentiles(values, PROFILE_QUANTILES)


def sorted_percentiles(values: np.ndarray, percentiles: Sequence[float]) -> list[float]:
    """``np.percentile(values, percentiles)``, the same numbers, read off a sorted copy.

    Why: ``np.percentile`` partitions around each needed rank, 27-29 ms for the 1.6 million voxels
    of a BraTS-size scan's region, while NumPy's vectorised sort takes 3 ms and the ranks can then be
    read directly (the four channels' profiles: 164-168 -> 54-55 ms, docs/prediction.md). The
    interpolation is NumPy's default ("linear", Hyndman and Fan's type 7) step for step, the gap
    taken in the values' type, so every result equals ``np.percentile``'s
    (tests/test_percentile_normalisation.py).
    """
    ordered = np.sort(values, axis=None)
    if ordered.size == 0 or not all(0 <= q <= 100 for q in percentiles):  # np.percentile refuses these too
        raise ValueError(f"percentiles {list(percentiles)} of {ordered.size} values: need values and 0 <= q <= 100")
    position = np.asarray(percentiles, np.float64) / 100 * (ordered.size - 1)
    below = np.floor(position).astype(np.intp)
    low, high = ordered[below], ordered[np.minimum(below + 1, ordered.size - 1)]
    fraction, gap = position - below, high - low
    result = np.where(fraction >= 0.5, high - gap * (1 - fraction), low + gap * fraction)  # NumPy's _lerp
    return [float(v) for v in result]


def summarize_profiles(per_case: Sequence[Sequence[Sequence[float]]]) -> list[dict[str, list[float]]]:
    """Per channel, the mean and standard deviation over cases of each profile quantile.

    ``per_case[case][channel]`` is one :func:`profile`.
    """
    array = np.asarray(per_case, np.float64)  # (cases, channels, quantiles)
    return [
        {"quantiles": list(PROFILE_QUANTILES), "mean": [round(float(v), 4) for v in array[:, c].mean(0)],
         "std": [round(float(v), 4) for v in array[:, c].std(0)]}
        for c in range(array.shape[1])
    ]


def profile_differences(found: Sequence[Sequence[float]], training: Sequence[dict], channels: Sequence[str]) -> list[str]:
    """What in ``found`` (one profile per channel) lies far outside the training profile; empty if nothing."""
    notes = []
    for name, quantiles, train in zip(channels, found, training):
        if train is None:  # not z-scored: no profile
            continue
        far = [f"{q}th {value:+.2f} (training {mean:+.2f} +- {std:.2f})"
               for q, value, mean, std in zip(train["quantiles"], quantiles, train["mean"], train["std"])
               if abs(value - mean) > max(PROFILE_SIGMAS * std, PROFILE_MIN_GAP)]
        if far:  # one note per channel
            notes.append(f"channel {name!r}: normalised percentile{'s' * (len(far) > 1)} {', '.join(far)}")
    return notes


def warn_if_out_of_distribution(case: str, found: Sequence[Sequence[float]], training: Sequence[dict] | None,
                                channels: Sequence[str]) -> list[str]:
    """Warn (:class:`OutOfDistributionWarning`) when ``case``'s profile is far from training; return the notes."""
    if not training:
        return []
    notes = profile_differences(found, training, channels)
    if notes:
        warnings.warn(
            f"{case}: intensities unlike the training data ({'; '.join(notes)}); the prediction may be wrong. "
            "Check the modality, contrast and channel order, or train with data like it",
            OutOfDistributionWarning, stacklevel=2,
        )
    return notes
