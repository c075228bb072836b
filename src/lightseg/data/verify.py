"""``lightseg verify``: every problem of a raw nnU-Net v2 data set, listed in one run.

The checks are those of nnU-Net v2's dataset integrity check (listed in ``docs/data.md``), with
two choices made here:

* an origin or direction mismatch between a case's channels and its label is an error, not a
  warning as in nnU-Net: lightseg writes predictions in the image's geometry, so a label on
  another grid would train a silently shifted model. Tolerances are loose enough for float32
  headers: spacing ``rtol=1e-5`` (nnU-Net's ``np.allclose``), origin 1e-3 mm, direction 1e-4;
* nothing stops at the first problem: the folder layout is checked first, then every file is
  read exactly once (the hot path on big data sets) in a process pool, one task per case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightseg.data.dataset import (
    Case,
    DatasetSpec,
    channel_file_pattern,
    find_cases,
    read_dataset_json,
    training_cases,
    visible_files,
)
from lightseg.data.fingerprint import volume_problems
from lightseg.data.parallel import default_workers, map_progress
from lightseg.errors import DatasetError, ImageError
from lightseg.io import NIFTI_SUFFIXES, load_nifti, voxel_spacing, why_not_a_folder

SPACING_RTOL = 1e-5
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


@dataclass(frozen=True)
class Problem:
    """One finding: which check failed, where (file relative to the data set), and what to do."""

    check: str
    where: str
    message: str
    case: str = ""

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_dataset`; ``ok`` when ``problems`` is empty."""

    root: Path
    num_training: int
    num_test: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        counts = f"{self.num_training} training and {self.num_test} test cases"
        if self.ok:
            return f"{self.root}: OK ({counts}, every check passed)"
        lines = [f"{self.root}: {len(self.problems)} problem(s) in {counts}:"]
        lines += [f"  {i}. {p}" for i, p in enumerate(self.problems, 1)]
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        if not self.ok:
            raise DatasetError(self.format())


@dataclass(frozen=True)
class _Grid:
    """What one file contributes to the cross-file checks of its case."""

    where: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


@dataclass(frozen=True)
class _CaseJob:
    root: Path
    name: str
    images: tuple[Path, ...]
    label: Path | None
    label_values: tuple[int, ...]


def verify_dataset(
    root: str | Path, workers: int | None = None, progress: bool = False, raise_on_error: bool = False
) -> VerifyReport:
    """Check a raw data set folder and return every problem found (see module docstring).

    With ``raise_on_error=True`` a data set with problems raises :class:`DatasetError` whose
    message lists them all.
    """
    root = Path(root)
    problems: list[Problem] = []
    training: tuple[Case, ...] = ()
    test: tuple[Case, ...] = ()
    if not root.is_dir():
        problems.append(Problem("dataset-folder", str(root), why_not_a_folder(root, "data set")))
    else:
        try:
            spec = read_dataset_json(root / "dataset.json")
        except DatasetError as exc:
            problems.append(Problem("dataset-json", "dataset.json", _strip_path(str(exc), root / "dataset.json")))
        else:
            try:
                training = training_cases(root, spec)
            except DatasetError as exc:
                problems.append(Problem("dataset-json", "dataset.json", _strip_path(str(exc), root / "dataset.json")))
            test = find_cases(root / "imagesTs", spec)
            problems += _check_spec(spec) + _check_file_ending_given(root) + _check_layout(root, spec, training, test)
            if spec.file_ending in NIFTI_SUFFIXES:
                jobs = [_job(root, case, spec) for case in training + test]
                found = map_progress(
                    _check_case, jobs, workers or default_workers(), desc="verify", progress=progress
                )
                problems += [p for case_problems in found for p in case_problems]
    report = VerifyReport(root, len(training), len(test), tuple(problems))
    if raise_on_error:
        report.raise_if_problems()
    return report


def _check_file_ending_given(root: Path) -> list[Problem]:
    """nnU-Net requires the key; lightseg's readers default to .nii.gz, verify holds data sets to nnU-Net's rule."""
    if "file_ending" in json.loads((root / "dataset.json").read_text()):
        return []
    return [Problem("file-ending", "dataset.json", "'file_ending' is missing (nnU-Net requires it); add "
                    "\"file_ending\": \".nii.gz\" (or \".nii\")")]


