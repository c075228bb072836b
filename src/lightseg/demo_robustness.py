"""The demo's robustness check: the trained model on inputs shaped unlike its training cases.

``lightseg demo`` trains on augmented copies of one template; its held-out score says nothing about
a volume prepared elsewhere. This check predicts, with the same model and ``lightseg.predict``:

* **the held-out cases** as generated (their demo predictions, scored again beside the atlas);
* **variants of the first held-out case** (one case per variant: each costs a prediction) it never trained on, each a change a volume from another
  site shows: ``zero background`` (skull-stripped: the image times the true brain mask, dilated
  by one voxel, as brain-extraction masks are generous), and on top of that ``uint8`` (0-255),
  ``float 0-1``, ``2 mm`` (linear resampling of the image, nearest of the label), ``LAS`` (voxel x
  axis reversed, the affine says so) and ``GM/WM contrast`` (intensities squared: gamma 2, beyond
  the generator's 0.6-1.6 range, which widens the WM-GM gap and darkens CSF);
* **the template itself** at its native 1 mm in uint8, labelled by the demo's recipe (the training
  anatomy, but unwarped, on another grid and storage type);
* **a real single-subject T1 from another source** when installed: the ITK example volume
  (Debian ``insighttoolkit5-examples``: 128 x 128 x 62, 2 x 2 x 3 mm, LSA axis order, a real head),
  skull-stripped by its shipped brain mask (``KmeansTest_T1RawSkullStrip``: nonzero inside the
  brain), scored against two labels made without lightseg's model:

  - ``registered label`` (the row the demo is judged on): the template's GM and WM maps carried
    onto the subject by image registration (:func:`registered_labels`: affine, then deformable
    demons), CSF = 1 - GM - WM, argmax inside the shipped brain mask. It follows the anatomy and the
    template's tissue definition, not an intensity clustering of this volume, so neither baseline
    is favoured by construction; its error is the registration's (it agrees with ITK's k-means
    label at about 0.61 mean Dice);
  - ``k-means label``: the shipped preliminary segmentation
    (``KmeansTest_T1KmeansPrelimSegmentation``, ITK's k-means over the head, 7 classes; inside the
    brain mask 4 -> CSF, 5 -> GM, 6 -> WM, whose mean intensities are 48 < 76 < 101, the T1 order).
    That label is itself intensity clustering, so the k-means column matches it almost by
    construction; it is kept to show how far the template's tissue definition (about 10 % CSF
    inside the brain) is from an intensity clustering (19 %). (Earlier versions read the classes
    from the skull-strip file, whose values 4/5/6 are not tissue classes.)

  Without the package both rows are skipped with a note, and without SimpleITK (the ``demo``
  extra installs it) the registered row; the demo needs nothing beyond a fresh install.

Each row gives the model's mean foreground Dice (CSF, GM, WM; mean over cases) beside two
baselines that are handed the TRUE brain mask: k-means (3 intensity clusters inside it, the
demo's reference) and the template atlas (the template's CSF/GM/WM maps placed by matching the
brain mask's extent per world axis, 2nd-98th percentile of its coordinates; no learning). The
column ``OOD warning`` says whether prediction flagged the input as out of distribution.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from lightseg.data.intensity import OutOfDistributionWarning
from lightseg.io import load_nifti, save_nifti

ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
ITK_T1, ITK_MASK = "KmeansTest_T1UCharRaw.nii.gz", "KmeansTest_T1RawSkullStrip.nii.gz"
ITK_LABEL = "KmeansTest_T1KmeansPrelimSegmentation.nii.gz"
ITK_CLASSES = {4: 1, 5: 2, 6: 3}  # the shipped k-means classes inside the brain -> CSF, GM, WM
ITK_NOTE = ("ITK example T1 not installed (Debian: apt-get install -y --no-install-recommends "
            "insighttoolkit5-examples): its rows are skipped")
SITK_NOTE = "SimpleITK not installed (pip install 'lightseg[demo]'): the ITK T1's registered-label row is skipped"
Case = tuple[np.ndarray, np.ndarray, np.ndarray]  # image, label, affine


def _strip(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Case:
    mask = ndimage.binary_dilation(label > 0)
    return (np.asarray(image, np.float32) * mask).astype(np.float32), label, affine


def _uint8(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Case:
    return np.round(image * (255.0 / max(float(image.max()), 1e-6))).astype(np.uint8), label, affine


def _float01(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Case:
    return (image / max(float(image.max()), 1e-6)).astype(np.float32), label, affine


def _resample_2mm(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Case:
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    zoom = spacing / 2.0
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / zoom
    new_affine[:3, 3] = affine[:3, :3] @ ((1 / zoom - 1) / 2) + affine[:3, 3]  # voxel centres stay centred
    image = ndimage.zoom(image.astype(np.float32), zoom, order=1, grid_mode=True, mode="grid-constant")
    return np.clip(image, 0, None), ndimage.zoom(label, zoom, order=0, grid_mode=True, mode="grid-constant"), new_affine


def _las(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Case:
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = image.shape[0] - 1
    return image[::-1].copy(), label[::-1].copy(), affine @ flip


def _contrast(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Case:
    peak = max(float(image.max()), 1e-6)
    return ((image / peak) ** 2 * peak).astype(np.float32), label, affine


VARIANTS: dict[str, list[Callable[..., Case]]] = {
    "zero background": [_strip],
    "uint8": [_strip, _uint8],
    "float 0-1": [_strip, _float01],
    "2 mm": [_strip, _resample_2mm],
    "LAS": [_strip, _las],
    "GM/WM contrast": [_strip, _contrast],
}


def template_case() -> Case:
    """The template at 1 mm, uint8 as shipped, labelled by the demo recipe."""
    from lightseg.data.demo import load_template, tissue_labels

    template = load_template()
    label = tissue_labels(template.t1, template.gm, template.wm)
    return np.round(template.t1 * 255).astype(np.uint8), label, template.affine


def itk_case(folder: Path = ITK_DATA) -> Case | None:
    """The ITK example T1, skull-stripped by its shipped mask, with the shipped classes inside that
    mask (module docstring); None if absent."""
    if not all((folder / name).is_file() for name in (ITK_T1, ITK_MASK, ITK_LABEL)):
        return None
    image = load_nifti(folder / ITK_T1)
    brain = np.asanyarray(load_nifti(folder / ITK_MASK).dataobj) > 0
    classes = np.asanyarray(load_nifti(folder / ITK_LABEL).dataobj)
    label = np.zeros(classes.shape, np.uint8)
    for value, tissue in ITK_CLASSES.items():
        label[(classes == value) & brain] = tissue
    data = np.asanyarray(image.dataobj) * brain
    return data.astype(np.int16), label, np.asarray(image.affine)


def _to_sitk(array: np.ndarray, affine: np.ndarray) -> Any:
    """A NIfTI-style array (x, y, z) with its RAS affine as a SimpleITK image (z, y, x storage, LPS
    world). The affine must be a rotation times spacing (no shear), as every input here is."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0)), dtype=np.float32))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((ras_to_lps @ affine[:3, 3]).tolist())
    image.SetDirection((ras_to_lps @ (affine[:3, :3] / spacing)).ravel().tolist())
    return image


