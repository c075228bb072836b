"""``lightseg convert-msd``: a Medical Segmentation Decathlon task as an nnU-Net v2 raw data set.

MSD keeps every channel of a case in one 4D NIfTI (channels on the last axis) and maps label
integers to names (``{"0": "background"}``); nnU-Net v2 wants one 3D file per channel
(``{case}_{XXXX}.nii.gz``) and names mapped to integers. Geometry is kept exactly: a 4D image is
split with its own header (affine, qform, sform and their codes) and voxel values; 3D images
and label files are copied byte for byte, as nnU-Net's converter does. Cases come from the
task's ``training`` and ``test`` lists; hidden entries (macOS ``._*`` resource forks) are
skipped. A case is complete once its last file exists (label last), so a rerun after a kill
converts only what is missing; ``dataset.json`` is written after all cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
import numpy as np

from lightseg.data.dataset import parse_dataset_json
from lightseg.data.parallel import default_workers, map_progress
from lightseg.errors import DatasetError, ImageError
from lightseg.io import RAW_DATA_SET, check_output_folder, check_output_kind, copy_file, save_nifti, write_json

_MSD_ONLY_KEYS = ("modality", "training", "test", "tensorImageSize")
_ENDING = ".nii.gz"


@dataclass(frozen=True)
class _Job:
    """Convert one case: its 4D (or 3D) image and, for training cases, its label."""

    name: str
    image: Path
    label: Path | None
    images_out: Path
    labels_out: Path
    num_channels: int


def convert_msd(task_dir: str | Path, out_dir: str | Path, workers: int | None = None, progress: bool = False) -> Path:
    """Write ``task_dir`` (an MSD ``TaskXX_Name`` folder) as an nnU-Net v2 data set in ``out_dir``.

    Returns ``out_dir``. Raises :class:`DatasetError` naming every missing or malformed entry
    before writing anything, and :class:`ImageError` for an unreadable or wrongly shaped image.
    Run ``lightseg verify`` on the result to check the content of every case.
    """
    task_dir, out = Path(task_dir), Path(out_dir)
    source = _read_msd_json(task_dir / "dataset.json")
    target = msd_to_nnunet_json(source, str(task_dir / "dataset.json"))
    existing = out / "dataset.json"
    if existing.is_file() and json.loads(existing.read_text()) != target:
        raise DatasetError(f"{out}: holds another data set (its dataset.json differs); choose an empty output folder")
    check_output_folder(out)
    check_output_kind(out, RAW_DATA_SET, "the converted data set")
    num_channels = len(target["channel_names"])
    _check_entries(source, task_dir / "dataset.json")
    jobs = [
        _Job(_case_name(image), task_dir / image, task_dir / label, out / "imagesTr", out / "labelsTr", num_channels)
        for image, label in _training_entries(source)
    ] + [
        _Job(_case_name(image), task_dir / image, None, out / "imagesTs", out / "labelsTr", num_channels)
        for image in _test_entries(source)
    ]
    missing = [str(p) for job in jobs for p in (job.image, job.label) if p is not None and not p.is_file()]
    if missing:
        raise DatasetError(
            f"{task_dir}: {len(missing)} file(s) listed in dataset.json do not exist: {', '.join(missing)}; "
            "restore them or remove their entries"
        )
    map_progress(_convert_case, jobs, workers or default_workers(), desc="convert-msd", progress=progress)
    write_json(existing, target)
    return out


def msd_to_nnunet_json(source: dict[str, Any], where: str = "dataset.json") -> dict[str, Any]:
    """MSD ``dataset.json`` -> nnU-Net v2 ``dataset.json`` (validated; other keys are kept)."""
    names = list(source["labels"].values()) if isinstance(source.get("labels"), dict) else []
    twice = sorted({str(n) for n in names if names.count(n) > 1})
    if twice:
        raise DatasetError(f"{where}: label name(s) {twice} are given to several values; nnU-Net maps names to values, "
                           "so all but one value would be lost: give each value its own name")
    try:
        labels = {name: int(value) for value, name in sorted(source["labels"].items(), key=lambda kv: int(kv[0]))}
        channels = {str(int(k)): v for k, v in sorted(source["modality"].items(), key=lambda kv: int(kv[0]))}
    except (AttributeError, TypeError, ValueError) as exc:
        raise DatasetError(
            f"{where}: 'modality' and 'labels' must map integers to names, like {{\"0\": \"MRI\"}} ({exc})"
        ) from exc
    target = {k: v for k, v in source.items() if k not in _MSD_ONLY_KEYS}
    target.update(
        channel_names=channels, labels=labels, numTraining=len(_training_entries(source)), file_ending=_ENDING
    )
    parse_dataset_json(target, where)
    return target


def _read_msd_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found; pass an MSD task folder (TaskXX_Name with dataset.json)")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); fix the file") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: top level must be a JSON object")
    for key in ("modality", "labels", "training"):
        if not isinstance(obj.get(key), (dict, list)):
            raise DatasetError(f"{path}: MSD key {key!r} is missing; is this an MSD task (or already nnU-Net v2)?")
    training = obj["training"]
    if not isinstance(training, list) or not all(isinstance(e, dict) and {"image", "label"} <= e.keys() for e in training):
        raise DatasetError(f"{path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} entries")
    if not isinstance(obj.get("test", []), list) or not all(isinstance(e, str) for e in obj.get("test", [])):
        raise DatasetError(f"{path}: 'test' must be a list of image paths")
    return obj


def _check_entries(source: dict[str, Any], where: Path) -> None:
    """Every entry is a relative path inside the task folder (no ``..``, not absolute: the task's
    dataset.json must not make lightseg read files elsewhere), and no two entries give one case
    name (the second would silently replace the first)."""
    entries = [e for pair in _training_entries(source) for e in pair] + _test_entries(source)
    for entry in entries:
        parts = PurePosixPath(entry).parts
        if PurePosixPath(entry).is_absolute() or ".." in parts or "\\" in entry:
            raise DatasetError(f"{where}: entry {entry!r} points outside the task folder; entries must be relative "
                               "paths inside it, such as ./imagesTr/case.nii.gz")
    seen: dict[str, str] = {}
    for entry in [image for image, _ in _training_entries(source)] + _test_entries(source):
        name = _case_name(entry)
        if name in seen:
            raise DatasetError(f"{where}: entries {seen[name]!r} and {entry!r} give the same case name {name!r}; "
                               "rename one of the files (and its entry) so that every case has its own name")
        seen[name] = entry


def _visible(entry: str) -> bool:
    return not Path(entry).name.startswith(".")


def _training_entries(source: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["image"], e["label"]) for e in source["training"] if _visible(e["image"])]


def _test_entries(source: dict[str, Any]) -> list[str]:
    return [e for e in source.get("test", []) if _visible(e)]


def _case_name(entry: str) -> str:
    name = Path(entry).name
    if not name.endswith(_ENDING):
        raise DatasetError(f"dataset.json: entry {entry!r} is not a {_ENDING} file; MSD images are {_ENDING}")
    return name[: -len(_ENDING)]


def _convert_case(job: _Job) -> None:
    channel_paths = [job.images_out / f"{job.name}_{c:04d}{_ENDING}" for c in range(job.num_channels)]
    last = job.labels_out / f"{job.name}{_ENDING}" if job.label is not None else channel_paths[-1]
    if last.is_file():
        return
    try:
        image = nib.load(job.image)
        shape = image.shape
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ImageError(f"{job.image}: cannot read this NIfTI header ({type(exc).__name__}: {exc}); re-copy it") from exc
    if len(shape) == 3 and job.num_channels == 1:
        copy_file(job.image, channel_paths[0])
    elif len(shape) == 4 and shape[3] == job.num_channels:
        try:
            data = np.asanyarray(image.dataobj)
        except Exception as exc:  # truncated gzip stream, short file
            raise ImageError(f"{job.image}: cannot read the voxel data ({type(exc).__name__}: {exc}); "
                             "the file is corrupt or truncated, re-copy it") from exc
        for c, path in enumerate(channel_paths):
            save_nifti(path, data[..., c], image)
    else:
        raise ImageError(
            f"{job.image}: shape {shape} does not hold the {job.num_channels} channel(s) that 'modality' declares "
            "(MSD stores channels on the last axis of a 4D image); fix 'modality' or the image"
        )
    if job.label is not None:
        copy_file(job.label, last)


