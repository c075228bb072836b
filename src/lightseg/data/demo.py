"""``lightseg demo-data``: a real nnU-Net data set built from the MNI152 2009a brain template.

The nilearn wheel ships the ICBM152 2009a T1 template and its grey/white matter probability maps
(197 x 233 x 189 voxels, 1 mm). Nothing is downloaded or vendored: the files are read from the
installed package and every case is derived at run time.

Labels (0 background, 1 CSF, 2 GM, 3 WM) follow the recipe of the project's data notes:
``brain = T1 > 0.2 max(T1)``, ``CSF = clip(brain - GM - WM, 0, 1)``,
``label = argmax(1 - brain, CSF, GM, WM)``. Each case is one draw of:

* a random affine (rotation, per-axis scaling, small translation) and a smooth elastic
  displacement, composed into one coordinate map so the template is interpolated once, straight
  onto the case's grid at ``spacing`` mm (linear for T1, GM and WM; the label recipe is applied
  to the resampled maps, i.e. per-class linear interpolation then argmax);
* a random field of view: a box around the warped brain with a random margin per side; the
  affine's origin is the box corner, so every file carries its true world position;
* an appearance drawn per case (:class:`CaseStyle`, from its own random stream; ranges in
  :class:`DemoAugmentation`) that varies as scans from different sites do, so that a model trained
  on these cases meets real volumes prepared for it: a **contrast** change of the template's T1
  (none, a gamma curve, or a random monotone piecewise-linear curve that moves GM and WM relative
  to each other and to CSF); a smooth multiplicative **bias field** of random strength; a
  **resolution** of 1 to 2 mm simulated by Gaussian blur (FWHM) on the stored grid; Rician noise
  (magnitude MRI); a **background** that is exactly 0 outside a skull-strip mask (most cases, as
  brain volumes are usually shared) or noisy; a **storage type and scale** (int16 with an
  arbitrary maximum, uint8 0-255, or float32 0-1); and an **orientation** (RAS, or LAS: the
  voxel x axis stored right-to-left with the affine saying so; the world position is unchanged).

The kinds (contrast, background, storage, orientation) are stratified, not drawn independently:
in every block of ``STRATUM`` consecutive cases each kind appears its probability's share of
times (rounded by largest remainder), in a random order per block (:func:`stratified_kind`). With
a handful of cases independent draws are unbalanced (one seed trained on a single noisy
background and no LAS case); the demo trains on its first 6 cases, one whole block, so every
kind of the defaults is among them. The continuous draws (gamma, curve, bias, blur, scale) stay
independent per case.

Everything is SciPy/NumPy (``scipy.ndimage.map_coordinates`` and ``zoom``), without torch,
so workers start fast; a case depends only on ``(seed, index, spacing)``, so a rerun skips the
cases already written and growing ``num_cases`` keeps the first ones. The cases are augmented
copies of one template, not patients: a validation score on them measures fitting, not
generalisation to new anatomy.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from lightseg.data.dataset import DatasetSpec
from lightseg.data.parallel import default_workers, map_progress
from lightseg.errors import DatasetError
from lightseg.io import save_nifti, write_json

GENERATOR_VERSION = 4  # bump when a change alters the cases, so old folders are refused, not mixed
CLASS_NAMES = ("background", "CSF", "GM", "WM")
TEMPLATE_FILES = {key: f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz" for key in ("t1", "gm", "wm")}
BRAIN_THRESHOLD = 0.2
STORAGE = ("int16", "uint8", "float32")
CONTRASTS = ("none", "gamma", "curve")
STRATUM = 6  # cases per block in which the kinds are balanced: the demo's training cases (8 cases, 2 held out)
INSTALL_HINT = 'pip install "lightseg[demo]"'
LICENCE = (
    "Derived at run time from the MNI ICBM152 2009a template files shipped in nilearn (BSD-3). "
    "Template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University; use, copying, modification and distribution are "
    "permitted provided the copyright notice appears in all copies; provided as is."
)


@dataclass(frozen=True)
class DemoAugmentation:
    """Ranges of the random draws that turn the template into a case (see module docstring)."""

    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_translation_mm: float = 5.0
    elastic_std_mm: float = 2.5
    elastic_control_mm: float = 30.0
    bias_log_std_range: tuple[float, float] = (0.0, 0.25)
    bias_control_mm: float = 80.0
    noise_std_range: tuple[float, float] = (0.01, 0.04)
    margin_mm_range: tuple[float, float] = (4.0, 16.0)
    zero_background_prob: float = 0.7  # shared brain volumes are mostly skull-stripped, background exactly 0
    contrast_probs: tuple[float, float, float] = (0.3, 0.35, 0.35)  # none, gamma, monotone curve
    gamma_range: tuple[float, float] = (0.6, 1.6)
    curve_knots: int = 5  # the monotone curve: this many pieces on [0, 1] ...
    curve_step_range: tuple[float, float] = (0.4, 1.0)  # ... with slopes in this ratio (never flat: order kept)
    resolution_mm_range: tuple[float, float] = (1.0, 2.0)  # acquisition FWHM
    storage_probs: tuple[float, float, float] = (0.4, 0.3, 0.3)  # int16, uint8, float32
    int16_max_range: tuple[float, float] = (300.0, 4000.0)  # the template's T1 maximum when stored as int16
    las_prob: float = 0.3


@dataclass(frozen=True)
class CaseStyle:
    """One case's appearance (module docstring); drawn by :func:`case_style`."""

    contrast: str
    gamma: float
    curve: tuple[float, ...]  # values at curve_knots + 1 evenly spaced points of [0, 1], from 0 to 1
    bias_log_std: float
    resolution_mm: float
    zero_background: bool
    storage: str
    int16_max: float
    las: bool