def registered_labels(image: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The template's tissue labels carried onto ``image`` by registration (SimpleITK), inside ``brain``.

    A reference label for a real volume that no intensity clustering of it made. The template T1
    is registered to ``image`` in two stages with fixed settings (ITK's usual ones, not tuned to
    any score): an affine by Mattes mutual information (32 bins, 10 % of the brain's voxels drawn
    with seed 1, levels shrunk 4/2/1 and smoothed 2/1/0 mm, regular-step gradient descent from a
    moments-centred start), then, with the affinely placed template histogram-matched to the
    subject, fast symmetric-forces demons (100 iterations per level at 4/2/1-fold bin-shrunk grids,
    displacement smoothed with a 1.5 mm Gaussian). The template's GM and WM maps are pulled through
    both (linear interpolation), CSF = clip(1 - GM - WM), and each brain voxel takes the argmax:
    the demo's tissue recipe on the subject's grid. The affine runs on one thread (threaded metric
    sums made it, and the label, differ between runs); the result is then the same on every run.
    """
    import SimpleITK as sitk

    from lightseg.data.demo import load_template

    template = load_template()
    fixed = _to_sitk(image, affine)
    moving = _to_sitk(template.t1, template.affine)
    mask = sitk.Cast(_to_sitk(brain.astype(np.float32), affine) > 0.5, sitk.sitkUInt8)

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, seed=1)  # seed 0 is SimpleITK's "wall clock"
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS), inPlace=False)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # threaded sums vary run to run, and the affine with them
    try:
        linear = method.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)

    placed = sitk.HistogramMatching(sitk.Resample(moving, fixed, linear, sitk.sitkLinear, 0.0), fixed, 256, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(100)
    demons.SetStandardDeviations(1.5)
    field = None
    for shrink in (4, 2, 1):  # coarse to fine, each level starting from the previous field
        level = sitk.BinShrink(fixed, [shrink] * 3)
        template_level = sitk.Resample(placed, level)
        if field is None:
            field = demons.Execute(level, template_level)
        else:
            start = sitk.Resample(field, level, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(level, template_level, start)
    warp = sitk.CompositeTransform([linear, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))])

    def pull(volume: np.ndarray) -> np.ndarray:
        moved = sitk.Resample(_to_sitk(volume, template.affine), fixed, warp, sitk.sitkLinear, 0.0)
        return np.transpose(sitk.GetArrayFromImage(moved), (2, 1, 0))

    gm, wm = pull(template.gm), pull(template.wm)
    tissues = np.stack([np.clip(1.0 - gm - wm, 0.0, 1.0), gm, wm])
    label = np.zeros(brain.shape, np.uint8)
    label[brain] = 1 + np.argmax(tissues[:, brain], axis=0)
    return label


def atlas_labels(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The template-atlas baseline (module docstring): CSF/GM/WM inside the true brain mask of ``label``."""
    from lightseg.data.demo import BRAIN_THRESHOLD, load_template

    template = load_template()
    brain = np.argwhere(label > 0)
    world = nib.affines.apply_affine(affine, brain)
    tbrain = np.argwhere(template.t1 > BRAIN_THRESHOLD)
    tworld = nib.affines.apply_affine(template.affine, tbrain[:: max(1, len(tbrain) // 200_000)])
    lo, hi = np.percentile(world, [2, 98], axis=0)
    tlo, thi = np.percentile(tworld, [2, 98], axis=0)
    mapped = tlo + (world - lo) * (thi - tlo) / np.maximum(hi - lo, 1e-6)
    coords = nib.affines.apply_affine(np.linalg.inv(template.affine), mapped).T
    gm, wm = (ndimage.map_coordinates(v, coords, order=1) for v in (template.gm, template.wm))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    out = np.zeros(label.shape, np.uint8)
    out[tuple(brain.T)] = 1 + np.argmax(np.stack([csf, gm, wm]), axis=0)
    return out


def foreground_dice(truth: np.ndarray, prediction: np.ndarray, classes: tuple[int, ...] = (1, 2, 3)) -> float:
    """Mean Dice over the classes present in ``truth``."""
    scores = []
    for c in classes:
        t, p = truth == c, prediction == c
        if t.any():
            scores.append(2.0 * (t & p).sum() / (t.sum() + p.sum()))
    return float(np.mean(scores)) if scores else float("nan")


Entry = tuple[str, str]  # (case: image and prediction name, label name)


def write_inputs(held_out: dict[str, tuple[Path, Path, Path]], out: Path) -> tuple[dict[str, list[Entry]], list[str]]:
    """Write every variant and real volume to ``out/imagesTs`` and ``out/labelsTs``.

    Returns (row name -> (case, label name) entries, notes). A case scored against a second label
    is written and predicted once. ``held_out``: case name -> (image, label, prediction) files;
    the held-out cases themselves are linked with their demo prediction, which
    ``lightseg.predict`` then skips (it predicts only cases without an output).
    """
    from lightseg.demo import _link

    rows: dict[str, list[Entry]] = {}
    notes: list[str] = []
    for case, (image_path, label_path, prediction) in held_out.items():
        _link(image_path, out / "imagesTs" / f"{case}_0000.nii.gz")
        _link(label_path, out / "labelsTs" / f"{case}.nii.gz")
        _link(prediction, out / "predictions" / f"{case}.nii.gz")
        rows.setdefault("held out, as generated", []).append((case, case))

    def write_label(row: str, name: str, label: np.ndarray, affine: np.ndarray, label_name: str | None = None) -> nib.Nifti1Image:
        reference = nib.Nifti1Image(label, affine)
        reference.set_qform(affine, code=1)
        reference.set_sform(affine, code=1)
        label_name = label_name or name
        save_nifti(out / "labelsTs" / f"{label_name}.nii.gz", np.ascontiguousarray(label, dtype=np.uint8), reference)
        rows.setdefault(row, []).append((name, label_name))
        return reference

    def write(row: str, name: str, case: Case) -> None:
        image, label, affine = case
        reference = write_label(row, name, label, affine)
        save_nifti(out / "imagesTs" / f"{name}_0000.nii.gz", np.ascontiguousarray(image), reference)

    first = sorted(held_out)[0]  # one case per variant: each costs a prediction, and the demo has a budget
    for case, (image_path, label_path, _) in [(first, held_out[first])]:
        nifti = load_nifti(image_path)
        base = (np.asanyarray(nifti.dataobj), np.asanyarray(load_nifti(label_path).dataobj), np.asarray(nifti.affine))
        for index, (row, steps) in enumerate(VARIANTS.items()):
            variant = base
            for step in steps:
                variant = step(*variant)
            write(row, f"{case}-v{index}", variant)
    write("template 1 mm uint8", "template", template_case())
    itk = itk_case()
    if itk is None:
        notes.append(ITK_NOTE)
    else:
        image, kmeans_label, affine = itk
        write("ITK T1, k-means label", "itk_t1", itk)
        if importlib.util.find_spec("SimpleITK") is None:
            notes.append(SITK_NOTE)
        else:
            write_label("ITK T1, registered label", "itk_t1", registered_labels(image, kmeans_label > 0, affine), affine,
                        label_name="itk_t1_registered")
        notes.append("ITK T1, k-means label: ITK's own k-means clustering, which the k-means baseline matches "
                     "almost by construction; the registered label is the reference that favours neither")
    return rows, notes


def run_check(run_dir: Path, held_out: dict[str, tuple[Path, Path, Path]], out: Path, device: str = "cpu") -> dict[str, Any]:
    """Predict every row's cases with the run's final model and score them with both baselines."""
    import lightseg
    from lightseg.demo import kmeans_tissue

    rows, notes = write_inputs(held_out, out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OutOfDistributionWarning)
        lightseg.predict(out / "imagesTs", out / "predictions", run_dir, checkpoint="final", device=device,
                         progress=False)
    flagged = {str(w.message).split(":")[0] for w in caught if issubclass(w.category, OutOfDistributionWarning)}
    table: dict[str, dict[str, Any]] = {}
    for row, entries in rows.items():
        scores: dict[str, list[float]] = {"model": [], "k-means": [], "atlas": []}
        names = [name for name, _ in entries]
        for name, label_name in entries:
            image = load_nifti(out / "imagesTs" / f"{name}_0000.nii.gz")
            label_nifti = load_nifti(out / "labelsTs" / f"{label_name}.nii.gz")
            label = np.asanyarray(label_nifti.dataobj)
            predicted = np.asanyarray(load_nifti(out / "predictions" / f"{name}.nii.gz").dataobj)
            scores["model"].append(foreground_dice(label, predicted))
            scores["k-means"].append(foreground_dice(label, kmeans_tissue(np.asanyarray(image.dataobj), label > 0)))
            scores["atlas"].append(foreground_dice(label, atlas_labels(label, np.asarray(label_nifti.affine))))
        table[row] = {**{k: float(np.mean(v)) for k, v in scores.items()}, "cases": names,
                      "labels": [label for _, label in entries], "ood_warning": any(name in flagged for name in names)}
    return {"rows": table, "notes": notes}


def robustness_table(result: dict[str, Any], model: str) -> str:
    """The check's rows as text: mean foreground Dice of the model beside both baselines."""
    rows = result["rows"]
    width = max(len(r) for r in rows)
    header = f"{'input':<{width}}  {model + ' Dice':>18}  {'k-means Dice':>12}  {'atlas Dice':>10}  {'beats k-means':>13}  OOD warning"
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        lines.append(f"{name:<{width}}  {r['model']:18.4f}  {r['k-means']:12.4f}  {r['atlas']:10.4f}  "
                     f"{'yes' if r['model'] > r['k-means'] else 'NO':>13}  {'yes' if r['ood_warning'] else 'no'}")
    return "\n".join(lines + [f"({n})" for n in result["notes"]])
