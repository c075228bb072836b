"""The prediction pipeline shared by every backend; only the network step differs.

Input: ``IMAGES_DIR/{case}_{XXXX}{file_ending}`` (one file per channel, nnU-Net's naming), or
``{case}{file_ending}`` for one-channel models. Output: ``OUT_DIR/{case}{file_ending}``, uint8
labels on exactly the first channel's grid (shape, affine, qform/sform codes; written through
:func:`lightseg.io.save_nifti`), and with ``save_probabilities`` ``OUT_DIR/{case}.npz`` holding
``probabilities``, float16 ``(K, X, Y, Z)`` on the same grid (softmax classes in ``label_values``
order, or one sigmoid per region).

Per case: the plan is applied (:func:`lightseg.data.preprocess.preprocess_image`), the backend's
``logits`` step turns the preprocessed image into blended logits (the sliding-window engine of
:mod:`lightseg.inference.window`, with PyTorch in :mod:`lightseg.inference.predictor` or an
exported model in :mod:`lightseg.inference.onnx_predictor`), logits become softmax probabilities in place,
and :func:`lightseg.data.restore.restore_argmax` resamples them back one
class at a time (linear), takes the argmax and uncrops, which keeps memory at a few volumes on
large scans (region models: their painted labels, per class, by
:func:`lightseg.data.restore.restore_to_original`). Voxels of a zero-background input outside
its filled nonzero region are background (:func:`outside_input`).

Ensembles (:func:`ensemble`): several models with one preprocessing (the folds of a
cross-validation, or different models trained on one cache) run on the same preprocessed image;
their softmax (or sigmoid) probabilities are averaged, with or without TTA, as nnU-Net averages
its folds. ``part=(I, N)`` predicts every N-th case from the I-th (nnU-Net's
``-part_id``/``-num_parts``), so N jobs cover a folder once.

Many cases: a progress bar; a case whose outputs exist is skipped, and every file is written
atomically, so an interrupted run resumes where it stopped, and a rerun where every case is
done loads no model (:func:`already_predicted`, checked first by both backends, which says so); a case that
fails (unreadable file, wrong channels, out of memory) is reported and the others are still
predicted, then a :class:`PredictionError` lists the failures. Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from lightseg.data.dataset import DatasetSpec, channel_file_pattern, visible_files
from lightseg.data.intensity import warn_if_out_of_distribution
from lightseg.data.plan import Plan
from lightseg.data.fingerprint import nonzero_mask
from lightseg.data.preprocess import CaseProperties, preprocess_image
from lightseg.data.restore import restore_argmax, restore_to_original
from lightseg.errors import ImageError, LightsegError, OutputError, PredictionError
from lightseg.inference.window import StageTimer, logits_to_labels, logits_to_probabilities, probabilities_as_logits
from lightseg.io import (
    atomic_write, check_output_folder, check_output_kind, load_nifti, remove_stale_temps, save_nifti, why_not_a_folder,
)

LogitsStep = Callable[[np.ndarray, StageTimer], np.ndarray]
"""``logits(image, timer)``: blended float32 ``(K, X, Y, Z)`` logits of a preprocessed ``(C, X, Y, Z)`` image."""


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its channel files in channel order (empty if malformed) or why not."""

    name: str
    files: tuple[Path, ...]
    problem: str = ""


def find_input_cases(images_dir: Path, spec: DatasetSpec) -> list[InputCase]:
    """Group ``images_dir``'s files into cases; a malformed case carries its problem, not an error."""
    pattern = channel_file_pattern(spec)
    channels: dict[str, dict[int, Path]] = {}
    singles: dict[str, Path] = {}
    for path in visible_files(images_dir):
        if match := pattern.match(path.name):
            channels.setdefault(match.group(1), {})[int(match.group(2))] = path
        elif path.name.endswith(spec.file_ending):
            singles[path.name[: -len(spec.file_ending)]] = path
    expected = list(range(spec.num_channels))
    cases = []
    for name in sorted(set(channels) | set(singles)):
        found = channels.get(name, {})
        if name in singles and found:
            problem = f"both {singles[name].name} and channel files {name}_XXXX exist; keep one naming"
        elif name in singles:
            problem = "" if spec.num_channels == 1 else (
                f"a single file, but the model needs {spec.num_channels} channels "
                f"({', '.join(spec.channel_names)}) as {name}_0000..{name}_{spec.num_channels - 1:04d}")
        else:
            problem = "" if sorted(found) == expected else (
                f"has channels {sorted(found)} but the model needs {expected} ({', '.join(spec.channel_names)})")
        files = (singles[name],) if name in singles else tuple(found[c] for c in sorted(found))
        cases.append(InputCase(name, () if problem else files, problem))
    return cases