def stratified_kind(seed: int, index: int, factor: int, probs: tuple[float, ...]) -> int:
    """Which of ``len(probs)`` kinds case ``index`` gets for ``factor``: each block of ``STRATUM``
    consecutive cases holds kind ``k`` ``STRATUM * probs[k]`` times (largest remainder), shuffled
    per block; a case still depends only on ``(seed, index)``, so growing a data set keeps its cases."""
    block, position = divmod(index, STRATUM)
    shares = np.asarray(probs, dtype=np.float64) / np.sum(probs) * STRATUM
    quota = np.floor(shares).astype(int)
    quota[np.argsort(quota - shares, kind="stable")[: STRATUM - quota.sum()]] += 1
    kinds = np.repeat(np.arange(len(probs)), quota)
    return int(np.random.default_rng([seed, block, 2, factor]).permutation(kinds)[position])


def case_style(seed: int, index: int, aug: DemoAugmentation = DemoAugmentation()) -> CaseStyle:
    """Case ``index``'s appearance, from a random stream of its own (the geometry's draws are
    untouched); its kinds are stratified over the cases (:func:`stratified_kind`)."""
    rng = np.random.default_rng([seed, index, 1])
    steps = rng.uniform(*aug.curve_step_range, aug.curve_knots)
    kind = functools.partial(stratified_kind, seed, index)
    return CaseStyle(
        contrast=CONTRASTS[kind(0, aug.contrast_probs)],
        gamma=float(rng.uniform(*aug.gamma_range)),
        curve=tuple(float(v) for v in np.concatenate([[0.0], np.cumsum(steps) / steps.sum()])),
        bias_log_std=float(rng.uniform(*aug.bias_log_std_range)),
        resolution_mm=float(rng.uniform(*aug.resolution_mm_range)),
        zero_background=kind(1, (aug.zero_background_prob, 1 - aug.zero_background_prob)) == 0,
        storage=STORAGE[kind(2, aug.storage_probs)],
        int16_max=float(rng.uniform(*aug.int16_max_range)),
        las=kind(3, (1 - aug.las_prob, aug.las_prob)) == 1,
    )


def apply_contrast(t1: np.ndarray, style: CaseStyle) -> np.ndarray:
    """The style's monotone intensity map of the [0, 1] T1 (0 stays 0, 1 stays 1, tissue order kept)."""
    if style.contrast == "gamma":
        return np.power(np.clip(t1, 0, None), style.gamma, dtype=np.float32)
    if style.contrast == "curve":
        knots = np.linspace(0.0, 1.0, len(style.curve))
        return np.interp(t1, knots, style.curve).astype(np.float32)
    return t1


def store(image: np.ndarray, style: CaseStyle) -> np.ndarray:
    """The image in the style's storage type: int16 scaled to its maximum, uint8 0-255 or float32 0-1
    (both scaled by the image's own maximum, as converters to those types do)."""
    if style.storage == "int16":
        return np.round(image * style.int16_max).astype(np.int16)
    peak = max(float(image.max()), 1e-6)
    if style.storage == "uint8":
        return np.round(image * (255.0 / peak)).astype(np.uint8)
    return (image / peak).astype(np.float32)


