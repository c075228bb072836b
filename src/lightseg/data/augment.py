"""Training augmentation with MONAI transforms, run per patch inside the DataLoader workers.

Levels (``--augment``): ``none``; ``light`` (flips, mild rotation/scaling, noise, brightness);
``default`` (nnU-Net's set and probabilities: rotation +-30 deg and scaling 0.7-1.4 with p 0.2
each, mirroring p 0.5 per axis, Gaussian noise p 0.1, blur p 0.2, brightness p 0.15, contrast
p 0.15, simulated low resolution p 0.25, gamma p 0.3 and inverted gamma p 0.1); ``strong``
(``default`` with the intensity changes that separate sites: gamma 0.5-2.0 instead of 0.7-1.5,
and a random monotone intensity curve, MONAI's ``RandHistogramShift`` with 5-10 control points,
p 0.3, which moves tissue contrasts relative to each other as another scanner or sequence
does). Elastic deformation is optional (``elastic=True``, p 0.2): it is the most expensive transform.

Cost (measured as the data-wait fraction in the training log): nnU-Net rotates/scales a
window around the patch inside the whole volume. Here the sampler decides first (``draw_spatial``)
whether a spatial transform applies; only then does it cut a crop enlarged by ``context(patch)``
(a quarter of the patch on each side), and MONAI's affine resamples a patch-sized grid centred
in it (one resampling of the patch's voxels; an earlier version resampled the whole enlarged crop
and then centre-cropped it, 3.4x the voxels, which made data loading dominate at 128^3).
Patches without a spatial transform (most of them) are cut at patch size and never resampled.
Intensity transforms run on the final patch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
)

LEVELS = ("none", "light", "default", "strong")
KEYS = ("image", "label")


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of one augmentation level (angles in radians)."""

    spatial_prob: float
    rotation: float
    scale: tuple[float, float]
    flip_prob: float
    noise_prob: float
    blur_prob: float
    brightness_prob: float
    contrast_prob: float
    lowres_prob: float
    gamma_prob: float
    inverted_gamma_prob: float
    elastic_prob: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    histogram_shift_prob: float = 0.0


def augment_params(level: str, elastic: bool = False) -> AugmentParams | None:
    """The parameters of ``level``; ``None`` for ``"none"``."""
    if level not in LEVELS:
        raise ValueError(f"unknown augmentation level {level!r}; choose one of {', '.join(LEVELS)}")
    if level == "none":
        return None
    if level == "light":
        params = AugmentParams(0.2, math.radians(15), (0.85, 1.15), 0.5, 0.1, 0.0, 0.15, 0.0, 0.0, 0.0, 0.0)
    else:
        # nnU-Net draws rotation and scaling independently with p 0.2 each: p(either) = 0.36
        params = AugmentParams(0.36, math.radians(30), (0.7, 1.4), 0.5, 0.1, 0.2, 0.15, 0.15, 0.25, 0.3, 0.1)
        if level == "strong":
            params = AugmentParams(**{**params.__dict__, "gamma_range": (0.5, 2.0), "histogram_shift_prob": 0.3})
    return AugmentParams(**{**params.__dict__, "elastic_prob": 0.2 if elastic else 0.0})


class Augmenter:
    """Callable used by :class:`~lightseg.data.sampling.PatchSampler` (see the module docstring)."""

    def __init__(self, params: AugmentParams) -> None:
        self.params = params
        self._pipelines: dict[tuple[int, ...], tuple[Compose, Compose]] = {}

    def draw_spatial(self, rng: np.random.Generator) -> bool:
        """Whether the next patch gets a spatial transform (decided before cropping)."""
        return bool(rng.random() < self.params.spatial_prob + self.params.elastic_prob)

    @staticmethod
    def context(patch: tuple[int, int, int]) -> tuple[int, int, int]:
        """Voxels added on each side of the crop for a spatial transform to rotate/zoom into."""
        return tuple(max(2, p // 4) for p in patch)  # type: ignore[return-value]

    def _build(self, patch: tuple[int, int, int]) -> tuple[Compose, Compose]:
        p = self.params
        # the affine's output grid is the patch, centred in the enlarged crop: one resampling of
        # patch-sized output (not of the whole crop) and no separate centre crop
        spatial = [
            RandAffined(
                KEYS,
                spatial_size=patch,
                prob=1.0,
                rotate_range=(p.rotation,) * 3,
                scale_range=(p.scale[0] - 1.0, p.scale[1] - 1.0),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                cache_grid=False,
            )
        ]
        if p.elastic_prob:
            spatial.append(
                Rand3DElasticd(
                    KEYS, sigma_range=(9.0, 13.0), magnitude_range=(0.0, 200.0), prob=p.elastic_prob / (p.spatial_prob + p.elastic_prob),
                    mode=("bilinear", "nearest"), padding_mode="zeros",
                )
            )
        rest = [RandFlipd(KEYS, prob=p.flip_prob, spatial_axis=axis) for axis in range(3)]
        rest += [
            RandGaussianNoised("image", prob=p.noise_prob, mean=0.0, std=0.1),
            RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=p.blur_prob),
            RandScaleIntensityd("image", factors=0.25, prob=p.brightness_prob),
            RandScaleIntensityFixedMeand("image", factors=0.25, fixed_mean=True, preserve_range=True, prob=p.contrast_prob),
            RandSimulateLowResolutiond(
                "image", prob=p.lowres_prob, downsample_mode="nearest", upsample_mode="trilinear", zoom_range=(0.5, 1.0)
            ),
            RandHistogramShiftd("image", num_control_points=(5, 10), prob=p.histogram_shift_prob),
            RandAdjustContrastd("image", prob=p.inverted_gamma_prob, gamma=p.gamma_range, invert_image=True, retain_stats=True),
            RandAdjustContrastd("image", prob=p.gamma_prob, gamma=p.gamma_range, invert_image=False, retain_stats=True),
        ]
        return Compose(spatial), Compose([t for t in rest if getattr(t, "prob", 1.0) > 0])

    def __call__(
        self, image: np.ndarray, label: np.ndarray, patch: tuple[int, int, int], spatial: bool, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment one crop (``(C, *crop)``, ``(*crop)``) into one patch; ``seed`` fixes every draw."""
        if patch not in self._pipelines:
            self._pipelines[patch] = self._build(patch)
        spatial_tf, rest = self._pipelines[patch]
        data = {"image": torch.from_numpy(np.ascontiguousarray(image, np.float32)), "label": torch.from_numpy(label[None].astype(np.float32))}
        if spatial:
            data = spatial_tf.set_random_state(seed=seed)(data)
        data = rest.set_random_state(seed=seed + 1)(data)
        out_image = np.asarray(torch.as_tensor(data["image"]).numpy(), np.float32)
        out_label = np.asarray(torch.as_tensor(data["label"]).numpy()[0]).round().astype(np.uint8)
        return out_image, out_label


def build_augmenter(level: str, elastic: bool = False) -> Augmenter | None:
    """The augmenter for ``--augment LEVEL`` (``None`` for ``"none"``)."""
    params = augment_params(level, elastic)
    return None if params is None else Augmenter(params)