def _check_spec(spec: DatasetSpec) -> list[Problem]:
    values = spec.label_values
    if values == tuple(range(len(values))):
        return []
    return [
        Problem(
            "labels-not-consecutive",
            "dataset.json",
            f"label values {list(values)} are not consecutive 0, 1, 2, ...; renumber 'labels' and the "
            "label files so the values run 0..K-1 without gaps",
        )
    ]


def _check_layout(root: Path, spec: DatasetSpec, training: tuple[Case, ...], test: tuple[Case, ...]) -> list[Problem]:
    """Folder-level checks that need no file content: endings, names, missing files, counts."""
    problems: list[Problem] = []
    if spec.file_ending not in NIFTI_SUFFIXES:
        problems.append(
            Problem("file-ending", "dataset.json", f"'file_ending' is {spec.file_ending!r}; lightseg reads "
                    "NIfTI: convert the images to .nii.gz and set \"file_ending\": \".nii.gz\"")
        )
    if not training:
        problems.append(
            Problem("no-cases", "imagesTr", f"no training images named {{case}}_{{XXXX}}{spec.file_ending} found; "
                    "put the images in imagesTr/ and the labels in labelsTr/")
        )
    elif len(training) != spec.num_training:
        problems.append(
            Problem("case-count", "dataset.json", f"'numTraining' is {spec.num_training} but {len(training)} "
                    "training cases were found; set 'numTraining' to the number of cases or add the missing ones")
        )
    pattern = channel_file_pattern(spec)
    image_like = (spec.file_ending, *NIFTI_SUFFIXES)
    for folder in ("imagesTr", "imagesTs"):
        for path in visible_files(root / folder):
            match = pattern.match(path.name)
            if match is None and path.name.endswith(image_like):
                problems.append(
                    Problem("unexpected-file", _rel(path, root), f"name does not follow {{case}}_{{XXXX}}"
                            f"{spec.file_ending} (XXXX = 4-digit channel number), so it is ignored; rename or "
                            "remove it", case=path.name)
                )
            elif match is not None and int(match.group(2)) >= spec.num_channels:
                problems.append(
                    Problem("extra-channel", _rel(path, root), f"channel {int(match.group(2))} but dataset.json "
                            f"declares {spec.num_channels} channel(s) {list(spec.channel_names)}; remove the file "
                            "or add the channel to 'channel_names'", case=match.group(1))
                )
    for path in visible_files(root / "labelsTr"):
        if path.name.endswith(NIFTI_SUFFIXES) and not path.name.endswith(spec.file_ending):
            problems.append(
                Problem("unexpected-file", _rel(path, root), f"label files must be named {{case}}{spec.file_ending}; "
                        "rename or remove it", case=path.name)
            )
    for case in training + test:
        for channel, path in enumerate(case.images):
            if not path.is_file():
                problems.append(
                    Problem("missing-channel", _rel(path, root), f"channel {channel} "
                            f"({spec.channel_names[channel]!r}) of case {case.name!r} is missing; add the file "
                            "or remove the case's other files", case=case.name)
                )
        if case.label is not None and not case.label.is_file():
            problems.append(
                Problem("missing-label", _rel(case.label, root), f"case {case.name!r} has images but no label; "
                        "add the label file or move the images to imagesTs/", case=case.name)
            )
    return problems


def _job(root: Path, case: Case, spec: DatasetSpec) -> _CaseJob:
    label = case.label if case.label is not None and case.label.is_file() else None
    return _CaseJob(root, case.name, tuple(p for p in case.images if p.is_file()), label, spec.label_values)


def _check_case(job: _CaseJob) -> list[Problem]:
    """Read each file of one case once; check it alone, then against the case's first channel."""
    problems: list[Problem] = []
    grids = [_check_file(job, path, problems, is_label=False) for path in job.images]
    if job.label is not None:
        grids.append(_check_file(job, job.label, problems, is_label=True))
    readable = [g for g in grids if g is not None]
    for grid in readable[1:]:
        problems += _compare(readable[0], grid, job.name)
    return problems


