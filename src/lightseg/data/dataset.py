"""nnU-Net v2 raw data sets as typed objects: ``dataset.json``, ``imagesTr``, ``labelsTr`` (or the
case list of dataset.json's ``dataset`` key).

Reading is strict about the JSON (wrong types are a :class:`DatasetError` naming the key) and
lenient about files: a missing image is recorded in :class:`Case` and reported by
``lightseg verify`` together with every other problem, instead of stopping at the first one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightseg.errors import DatasetError
from lightseg.io import NIFTI_SUFFIXES, why_not_a_folder

LabelValue = int | tuple[int, ...]
IGNORE_NAME = "ignore"  # nnU-Net's name for the label of unannotated voxels


@dataclass(frozen=True)
class DatasetSpec:
    """The content of ``dataset.json``.

    ``labels`` maps a name to one integer, or, for region-based data sets (BraTS), to a tuple of
    integers that together form the region; ``regions_class_order`` then says which integer each
    region is painted back as. The label named ``"ignore"`` (nnU-Net's sparse annotation, the
    highest value) marks unannotated voxels: it may appear in label files but is no class, no
    network output and no evaluated target.
    """

    channel_names: tuple[str, ...]
    labels: dict[str, LabelValue]
    num_training: int
    file_ending: str = ".nii.gz"
    regions_class_order: tuple[int, ...] | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, tuple) for v in self.labels.values())

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every integer that may appear in a label file, sorted (background included)."""
        values: set[int] = set()
        for value in self.labels.values():
            values.update(value if isinstance(value, tuple) else (value,))
        return tuple(sorted(values))

    @property
    def ignore_label(self) -> int | None:
        """The value of the label named ``"ignore"``, or ``None``."""
        value = self.labels.get(IGNORE_NAME)
        return value if isinstance(value, int) else None

    @property
    def class_values(self) -> tuple[int, ...]:
        """The label values the network predicts: :attr:`label_values` without the ignore label."""
        return tuple(v for v in self.label_values if v != self.ignore_label)

    @property
    def regions(self) -> tuple[tuple[int, ...], ...]:
        """Foreground targets: one tuple of label values per output channel (no background, no ignore label)."""
        out = []
        for name, value in self.labels.items():
            members = value if isinstance(value, tuple) else (value,)
            if members != (0,) and name != IGNORE_NAME:
                out.append(members)
        return tuple(out)

    @property
    def num_classes(self) -> int:
        """Network output channels: classes incl. background, or one sigmoid per region."""
        return len(self.regions) if self.has_regions else len(self.class_values)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.labels)

    def to_json(self) -> dict[str, Any]:
        labels = {k: list(v) if isinstance(v, tuple) else v for k, v in self.labels.items()}
        out: dict[str, Any] = dict(self.extra)
        out.update(
            channel_names={str(i): n for i, n in enumerate(self.channel_names)},
            labels=labels,
            numTraining=self.num_training,
            file_ending=self.file_ending,
        )
        if self.name:
            out["name"] = self.name
        if self.regions_class_order is not None:
            out["regions_class_order"] = list(self.regions_class_order)
        return out


@dataclass(frozen=True)
class Case:
    """One case: its channel files in channel order (paths may not exist) and its label file."""

    name: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """A raw data set folder: the spec, the training cases and the optional test cases."""

    root: Path
    spec: DatasetSpec
    training: tuple[Case, ...]
    test: tuple[Case, ...] = ()

    def case(self, name: str) -> Case:
        for case in self.training + self.test:
            if case.name == name:
                return case
        raise DatasetError(f"{self.root}: no case named {name!r}")