@dataclass(frozen=True)
class Template:
    """T1 scaled to [0, 1], GM and WM probabilities, the 1 mm affine, and brain points (3, N) in mm.

    The points (every 4th brain voxel per axis) give the warped brain's tight bounding box; the
    box of a rotated bounding box would be up to 20% larger per axis, and so would every case.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray
    brain_points: np.ndarray


@dataclass(frozen=True)
class _Job:
    out: Path
    index: int
    seed: int
    spacing: float
    augmentation: DemoAugmentation


def template_dir() -> Path:
    """The folder of nilearn's template files, found without importing nilearn (it is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the demo data set needs the nilearn package, which ships the MNI152 template: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"{folder}: template file(s) {missing} not found in this nilearn install; "
                           f"reinstall it with {INSTALL_HINT}")
    return folder


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read the three template volumes once per process."""
    folder = template_dir()
    images = {key: nib.load(folder / name) for key, name in TEMPLATE_FILES.items()}
    data = {key: np.asarray(image.dataobj, dtype=np.float32) for key, image in images.items()}
    t1 = data["t1"] / data["t1"].max()
    affine = np.asarray(images["t1"].affine, dtype=np.float64)
    brain = np.zeros(t1.shape, bool)
    brain[::4, ::4, ::4] = t1[::4, ::4, ::4] > BRAIN_THRESHOLD
    voxels = np.argwhere(brain).T.astype(np.float64)
    return Template(
        t1=t1, gm=data["gm"] / 255.0, wm=data["wm"] / 255.0, affine=affine,
        brain_points=affine[:3, :3] @ voxels + affine[:3, 3:4],
    )


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The 4-class label recipe; ``t1`` is scaled so that the template's maximum is 1."""
    brain = (t1 > BRAIN_THRESHOLD).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([1.0 - brain, csf, gm, wm]), axis=0).astype(np.uint8)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control_voxels: float, std: float) -> np.ndarray:
    """Gaussian values on a coarse control grid, cubic-spline interpolated to ``shape`` (float32).

    The same result as a 3D ``ndimage.zoom(order=3)``, applied one axis at a time as a matrix
    product (the zoom of an identity matrix is the axis's interpolation matrix): the 3D zoom
    evaluates 64 taps per output voxel and takes seconds on a case, this takes milliseconds.
    """
    control = tuple(max(2, int(np.ceil(s / control_voxels)) + 1) for s in shape)
    field = rng.normal(0.0, std, control)
    for axis, (size, points) in enumerate(zip(shape, control)):
        weights = ndimage.zoom(np.eye(points), (size / points, 1), order=3, mode="nearest")
        field = np.moveaxis(np.tensordot(weights, field, axes=(1, axis)), 0, axis)
    return field.astype(np.float32)