def read_channels(case: InputCase) -> list[nib.Nifti1Image]:
    """Load a case's channels. That they share one grid is checked once, with their values, by
    :func:`lightseg.data.fingerprint.stack_channels` (through ``preprocess_image``), as in training."""
    return [load_nifti(path) for path in case.files]


@dataclass(frozen=True)
class Predictor:
    """A loaded model (any backend) with its plan; :meth:`predict_case` runs one case.

    ``memory_errors``: the backend's out-of-memory exceptions, reported per case with advice
    instead of stopping the other cases.
    """

    logits: LogitsStep
    plan: Plan
    spec: DatasetSpec
    label_values: tuple[int, ...]
    regions: bool
    patch_size: tuple[int, int, int]
    memory_errors: tuple[type[BaseException], ...] = (MemoryError,)
    new_timer: Callable[[], StageTimer] = StageTimer

    def predict_case(
        self, images: Sequence[nib.Nifti1Image], timer: StageTimer, probabilities: bool = False, name: str = "input"
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 labels (and float16 probabilities) on the grid of ``images[0]``; warns
        (:class:`~lightseg.data.intensity.OutOfDistributionWarning`, naming ``name``) when the
        case's normalised intensities lie far outside the plan's training profile."""
        with timer.stage("preprocess"):
            array, props = preprocess_image(images, self.plan)
            warn_if_out_of_distribution(name, props.intensity_profile, self.plan.intensity_profile,
                                        self.plan.channel_names)
            outside = outside_input(images, self.plan)
            for image in images:
                image.uncache()  # the float32 copies are no longer needed
        with timer.stage("sliding window"):
            logits = self.logits(array, timer)
        del array
        with timer.stage("restore"):
            order = self.spec.regions_class_order if self.regions else None
            labels, probs = restore_prediction(logits, props, self.label_values, order, probabilities)
            if outside is not None:
                labels[outside] = self.label_values[0]
                if probs is not None:
                    probs[:, outside] = 0.0
                    if not self.regions:
                        probs[0, outside] = 1.0
            if probs is not None:
                probs = probs.astype(np.float16)
        return labels, probs


def restore_prediction(
    logits: np.ndarray, props: CaseProperties, label_values: Sequence[int], regions_order: Sequence[int] | None,
    probabilities: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Blended ``logits`` on the preprocessed grid (overwritten) as uint8 labels on the input's grid,
    and float32 probabilities there when ``probabilities``. Softmax outputs: probabilities resampled
    before the argmax (:func:`restore_argmax`); region outputs (``regions_order`` given): labels
    painted from the logits, then the sigmoids. Prediction and cross-validation both restore here."""
    if regions_order is not None:
        labels = restore_to_original(logits_to_labels(logits, label_values, regions_order), props)
        scores = logits_to_probabilities(logits, True) if probabilities else None
    else:
        scores = logits_to_probabilities(logits, False)  # in place
        labels = restore_argmax(scores, props, label_values)
    probs = restore_to_original(scores, props, background=regions_order is None) if probabilities else None
    return labels, probs


def outside_input(images: Sequence[nib.Nifti1Image], plan: Plan) -> np.ndarray | None:
    """The voxels of a zero-background input that lie outside its filled nonzero region (every
    channel exactly 0, not enclosed by tissue), which prediction labels background; None when the
    plan was not made for zero-background data (``use_mask_for_norm`` off), or nothing is outside.

    Why: such a voxel is outside the skull-strip (or field-of-view) mask the input was cut with, and
    the training cases of such a plan hold no tissue there (nnU-Net trains those voxels as
    background too). Predicted on a coarser grid and resampled back, a border voxel of the plan's
    grid straddles the mask's edge and spreads the outermost class past it: on the 1 mm MNI152
    template the demo's model (plan 1.5 mm) painted 37,437 zero voxels as CSF, 24 % of the true CSF
    (docs/demo.md). A noisy background has no such voxels, so nothing changes there.
    """
    if not (plan.crop_to_nonzero and any(plan.use_mask_for_norm)):
        return None
    inside = nonzero_mask([image.get_fdata(dtype=np.float32) for image in images])  # cached: no decode, no stacked copy
    return None if inside.all() else ~inside


PREPROCESSING = ("channel_names", "target_spacing", "normalization", "crop_to_nonzero", "anisotropy_threshold")


def ensemble(predictors: Sequence[Predictor], names: Sequence[str]) -> Predictor:
    """One predictor averaging the probabilities of ``predictors`` (named ``names`` in errors).

    They must preprocess alike (the plan's :data:`PREPROCESSING` keys) and predict the same
    labels or regions: the average is taken on one preprocessed grid. A model named twice (by its
    path) is refused: it would count double in the average, unseen."""
    places = [os.path.realpath(name) for name in names]
    twice = sorted({name for name, place in zip(names, places) if places.count(place) > 1})
    if twice:
        raise PredictionError(f"{', '.join(twice)}: given more than once to -m; an ensemble averages distinct models "
                              "(the folds of a cross-validation): name each once")
    first = predictors[0]
    reference = {k: first.plan.to_json()[k] for k in PREPROCESSING}
    for predictor, name in zip(predictors[1:], names[1:]):
        differs = [k for k in PREPROCESSING if predictor.plan.to_json()[k] != reference[k]]
        if differs:
            raise PredictionError(f"{name} preprocesses differently from {names[0]} ({', '.join(differs)}); an ensemble "
                                  "needs models trained on one preprocessing (the folds of one cross-validation, or one cache)")
        if (predictor.label_values, predictor.regions, predictor.spec.regions_class_order) != (
                first.label_values, first.regions, first.spec.regions_class_order):
            raise PredictionError(f"{name} predicts other labels or regions than {names[0]}; ensemble models of one data set")

    def mean_scores(image: np.ndarray, timer: StageTimer) -> np.ndarray:
        total = logits_to_probabilities(first.logits(image, timer), first.regions)
        for predictor in predictors[1:]:
            total += logits_to_probabilities(predictor.logits(image, timer), first.regions)
        return probabilities_as_logits(total / len(predictors), first.regions)

    return Predictor(mean_scores, first.plan, first.spec, first.label_values, first.regions, first.patch_size,
                     tuple({e for p in predictors for e in p.memory_errors}), first.new_timer)


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (``--part``) as ``(I, N)`` with 0 <= I < N, else a PredictionError."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise PredictionError(f"--part {text!r}: write I/N with 0 <= I < N, e.g. --part 0/4 ... --part 3/4 for four jobs")
    return int(index), int(count)


def output_paths(out_dir: Path, name: str, spec: DatasetSpec, probabilities: bool) -> list[Path]:
    paths = [out_dir / f"{name}{spec.file_ending}"]
    return paths + [out_dir / f"{name}.npz"] if probabilities else paths


def check_output_dir(images_dir: Path, out_dir: Path) -> None:
    """Refuse an output folder that is the input folder (:class:`OutputError`): one-channel scans
    ``{case}.nii.gz`` would count as finished predictions (nothing done, exit 0), and label maps
    would land among the scans, to be read as scans by the next run."""
    check_output_folder(out_dir)
    check_output_kind(out_dir, None, "the predictions")
    if images_dir.is_dir() and out_dir.is_dir() and images_dir.samefile(out_dir):
        raise OutputError(f"{out_dir}: the output folder is the input folder {images_dir}; predictions would be "
                          "mixed with the scans: choose another -o")


def has_outputs(out_dir: Path, case: InputCase, spec: DatasetSpec, probabilities: bool) -> bool:
    """Whether every output file of ``case`` is already in ``out_dir``."""
    return all(p.is_file() for p in output_paths(out_dir, case.name, spec, probabilities))


def already_predicted(
    images_dir: str | Path, output_dir: str | Path, spec: DatasetSpec, probabilities: bool,
    part: tuple[int, int] = (0, 1), progress: bool = True,
) -> bool:
    """True when ``images_dir`` holds cases and each one's outputs (of this ``part``) are in ``output_dir``,
    said on stderr where ``progress`` (:func:`report_kept`): a rerun of a finished prediction then
    needs no model (so a later broken checkpoint cannot fail it). An output folder that is the input
    folder is refused first (:func:`check_output_dir`)."""
    images_dir, out_dir = Path(images_dir), Path(output_dir)
    check_output_dir(images_dir, out_dir)
    cases = find_input_cases(images_dir, spec)[part[0] :: part[1]] if images_dir.is_dir() else []
    done = bool(cases) and all(has_outputs(out_dir, c, spec, probabilities) for c in cases)
    if done and progress:
        report_kept(out_dir, len(cases), len(cases))
    return done


def report_kept(output_dir: str | Path, kept: int, total: int) -> None:
    """Say on stderr how many cases were not predicted because their outputs were already in
    ``output_dir`` (nothing when none): a rerun finishes a killed one, and the user should know
    that files there were kept rather than remade."""
    if kept:
        print(f"{output_dir}: {kept} of {total} cases already had their outputs there and were kept, not predicted "
              "again (delete those files to predict them again)", file=sys.stderr)


def predict_folder(
    predictor: Predictor,
    images_dir: str | Path,
    output_dir: str | Path,
    save_probabilities: bool = False,
    progress: bool = True,
    timer: StageTimer | None = None,
    part: tuple[int, int] = (0, 1),
) -> list[Path]:
    """Predict every case in ``images_dir`` (its ``part``: every N-th from the I-th, in name order)
    into ``output_dir``; returns the label files written.

    Cases whose outputs already exist are skipped. ``timer`` (optional) collects the seconds spent
    per stage: read, preprocess, sliding window (of which network), restore, write.
    """
    images_dir, out_dir = Path(images_dir), Path(output_dir)
    if not images_dir.is_dir():
        raise PredictionError(f"{images_dir}: {why_not_a_folder(images_dir, 'input')}")
    spec = predictor.spec
    cases = find_input_cases(images_dir, spec)
    if not cases:
        raise PredictionError(
            f"{images_dir}: no images named {{case}}_0000{spec.file_ending} (or {{case}}{spec.file_ending} "
            "for one-channel models)"
        )
    check_output_dir(images_dir, out_dir)
    cases = cases[part[0] :: part[1]]  # may be none: more jobs than cases
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # left by a killed run; atomic writes never expose them
    timer = timer or predictor.new_timer()
    todo = [c for c in cases if not has_outputs(out_dir, c, spec, save_probabilities)]
    if progress:
        report_kept(out_dir, len(cases) - len(todo), len(cases))
    written, failures = [], []
    for case in tqdm(todo, desc="predict", unit="case", disable=not progress or not todo):
        try:
            if case.problem:
                raise ImageError(case.problem)
            with timer.stage("read"):
                images = read_channels(case)
            labels, probs = predictor.predict_case(images, timer, save_probabilities, name=case.name)
            paths = output_paths(out_dir, case.name, spec, save_probabilities)
            with timer.stage("write"):
                if probs is not None:
                    with atomic_write(paths[1], "wb") as handle:
                        np.savez(handle, probabilities=probs)
                save_nifti(paths[0], labels, images[0])  # the label file last: it marks the case done
            written.append(paths[0])
        except (LightsegError, *predictor.memory_errors) as exc:
            advice = "" if isinstance(exc, LightsegError) else " (out of memory: try --batch-tiles 1 or --device cpu)"
            failures.append(f"{case.name}: {exc}{advice}")
    if failures:
        raise PredictionError(
            f"{len(failures)} of {len(todo)} cases failed; the others are in {out_dir}. Fix these and rerun "
            "(finished cases are skipped):\n  " + "\n  ".join(failures)
        )
    return written