def parse_dataset_json(obj: Any, source: str = "dataset.json") -> DatasetSpec:
    """Validate a parsed ``dataset.json`` and build a :class:`DatasetSpec`."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: top level must be a JSON object, got {type(obj).__name__}")
    for key in ("channel_names", "labels", "numTraining"):
        if key not in obj:
            raise DatasetError(f"{source}: required key {key!r} is missing (see nnU-Net v2 format)")
    channels = obj["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{source}: 'channel_names' must be a non-empty object like {{\"0\": \"T1\"}}")
    try:
        order = sorted(channels, key=int)
    except (TypeError, ValueError):
        raise DatasetError(f"{source}: 'channel_names' keys must be channel numbers \"0\", \"1\", ...") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise DatasetError(f"{source}: 'channel_names' keys must be 0..{len(order) - 1} without gaps")
    if not all(isinstance(channels[k], str) for k in order):
        raise DatasetError(f"{source}: 'channel_names' values must be strings such as \"CT\" or \"T2\"")
    labels = _parse_labels(obj["labels"], source)
    background = obj["labels"].get("background")
    if not _is_int(background) or background != 0:  # nnU-Net's LabelManager rule: 0 is the label named background
        raise DatasetError(f"{source}: 'labels' must declare the background as 0 (\"background\": 0, as nnU-Net requires), "
                           f"got \"background\": {json.dumps(background)[:40] if background is not None else 'missing'}")
    _check_ignore_label(labels, source)
    num_training = obj["numTraining"]
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        raise DatasetError(f"{source}: 'numTraining' must be a non-negative integer, got {num_training!r}")
    file_ending = obj.get("file_ending", ".nii.gz")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise DatasetError(f"{source}: 'file_ending' must be a string like \".nii.gz\", got {file_ending!r}")
    if not isinstance(obj.get("name", ""), str):
        raise DatasetError(f"{source}: 'name' must be a string, got {obj['name']!r:.60}")
    order_key = obj.get("regions_class_order")
    regions_order = None
    if order_key is not None:
        if not isinstance(order_key, list) or not all(_is_int(v) for v in order_key):
            raise DatasetError(f"{source}: 'regions_class_order' must be a list of integers")
        regions_order = tuple(order_key)
    spec = DatasetSpec(
        channel_names=tuple(channels[k] for k in order),
        labels=labels,
        num_training=num_training,
        file_ending=file_ending,
        regions_class_order=regions_order,
        name=str(obj.get("name", "")),
        extra={k: v for k, v in obj.items() if k not in _KNOWN_KEYS},
    )
    if spec.has_regions and (regions_order is None or len(regions_order) != len(spec.regions)):
        raise DatasetError(
            f"{source}: region labels need 'regions_class_order' with one entry per region "
            f"({len(spec.regions)} regions)"
        )
    _check_label_uniqueness(spec, source)
    return spec


def _check_label_uniqueness(spec: DatasetSpec, source: str) -> None:
    """Two names for one value (or one region) would silently drop a class; a region holding the
    background would train on (and score) the background; a ``regions_class_order`` value that no
    label declares would make prediction write a value nobody declared."""
    seen: dict[tuple[int, ...], str] = {}
    for name, value in spec.labels.items():
        members = tuple(sorted(set(value))) if isinstance(value, tuple) else (value,)
        if members in seen:
            raise DatasetError(f"{source}: labels {seen[members]!r} and {name!r} have the same value "
                               f"{list(members) if len(members) > 1 else members[0]}; give each class its own value")
        seen[members] = name
        if spec.has_regions and len(members) > 1 and 0 in members:
            raise DatasetError(f"{source}: region {name!r} {list(members)} contains the background 0; "
                               "a region lists foreground values only")
    if spec.regions_class_order is not None:
        undeclared = [v for v in spec.regions_class_order if v == 0 or v not in spec.label_values]
        if undeclared:
            raise DatasetError(f"{source}: 'regions_class_order' values {undeclared} are not foreground values of "
                               f"'labels' ({[v for v in spec.label_values if v]}); each region is painted back as one of them")


def _check_ignore_label(labels: dict[str, LabelValue], source: str) -> None:
    """nnU-Net's rule: the ignore label is one integer, above every other label value and in no region."""
    if IGNORE_NAME not in labels:
        return
    ignore = labels[IGNORE_NAME]
    others = {v for name, value in labels.items() if name != IGNORE_NAME
              for v in (value if isinstance(value, tuple) else (value,))}
    if not isinstance(ignore, int) or ignore == 0:
        raise DatasetError(f"{source}: the 'ignore' label must be one integer above 0, got {ignore!r}")
    if ignore <= max(others):
        raise DatasetError(f"{source}: the 'ignore' label ({ignore}) must be the highest label value (nnU-Net's "
                           f"rule), but {max(others)} is declared too; give 'ignore' the value {max(others) + 1}")