def _check_file(job: _CaseJob, path: Path, problems: list[Problem], is_label: bool) -> _Grid | None:
    where = _rel(path, job.root)
    try:
        image = load_nifti(path)
    except ImageError as exc:
        problems.append(Problem("unreadable", where, _strip_path(str(exc), path), job.name))
        return None
    if len(image.shape) != 3 and 0 not in image.shape:  # an empty volume is named below, as on every read
        problems.append(Problem("not-3d", where, _not_3d_advice(image.shape, is_label), job.name))
        return None
    data = image.get_fdata(dtype=np.float32)  # cached by load_nifti: no second read
    volume = volume_problems(image, data)  # what preprocess and predict refuse, in their words
    problems += [Problem(check, where, message, job.name) for check, message in volume]
    if is_label and not {"empty", "non-finite"} & {check for check, _ in volume}:
        problems += _check_label_values(data, job, where)
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = voxel_spacing(image)
    if {"empty", "spacing"} & {check for check, _ in volume}:  # reported above; no grid to compare
        return None
    return _Grid(
        where=where,
        shape=tuple(int(s) for s in image.shape),
        spacing=spacing,
        origin=tuple(float(v) for v in affine[:3, 3]),
        direction=tuple(float(v) for v in (affine[:3, :3] / np.asarray(spacing)).ravel()),
    )


def integer_value_counts(data: np.ndarray) -> dict[int, int] | None:
    """Voxel count per value of a finite, integer-valued array; ``None`` if any value is not whole.

    ``np.bincount`` when the value range fits in uint16 (linear time, unlike the sort behind
    ``np.unique``), which covers label maps and CT alike.
    """
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        return None
    low = int(rounded.min()) if data.size else 0
    if data.size and rounded.max() - low <= np.iinfo(np.uint16).max:
        counts = np.bincount((rounded - low).astype(np.uint16).ravel())
        return {int(v) + low: int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(rounded, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


def _check_label_values(data: np.ndarray, job: _CaseJob, where: str) -> list[Problem]:
    values = integer_value_counts(data)
    if values is None:
        return [
            Problem("label-not-integer", where, "holds non-integer values (a label resampled with linear "
                    "interpolation?); labels must be whole numbers: export it with nearest-neighbour "
                    "interpolation and an integer data type", job.name)
        ]
    undeclared = sorted(set(values) - set(job.label_values))
    if not undeclared:
        return []
    return [
        Problem("label-values", where, f"holds values {undeclared} that dataset.json 'labels' does not declare "
                f"(declared: {list(job.label_values)}); fix the label file or declare the values", job.name)
    ]


def _compare(ref: _Grid, other: _Grid, case: str) -> list[Problem]:
    """One problem per geometry property in which ``other`` differs from the case's first channel."""
    problems = []
    fix = f"every channel and the label of a case must share one voxel grid: resample or re-export it onto {ref.where}'s grid"
    if other.shape != ref.shape:
        problems.append(Problem("shape-mismatch", other.where, f"shape {other.shape} differs from {ref.shape} "
                                f"of {ref.where}; {fix}", case))
    if not np.allclose(other.spacing, ref.spacing, rtol=SPACING_RTOL, atol=0.0):
        problems.append(Problem("spacing-mismatch", other.where, f"spacing {_fmt(other.spacing)} mm differs from "
                                f"{_fmt(ref.spacing)} mm of {ref.where}; {fix}", case))
    if not np.allclose(other.origin, ref.origin, rtol=0.0, atol=ORIGIN_ATOL_MM):
        problems.append(Problem("origin-mismatch", other.where, f"origin {_fmt(other.origin)} mm differs from "
                                f"{_fmt(ref.origin)} mm of {ref.where}; {fix}", case))
    if not np.allclose(other.direction, ref.direction, rtol=0.0, atol=DIRECTION_ATOL):
        problems.append(Problem("direction-mismatch", other.where, f"orientation (direction cosines) "
                                f"{_fmt(other.direction)} differs from {_fmt(ref.direction)} of {ref.where}; {fix}",
                                case))
    return problems


def _not_3d_advice(shape: tuple[int, ...], is_label: bool) -> str:
    text = f"has {len(shape)} dimensions {tuple(shape)}, but lightseg needs 3D volumes; "
    if len(shape) == 4 and not is_label:
        return text + ("a 4D image with channels on the last axis is the Medical Segmentation Decathlon layout: "
                       "convert the data set with `lightseg convert-msd`")
    return text + "save one 3D volume per file (one file per channel, {case}_{XXXX})"


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _strip_path(message: str, path: Path) -> str:
    """Error messages start with the file name; a problem names it already in ``where``."""
    return message.removeprefix(f"{path}: ")