def demo_case(
    template: Template, index: int, seed: int, spacing: float, aug: DemoAugmentation = DemoAugmentation()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw case ``index``: T1 image (its :class:`CaseStyle`'s storage type), label (uint8) and its
    4x4 affine (``spacing`` mm, RAS or LAS)."""
    rng = np.random.default_rng([seed, index])
    rotation = Rotation.from_euler("xyz", rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg, 3), degrees=True)
    linear = rotation.as_matrix() @ np.diag(rng.uniform(*aug.scale_range, 3))
    points = template.brain_points
    center = (points.min(axis=1) + points.max(axis=1)) / 2
    shift = center + rng.uniform(-aug.max_translation_mm, aug.max_translation_mm, 3)
    moved = linear @ (points - center[:, None]) + shift[:, None]  # the brain in the case's world
    pad = 2 * aug.elastic_std_mm
    low = moved.min(axis=1) - pad - rng.uniform(*aug.margin_mm_range, 3)
    high = moved.max(axis=1) + pad + rng.uniform(*aug.margin_mm_range, 3)
    shape = tuple(int(n) for n in np.ceil((high - low) / spacing).astype(int) + 1)

    world = np.indices(shape, dtype=np.float32) * np.float32(spacing) + low.astype(np.float32)[:, None, None, None]
    for axis in range(3):
        world[axis] += smooth_field(rng, shape, aug.elastic_control_mm / spacing, aug.elastic_std_mm)
    to_template = np.linalg.inv(template.affine) @ _affine(np.linalg.inv(linear), center - np.linalg.inv(linear) @ shift)
    coords = np.einsum("ij,j...->i...", to_template[:3, :3].astype(np.float32), world)
    coords += to_template[:3, 3].astype(np.float32)[:, None, None, None]
    t1, gm, wm = (
        ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, prefilter=False)
        for volume in (template.t1, template.gm, template.wm)
    )
    label = tissue_labels(t1, gm, wm)
    style = case_style(seed, index, aug)
    image = apply_contrast(t1, style) * np.exp(smooth_field(rng, shape, aug.bias_control_mm / spacing, style.bias_log_std))
    blur_mm = np.sqrt(max(style.resolution_mm**2 - spacing**2, 0.0)) / 2.3548  # FWHM -> sigma, beyond the grid's own
    if blur_mm > 0:
        image = ndimage.gaussian_filter(image, blur_mm / spacing)
    sigma = rng.uniform(*aug.noise_std_range)
    real = image + rng.normal(0.0, sigma, shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, shape).astype(np.float32)
    image = np.sqrt(real**2 + imaginary**2)  # Rician: the magnitude of complex Gaussian noise
    if style.zero_background:  # a skull-strip mask: the template's head, one voxel generous
        image *= ndimage.binary_dilation(t1 > BRAIN_THRESHOLD / 2)
    image, affine = store(image, style), _affine(np.eye(3) * spacing, low)
    if style.las:  # same world, voxel x axis reversed
        image, label = image[::-1].copy(), label[::-1].copy()
        affine = affine @ _affine(np.diag([-1.0, 1.0, 1.0]), np.array([shape[0] - 1.0, 0.0, 0.0]))
    return image, label, affine


def _affine(linear: np.ndarray, offset: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = offset
    return out


def make_demo_dataset(
    out_dir: str | Path,
    num_cases: int = 10,
    seed: int = 0,
    spacing: float = 1.5,
    workers: int | None = None,
    progress: bool = False,
    augmentation: DemoAugmentation = DemoAugmentation(),
) -> Path:
    """Write ``num_cases`` demo cases as an nnU-Net v2 raw data set in ``out_dir``; return it.

    Defaults (10 cases at 1.5 mm, about 115 x 145 x 125 voxels each) are sized so the demo
    trains in minutes on 2 CPU cores. A rerun with the same settings writes only missing cases;
    a folder made with other settings (or holding anything else) is refused, never mixed.
    """
    if num_cases < 1 or spacing <= 0:
        raise DatasetError(f"demo data set needs at least 1 case and a positive spacing (got {num_cases}, {spacing})")
    template_dir()
    out = Path(out_dir)
    settings = json.loads(json.dumps(
        {"generator": GENERATOR_VERSION, "seed": seed, "spacing_mm": spacing, "augmentation": asdict(augmentation)}
    ))
    _check_existing(out, settings, num_cases)
    spec = DatasetSpec(
        channel_names=("T1",),
        labels={name: value for value, name in enumerate(CLASS_NAMES)},
        num_training=num_cases,
        name="MNI152Demo",
        extra={
            "description": f"{num_cases} augmented copies (affine and elastic warps, contrast curves, bias field, "
                           "blur, Rician noise, zero or noisy background, storage types, RAS/LAS, random field of "
                           "view) of the MNI ICBM152 2009a template: one anatomy, not patients",
            "licence": LICENCE,
            "lightseg_demo": settings,
        },
    )
    write_json(out / "dataset.json", spec.to_json())
    jobs = [_Job(out, index, seed, spacing, augmentation) for index in range(num_cases)]
    map_progress(_write_case, jobs, workers or default_workers(), desc="demo-data", progress=progress)
    return out


def _check_existing(out: Path, settings: dict, num_cases: int) -> None:
    path = out / "dataset.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("lightseg_demo") != settings:
            raise DatasetError(f"{out}: holds a data set made with other settings than {settings}; "
                               "choose another folder or delete this one")
        if old.get("numTraining", 0) > num_cases:
            raise DatasetError(f"{out}: already holds {old['numTraining']} cases; ask for at least as many, "
                               "or choose another folder")
    elif out.is_dir() and any(out.iterdir()):
        raise DatasetError(f"{out}: folder is not empty and holds no demo data set; choose a new folder")


def _write_case(job: _Job) -> None:
    name = f"brain_{job.index:03d}"
    label_path = job.out / "labelsTr" / f"{name}.nii.gz"
    if label_path.is_file():  # written last: the case is complete
        return
    image, label, affine = demo_case(load_template(), job.index, job.seed, job.spacing, job.augmentation)
    reference = nib.Nifti1Image(label, affine)
    reference.header.set_xyzt_units("mm")
    reference.set_qform(affine, code=1)
    reference.set_sform(affine, code=1)
    save_nifti(job.out / "imagesTr" / f"{name}_0000.nii.gz", image, reference)
    save_nifti(label_path, label, reference)
