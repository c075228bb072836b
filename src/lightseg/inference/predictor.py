"""Predict a folder of NIfTI scans with a trained run folder into label maps on the input grid.

Input: ``IMAGES_DIR/{case}_{XXXX}{file_ending}`` (one file per channel, nnU-Net's naming), or
``{case}{file_ending}`` for one-channel models. Output: ``OUT_DIR/{case}{file_ending}``, uint8
labels on exactly the first channel's grid (shape, affine, qform/sform codes; written through
:func:`lightseg.io.save_nifti`), and with ``save_probabilities`` ``OUT_DIR/{case}.npz`` holding
``probabilities``, float16 ``(K, X, Y, Z)`` on the same grid (softmax classes in ``label_values``
order, or one sigmoid per region).

Per case: the run's plan is applied (:func:`lightseg.data.preprocess.preprocess_image`), the
network runs as a sliding window (:mod:`lightseg.inference.sliding`), logits become uint8
labels on the preprocessed grid, and :func:`lightseg.data.preprocess.restore_to_original`
resamples them back and uncrops them. Labels rather than probabilities are resampled back (per
class, linear, then argmax), which keeps memory at a few volumes on large scans.

Many cases: a progress bar; a case whose outputs exist is skipped, and every file is written
atomically, so an interrupted run resumes where it stopped; a case that fails (unreadable file,
wrong channels, out of memory) is reported and the others are still predicted, then a
:class:`PredictionError` lists the failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from lightseg.data.dataset import DatasetSpec, channel_file_pattern, visible_files
from lightseg.data.plan import Plan, parse_plan
from lightseg.data.preprocess import preprocess_image, restore_to_original
from lightseg.errors import ImageError, LightsegError, PredictionError
from lightseg.inference.sliding import (
    StageTimer,
    logits_to_labels,
    logits_to_probabilities,
    sliding_window_logits,
)
from lightseg.io import atomic_write, load_nifti, save_nifti

AFFINE_TOLERANCE = 1e-3  # mm: channels of one case must share their grid


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
    """Load a case's channels, which must share one grid (shape and affine)."""
    images = [load_nifti(path) for path in case.files]
    for path, image in zip(case.files[1:], images[1:]):
        if image.shape != images[0].shape or not np.allclose(image.affine, images[0].affine, atol=AFFINE_TOLERANCE):
            raise ImageError(
                f"{path}: its grid (shape {image.shape}) differs from {case.files[0].name} (shape {images[0].shape}) "
                "in shape or affine; all channels of a case must be co-registered on one grid"
            )
    return images