_KNOWN_KEYS = {"channel_names", "labels", "numTraining", "file_ending", "regions_class_order", "name"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_labels(labels: Any, source: str) -> dict[str, LabelValue]:
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{source}: 'labels' must be a non-empty object like {{\"background\": 0}}")
    out: dict[str, LabelValue] = {}
    for name, value in labels.items():
        if _is_int(value) and 0 <= value <= 255:
            out[name] = value
        elif isinstance(value, list) and value and all(_is_int(v) and 0 <= v <= 255 for v in value):
            out[name] = tuple(value)
        else:
            raise DatasetError(
                f"{source}: label {name!r} must be an integer 0..255 (label maps are stored as 8 bits) or a list of "
                f"them, got {value!r}"
            )
    return out


def read_dataset_json(path: str | Path) -> DatasetSpec:
    """Read and validate ``dataset.json``; every problem is a :class:`DatasetError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json not found; a data set folder needs one (nnU-Net v2 format)")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise DatasetError(f"{path}: not valid JSON ({exc}); fix the file") from exc
    return parse_dataset_json(obj, str(path))


def channel_file_pattern(spec: DatasetSpec) -> re.Pattern[str]:
    """``{case}_{XXXX}{file_ending}``: group 1 is the case name, group 2 the channel number."""
    return re.compile(rf"^(.+)_(\d{{4}}){re.escape(spec.file_ending)}$")


def visible_files(folder: Path) -> list[Path]:
    """Files in ``folder`` whose name does not start with a dot, sorted; [] if no such folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def find_cases(images_dir: Path, spec: DatasetSpec, labels_dir: Path | None = None) -> tuple[Case, ...]:
    """Cases in ``images_dir`` (and ``labels_dir``): a case exists if any of its files exists.

    Expected paths are filled in for missing channels so that ``verify`` can name them. Hidden
    files are skipped: macOS writes ``._{name}`` resource forks beside every copied file.
    """
    pattern = channel_file_pattern(spec)
    names: set[str] = set()
    names.update(m.group(1) for p in visible_files(images_dir) if (m := pattern.match(p.name)))
    if labels_dir is not None:
        names.update(
            p.name[: -len(spec.file_ending)] for p in visible_files(labels_dir) if p.name.endswith(spec.file_ending)
        )
    return tuple(
        Case(
            name=name,
            images=tuple(images_dir / f"{name}_{c:04d}{spec.file_ending}" for c in range(spec.num_channels)),
            label=None if labels_dir is None else labels_dir / f"{name}{spec.file_ending}",
        )
        for name in sorted(names)
    )


def listed_cases(root: Path, spec: DatasetSpec) -> tuple[Case, ...]:
    """Training cases from dataset.json's ``dataset`` key (nnU-Net v2): ``{case: {"images": [one path
    per channel], "label": path}}``, each path absolute or relative to the data set folder
    (``$VARS`` expanded, as nnU-Net), in case-name order."""
    listed = spec.extra["dataset"]
    where = f"{root / 'dataset.json'}: 'dataset'"
    if not isinstance(listed, dict) or not listed:
        raise DatasetError(f"{where} must be an object {{case: {{\"images\": [...], \"label\": ...}}}}")

    def path(text: Any, what: str) -> Path:
        if not isinstance(text, str) or not text:
            raise DatasetError(f"{where}: {what} must be a file path, got {text!r}")
        return root / os.path.expandvars(text)  # an absolute path stays absolute

    cases = []
    for name in sorted(listed):
        entry = listed[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list) or "label" not in entry:
            raise DatasetError(f"{where}: case {name!r} must be {{\"images\": [paths], \"label\": path}}")
        if len(entry["images"]) != spec.num_channels:
            raise DatasetError(f"{where}: case {name!r} lists {len(entry['images'])} images but 'channel_names' "
                               f"declares {spec.num_channels} channels; list one image per channel, in channel order")
        images = tuple(path(p, f"image {i} of case {name!r}") for i, p in enumerate(entry["images"]))
        cases.append(Case(name=name, images=images, label=path(entry["label"], f"the label of case {name!r}")))
    return tuple(cases)


def training_cases(root: Path, spec: DatasetSpec) -> tuple[Case, ...]:
    """The ``dataset`` key's cases when dataset.json has one, else those of ``imagesTr``/``labelsTr``."""
    if "dataset" in spec.extra:
        return listed_cases(root, spec)
    return find_cases(root / "imagesTr", spec, root / "labelsTr")


NNUNET_PREPROCESSED = ("nnUNetPlans.json", "dataset_fingerprint.json")


def load_dataset(root: str | Path) -> Dataset:
    """Open an nnU-Net v2 raw data set folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: {why_not_a_folder(root, 'data set')}")
    marker = next((name for name in NNUNET_PREPROCESSED if (root / name).is_file()), None)
    if marker and not (root / "imagesTr").is_dir():
        raise DatasetError(f"{root}: this is an nnU-Net preprocessed folder ({marker}), not a raw data set; lightseg "
                           "plans and preprocesses itself: pass the raw data set instead ($nnUNet_raw/"
                           f"{root.name}, with dataset.json, imagesTr and labelsTr)")
    spec = read_dataset_json(root / "dataset.json")
    training = training_cases(root, spec)
    if not training:
        _check_file_ending(root, spec)
    test = find_cases(root / "imagesTs", spec)
    return Dataset(root=root, spec=spec, training=training, test=test)


def _check_file_ending(root: Path, spec: DatasetSpec) -> None:
    """A data set whose images all end otherwise than its ``file_ending`` says: name the setting,
    not "no training cases" (a ``.nii`` data set declared ``.nii.gz``, or the reverse)."""
    files = [p.name for p in visible_files(root / "imagesTr")]
    endings = sorted({e for e in NIFTI_SUFFIXES if any(n.endswith(e) for n in files)} - {spec.file_ending})
    if files and endings and not any(n.endswith(spec.file_ending) for n in files):
        raise DatasetError(f"{root / 'dataset.json'}: 'file_ending' is {json.dumps(spec.file_ending)}, but the "
                           f"{len(files)} files in imagesTr end in {' or '.join(map(json.dumps, endings))}; set "
                           f"\"file_ending\": {json.dumps(endings[0])} (or rename the files)")