@dataclass(frozen=True)
class Predictor:
    """A loaded run and the sliding-window settings; :meth:`predict_case` runs one case."""

    model: nn.Module
    plan: Plan
    spec: DatasetSpec
    label_values: tuple[int, ...]
    regions: bool
    patch_size: tuple[int, int, int]
    step: float = 0.5
    tta: bool = False
    batch_tiles: int = 1
    device: torch.device = torch.device("cpu")
    channels_last: bool = True

    def predict_case(
        self, images: Sequence[nib.Nifti1Image], timer: StageTimer, probabilities: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 labels (and float16 probabilities) on the grid of ``images[0]``."""
        with timer.stage("preprocess"):
            array, props = preprocess_image(images, self.plan)
            for image in images:
                image.uncache()  # the float32 copies are no longer needed
        with timer.stage("sliding window"):
            logits = sliding_window_logits(self.model, array, self.patch_size, self.step, self.tta,
                                           self.batch_tiles, self.device, timer, self.channels_last)
        del array
        with timer.stage("restore"):
            order = self.spec.regions_class_order if self.regions else None
            labels = restore_to_original(logits_to_labels(logits, self.label_values, order), props)
            probs = None
            if probabilities:
                probs = restore_to_original(logits_to_probabilities(logits, self.regions), props,
                                            background=not self.regions).astype(np.float16)
        return labels, probs


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise PredictionError(f"unknown device {name!r}; use 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictionError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def load_predictor(
    run_dir: str | Path, checkpoint: str = "final", step: float = 0.5, tta: bool = False,
    batch_tiles: int = 1, device: str = "cpu", channels_last: bool = True,
) -> Predictor:
    """Rebuild the run's model and plan (:func:`lightseg.training.checkpoint.load_run`).

    ``channels_last`` runs the network in ``channels_last_3d`` memory format, about 1.8x faster
    for LightMedSeg's CPU forward (docs/prediction.md; ``benchmarks/predict_brats.py`` measures it).
    """
    from lightseg.training.checkpoint import load_run

    if not 0.0 < step <= 1.0:
        raise PredictionError(f"--step must be in (0, 1] (a fraction of the tile), got {step}")
    if batch_tiles < 1:
        raise PredictionError(f"--batch-tiles must be at least 1, got {batch_tiles}")
    torch_device = _device(device)
    model, config, plan, spec = load_run(run_dir, checkpoint, torch_device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return Predictor(
        model=model,
        plan=parse_plan(plan, str(Path(run_dir) / "plan.json")),
        spec=spec,
        label_values=tuple(config.label_values),
        regions=config.regions is not None,
        patch_size=tuple(config.patch_size),
        step=step,
        tta=tta,
        batch_tiles=batch_tiles,
        device=torch_device,
        channels_last=channels_last,
    )


def output_paths(out_dir: Path, name: str, spec: DatasetSpec, probabilities: bool) -> list[Path]:
    paths = [out_dir / f"{name}{spec.file_ending}"]
    return paths + [out_dir / f"{name}.npz"] if probabilities else paths


def predict(
    images_dir: str | Path,
    output_dir: str | Path,
    run_dir: str | Path,
    checkpoint: str = "final",
    step: float = 0.5,
    tta: bool = False,
    save_probabilities: bool = False,
    device: str = "cpu",
    batch_tiles: int = 1,
    progress: bool = True,
    timer: StageTimer | None = None,
    channels_last: bool = True,
) -> list[Path]:
    """Predict every case in ``images_dir`` into ``output_dir``; returns the label files written.

    Cases whose outputs already exist are skipped. ``timer`` (optional) collects the seconds spent
    per stage: read, preprocess, sliding window (of which network), restore, write.
    ``channels_last``: see :func:`load_predictor`.
    """
    images_dir, out_dir = Path(images_dir), Path(output_dir)
    if not images_dir.is_dir():
        raise PredictionError(f"{images_dir}: input folder does not exist")
    predictor = load_predictor(run_dir, checkpoint, step, tta, batch_tiles, device, channels_last)
    spec = predictor.spec
    cases = find_input_cases(images_dir, spec)
    if not cases:
        raise PredictionError(
            f"{images_dir}: no images named {{case}}_0000{spec.file_ending} (or {{case}}{spec.file_ending} "
            "for one-channel models)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp"):  # left by a killed run; atomic writes never expose them
        stale.unlink(missing_ok=True)
    timer = timer or StageTimer(predictor.device)
    todo = [c for c in cases if not all(p.is_file() for p in output_paths(out_dir, c.name, spec, save_probabilities))]
    written, failures = [], []
    for case in tqdm(todo, desc="predict", unit="case", disable=not progress or not todo):
        try:
            if case.problem:
                raise ImageError(case.problem)
            with timer.stage("read"):
                images = read_channels(case)
            labels, probs = predictor.predict_case(images, timer, save_probabilities)
            paths = output_paths(out_dir, case.name, spec, save_probabilities)
            with timer.stage("write"):
                if probs is not None:
                    with atomic_write(paths[1], "wb") as handle:
                        np.savez(handle, probabilities=probs)
                save_nifti(paths[0], labels, images[0])  # the label file last: it marks the case done
            written.append(paths[0])
        except (LightsegError, torch.OutOfMemoryError) as exc:
            advice = " (out of memory: try --batch-tiles 1 or --device cpu)" if isinstance(exc, torch.OutOfMemoryError) else ""
            failures.append(f"{case.name}: {exc}{advice}")
    if failures:
        raise PredictionError(
            f"{len(failures)} of {len(todo)} cases failed; the others are in {out_dir}. Fix these and rerun "
            "(finished cases are skipped):\n  " + "\n  ".join(failures)
        )
    return written


def default_device() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"

