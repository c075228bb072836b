"""Prediction: input geometry kept, regions painted back, resume, one bad case among good ones.

Most tests use a pointwise "sign" network (logits are affine functions of the first channel), so
the exact expected mask follows from the plan's z-score by hand and any error in cropping,
resampling, blending or writing shows as a wrong voxel. One test runs a real tiny LUnet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

import lightseg
from lightseg.cli import main
from lightseg.data.dataset import read_dataset_json
from lightseg.data.orientation import canonical_order
from lightseg.data.plan import load_plan, override, save_plan
from lightseg.data.preprocess import preprocess_dataset
from lightseg.data.synthetic import make_synthetic_dataset
from lightseg.errors import PredictionError
from lightseg.inference.predictor import find_input_cases, predict
from lightseg.inference.sliding import logits_to_labels
from lightseg.io import write_json
from lightseg.models import create_model
from lightseg.models.registry import _REGISTRY, ModelEntry
from lightseg.training.checkpoint import save_checkpoint
from lightseg.training.config import resolve_config

# Voxel axes permuted and flipped (not RAS), anisotropic: spacing (0.9, 1.2, 3.0) mm per voxel axis.
AFFINE = np.array([[0, 0, -3.0, 40], [-0.9, 0, 0, 25], [0, 1.2, 0, -12], [0, 0, 0, 1]])
SPACING = (0.9, 1.2, 3.0)
RAS_SPACING = canonical_order(SPACING, "PSL")  # the scans turned to RAS, as preprocessing turns them: no resampling
SHAPE = (40, 30, 12)
INNER = (slice(3, 35), slice(4, 27), slice(2, 10))  # nonzero box: preprocessing crops to it


class SignNet(nn.Module):
    """Logits ``[-x, x]`` (softmax, 2 classes) or ``x - t`` per threshold (regions), x = channel 0."""

    def __init__(self, in_channels: int, num_classes: int, thresholds: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, (1, 1, 1)
        self.thresholds = tuple(thresholds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, :1]
        if self.thresholds:
            return torch.cat([c - t for t in self.thresholds], 1)
        return torch.cat([-c, c], 1)


@pytest.fixture
def sign_net(monkeypatch):
    monkeypatch.setitem(_REGISTRY, "test_sign", ModelEntry("test_sign", SignNet, "pointwise test network"))


class SlopeNet(nn.Module):
    """Logits ``[-d, d]`` with d the central difference of channel 0 along the first voxel axis:
    a network that sees direction, so a turned input gives another mask unless it is turned back."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.size_divisor = in_channels, num_classes, (1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype).reshape(1, 1, 3, 1, 1)
        d = torch.nn.functional.conv3d(x[:, :1], kernel, padding=(1, 0, 0))
        return torch.cat([-d, d], 1)


def make_run(run: Path, raw: Path, cache: Path, model: str, model_kwargs: dict, target_spacing=None) -> Path:
    """A run folder as `lightseg train` writes it, with untrained weights."""
    plan = load_plan(cache / "plan.json")
    if target_spacing is not None:
        plan = override(plan, target_spacing, None)
    spec = read_dataset_json(raw / "dataset.json")
    config, _ = resolve_config(model, spec, plan.patch_size, {}, {"model_kwargs": model_kwargs, "region_training": True})
    run.mkdir(parents=True)
    write_json(run / "config.json", config.to_json())
    save_plan(plan, run / "plan.json")
    shutil.copy(raw / "dataset.json", run / "dataset.json")
    torch.manual_seed(0)
    net = create_model(model, config.data.in_channels, config.data.num_classes, **model_kwargs)
    save_checkpoint(run / "checkpoint_final.pth", {"model": net.state_dict()})
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Raw RAS data sets and caches with the test scans' spacing: 2 channels, and 4-class regions."""
    root = tmp_path_factory.mktemp("data")
    out = {}
    for name, kwargs in {"plain": dict(num_channels=2, num_classes=2), "regions": dict(num_classes=4, regions=True)}.items():
        raw = make_synthetic_dataset(root / name, num_cases=2, shape=(16, 16, 16), spacing=RAS_SPACING, **kwargs)
        preprocess_dataset(raw, root / f"{name}_cache", workers=1, patch_size=(16, 16, 16), progress=False)
        out[name] = (raw, root / f"{name}_cache")
    return out


def scan(seed: int, channels: int) -> np.ndarray:
    """Positive noise inside INNER, zero outside (so it is cropped), float32 ``(C, *SHAPE)``."""
    rng = np.random.default_rng(seed)
    image = np.zeros((channels, *SHAPE), np.float32)
    image[(slice(None), *INNER)] = rng.uniform(1.0, 100.0, (channels, *(s.stop - s.start for s in INNER)))
    return image


def write_scan(folder: Path, case: str, image: np.ndarray, qform_code: int = 1, sform_code: int = 2,
               affine: np.ndarray = AFFINE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for c, channel in enumerate(image):
        nifti = nib.Nifti1Image(channel, affine)
        nifti.set_qform(affine, code=qform_code)
        nifti.set_sform(affine, code=sform_code)
        nib.save(nifti, folder / f"{case}_{c:04d}.nii.gz")


def zscore(image: np.ndarray) -> np.ndarray:
    """Channel 0 as the plan normalises it: z-score over the nonzero region (the same float32 ops)."""
    channel = image[0].copy()
    mask = channel != 0
    values = channel[mask]
    mean, std = float(values.mean()), max(float(values.std()), 1e-8)
    channel[mask] = (values - mean) / std
    return channel


def assert_same_grid(output: Path, reference: Path) -> None:
    out, ref = nib.load(output), nib.load(reference)
    assert out.shape == ref.shape
    assert np.array_equal(out.affine, ref.affine)
    assert int(out.header["qform_code"]) == int(ref.header["qform_code"])
    assert int(out.header["sform_code"]) == int(ref.header["sform_code"])
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine) == ("P", "S", "L")
    assert out.get_data_dtype() == np.uint8


def test_exact_mask_on_non_ras_anisotropic_cropped_input(tmp_path, data, sign_net):
    raw, cache = data["plain"]
    run = make_run(tmp_path / "run", raw, cache, "test_sign", {})
    assert load_plan(run / "plan.json").crop_to_nonzero
    image = scan(0, 2)
    write_scan(tmp_path / "in", "a", image)
    written = lightseg.predict(tmp_path / "in", tmp_path / "out", run, progress=False)
    assert written == [tmp_path / "out" / "a.nii.gz"]
    assert_same_grid(written[0], tmp_path / "in" / "a_0000.nii.gz")
    predicted = np.asarray(nib.load(written[0]).dataobj)
    expected = (zscore(image) > 0).astype(np.uint8)
    assert expected.sum() > 100 and (expected == 0).sum() > 100
    assert np.array_equal(predicted, expected)


def test_resampled_prediction_lands_on_the_input_grid(tmp_path, data, sign_net):
    raw, cache = data["plain"]
    run = make_run(tmp_path / "run", raw, cache, "test_sign", {}, target_spacing=(1.5, 1.5, 1.5))
    image = scan(1, 2)
    image[0][INNER] = np.where(np.indices(SHAPE)[0][INNER] < 19, 10.0, 90.0)  # two halves: a smooth boundary
    write_scan(tmp_path / "in", "a", image)
    (out,) = predict(tmp_path / "in", tmp_path / "out", run, progress=False)
    assert_same_grid(out, tmp_path / "in" / "a_0000.nii.gz")
    predicted = np.asarray(nib.load(out).dataobj)
    expected = zscore(image) > 0
    dice = 2 * (expected & (predicted == 1)).sum() / (expected.sum() + (predicted == 1).sum())
    assert dice > 0.95
    assert predicted[~(image[0] != 0)].max() == 0  # nothing outside the scan's nonzero box


def test_regions_are_painted_back_in_order(tmp_path, data, sign_net):
    raw, cache = data["regions"]
    thresholds = (-0.8, 0.0, 0.7)
    run = make_run(tmp_path / "run", raw, cache, "test_sign", {"thresholds": thresholds})
    image = scan(2, 1)
    write_scan(tmp_path / "in", "a", image)
    (out,) = predict(tmp_path / "in", tmp_path / "out", run, progress=False)
    z = zscore(image)
    expected = np.zeros(SHAPE, np.uint8)
    for value, t in zip((1, 2, 3), thresholds):  # regions_class_order of the synthetic set
        expected[((z - np.float32(t)) > 0) & (image[0] != 0)] = value  # outside the crop box: background
    predicted = np.asarray(nib.load(out).dataobj)
    assert set(np.unique(predicted)) == {0, 1, 2, 3}
    assert np.array_equal(predicted, expected)


def test_tta_and_probabilities(tmp_path, data, sign_net):
    raw, cache = data["plain"]
    run = make_run(tmp_path / "run", raw, cache, "test_sign", {})
    image = scan(3, 2)
    write_scan(tmp_path / "in", "a", image)
    (out,) = predict(tmp_path / "in", tmp_path / "out", run, tta=True, save_probabilities=True, step=0.25, progress=False)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), (zscore(image) > 0).astype(np.uint8))
    with np.load(tmp_path / "out" / "a.npz", allow_pickle=False) as npz:
        probabilities = npz["probabilities"]
    assert probabilities.dtype == np.float16 and probabilities.shape == (2, *SHAPE)
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=2e-3)
    labels = np.asarray(nib.load(out).dataobj)
    assert (labels[probabilities[1] > 0.51] == 1).all() and (labels[probabilities[1] < 0.49] == 0).all()


def test_interrupted_predict_resumes(tmp_path, data, sign_net, capsys):
    raw, cache = data["plain"]
    run = make_run(tmp_path / "run", raw, cache, "test_sign", {})
    for i, case in enumerate("abc"):
        write_scan(tmp_path / "in", case, scan(10 + i, 2))
    out = tmp_path / "out"
    assert len(predict(tmp_path / "in", out, run, progress=False)) == 3
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    (out / "b.nii.gz").unlink()
    (out / ".b.nii.gz.lightseg-x1y2z3.tmp").write_bytes(b"half a file")  # what a kill during a write leaves
    assert predict(tmp_path / "in", out, run) == [out / "b.nii.gz"]
    assert f"{out}: 2 of 3 cases already had their outputs there and were kept" in capsys.readouterr().err
    assert (out / "a.nii.gz").stat().st_mtime_ns == kept["a.nii.gz"]
    assert (out / "c.nii.gz").stat().st_mtime_ns == kept["c.nii.gz"]
    assert not list(out.glob(".*.tmp"))
    assert np.array_equal(np.asarray(nib.load(out / "b.nii.gz").dataobj), (zscore(scan(11, 2)) > 0).astype(np.uint8))


def test_bad_cases_are_reported_and_the_others_predicted(tmp_path, data, sign_net, capsys):
    raw, cache = data["plain"]
    run = make_run(tmp_path / "run", raw, cache, "test_sign", {})
    images = tmp_path / "in"
    write_scan(images, "good", scan(20, 2))
    write_scan(images, "corrupt", scan(21, 2))
    (images / "corrupt_0001.nii.gz").write_bytes(b"\x1f\x8bnot a gzip stream")
    write_scan(images, "onechannel", scan(22, 1))
    with pytest.raises(PredictionError) as info:
        predict(images, tmp_path / "out", run, progress=False)
    message = str(info.value)
    assert "2 of 3 cases failed" in message
    assert "corrupt_0001.nii.gz" in message and "onechannel: has channels [0] but the model needs [0, 1]" in message
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.nii.gz"]
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-m", str(run), "--device", "cpu"]) == 1
    assert "2 of 2 cases failed" in capsys.readouterr().err


def test_channels_on_different_grids_are_reported_once_by_the_shared_check(tmp_path, data, sign_net):
    raw, cache = data["plain"]
    run = make_run(tmp_path / "run", raw, cache, "test_sign", {})
    image = scan(23, 2)
    write_scan(tmp_path / "in", "shifted", image)
    moved = nib.Nifti1Image(image[1], AFFINE @ np.diag([1.0, 1.0, 1.5, 1.0]))
    nib.save(moved, tmp_path / "in" / "shifted_0001.nii.gz")
    with pytest.raises(PredictionError, match=r"shifted_0001\.nii\.gz: its grid .* co-registered .* `lightseg verify`"):
        predict(tmp_path / "in", tmp_path / "out", run, progress=False)


def test_input_naming(tmp_path, data):
    spec = read_dataset_json(data["plain"][0] / "dataset.json")
    for name in ("x_0000.nii.gz", "x_0001.nii.gz", "y.nii.gz", "z_0000.nii.gz", "z_0002.nii.gz", "._x_0000.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = {c.name: c for c in find_input_cases(tmp_path, spec)}
    assert set(cases) == {"x", "y", "z"}
    assert cases["x"].files == (tmp_path / "x_0000.nii.gz", tmp_path / "x_0001.nii.gz") and not cases["x"].problem
    assert "single file" in cases["y"].problem and "[0, 2]" in cases["z"].problem


def test_labels_from_logits_map_indices_and_paint_regions():
    logits = torch.zeros(3, 20, 2, 2)
    logits[1, :5], logits[2, 15:] = 1.0, 1.0
    labels = logits_to_labels(logits, (0, 2, 5))
    assert labels.dtype == np.uint8
    assert (labels[:5] == 2).all() and (labels[5:15] == 0).all() and (labels[15:] == 5).all()
    regions = -torch.ones(3, 20, 2, 2)
    regions[0, 2:18], regions[1, 5:15], regions[2, 8:10] = 1.0, 1.0, 1.0  # nested WT > TC > ET
    painted = logits_to_labels(regions, (0, 1, 2, 3), regions_class_order=(1, 2, 3))
    assert [int(v) for v in painted[:, 0, 0]] == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0]


def test_real_trained_tiny_lunet_through_the_cli(tmp_path, data, capsys):
    raw, cache = data["plain"]
    run = lightseg.train(cache, tmp_path / "run", "lunet", model_kwargs={"width": 4, "levels": 3}, epochs=1,
                         iters_per_epoch=2, batch_size=2, device="cpu", workers=0)
    write_scan(tmp_path / "in", "a", scan(30, 2))
    args = ["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(run), "--device", "cpu",
            "--batch-tiles", "2", "--checkpoint", "final"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "1 cases predicted" in first.out and "were kept" not in first.err  # nothing was there to keep
    assert_same_grid(tmp_path / "out" / "a.nii.gz", tmp_path / "in" / "a_0000.nii.gz")
    assert set(np.unique(np.asarray(nib.load(tmp_path / "out" / "a.nii.gz").dataobj))) <= {0, 1}
    before = (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns
    assert main(args) == 0 and (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns == before  # done: skipped
    again = capsys.readouterr()
    assert "0 cases predicted" in again.out and "1 of 1 cases already had their outputs there and were kept" in again.err
    checkpoint = run / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert main(args[:4] + [str(tmp_path / "out2")] + args[5:]) == 1  # a truncated checkpoint: a clear error


def test_memory_format_follows_the_model_unless_asked():
    from lightseg.inference.predictor import prefers_channels_last
    from lightseg.models import create_model

    assert prefers_channels_last(create_model("lightmedseg", 1, 2))
    assert not prefers_channels_last(create_model("plainunet", 1, 2, stages=3))


def test_small_tiles_go_two_per_call_and_batching_keeps_the_logits(tmp_path, data):
    """Two tiles per call (the default for small tiles, for oneDNN on CPU) changes speed, not
    results: a real network's probabilities match one tile per call."""
    from lightseg.inference import default_batch_tiles

    small = [(1, (32, 32, 32)), (1, (96, 96, 96)), (4, (64, 64, 64))]
    assert [default_batch_tiles(channels, tile) for channels, tile in small] == [2, 2, 2]
    assert default_batch_tiles(4, (128, 128, 128)) == default_batch_tiles(3, (96, 96, 96)) == 1
    raw, cache = data["plain"]
    run = make_run(tmp_path / "run", raw, cache, "lightmedseg", {})
    write_scan(tmp_path / "in", "a", scan(1, 2))
    probabilities = {}
    for tiles in (1, 2):
        out = tmp_path / f"out{tiles}"
        lightseg.predict(tmp_path / "in", out, run, save_probabilities=True, batch_tiles=tiles, progress=False)
        probabilities[tiles] = np.load(out / "a.npz", allow_pickle=False)["probabilities"].astype(np.float32)
    assert probabilities[1].std() > 0
    np.testing.assert_allclose(probabilities[2], probabilities[1], atol=2e-3)


@pytest.mark.parametrize("step", [0.0, 1.5])
def test_a_bad_step_is_refused_before_the_onnx_session_loads(tmp_path, step):
    """The window settings are checked once, when built from the sidecar: ``--step`` is named
    before ONNX Runtime reads the (here broken) model file; a bad ``--batch-tiles`` likewise."""
    from lightseg.inference.onnx_predictor import load_onnx_predictor
    from lightseg.inference.window import WindowSettings

    (tmp_path / "model.onnx").write_bytes(b"not a model")
    sidecar = {"format": "lightseg-onnx", "plan": {}, "dataset": {}, "patch_size": [32, 32, 32], "in_channels": 1,
               "label_values": [0, 1], "regions": None, "input_name": "image", "output_name": "logits"}
    (tmp_path / "model.onnx.json").write_text(json.dumps(sidecar))
    with pytest.raises(PredictionError, match="--step"):
        load_onnx_predictor(tmp_path / "model.onnx", step=step)
    with pytest.raises(PredictionError, match="--batch-tiles"):
        WindowSettings.build((32, 32, 32), 1, tiles_per_call=0)


def turn(image: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(C, X, Y, Z)`` voxels and affine of the same scan stored in another axis order (nibabel)."""
    turned = np.stack([nib.orientations.apply_orientation(c, ornt) for c in image])
    return turned, affine @ nib.orientations.inv_ornt_aff(ornt, image.shape[1:])


def test_turned_copies_predict_to_the_turned_ras_prediction(tmp_path, data, monkeypatch):
    """LAS and LSA copies of a scan are turned to RAS before the network and back after: each
    prediction, read back, is the RAS prediction turned the same way, on the copy's own grid."""
    monkeypatch.setitem(_REGISTRY, "test_slope", ModelEntry("test_slope", SlopeNet, "directional test network"))
    raw, cache = data["plain"]
    run = make_run(tmp_path / "run", raw, cache, "test_slope", {})
    assert load_plan(run / "plan.json").reorient
    ras, ras_affine = turn(scan(3, 2), AFFINE, nib.orientations.io_orientation(AFFINE))
    write_scan(tmp_path / "in", "ras", ras, affine=ras_affine)
    turns = {codes: nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                    nib.orientations.axcodes2ornt(tuple(codes))) for codes in ("LAS", "LSA")}
    for codes, ornt in turns.items():
        image, affine = turn(ras, ras_affine, ornt)
        write_scan(tmp_path / "in", codes.lower(), image, affine=affine)
    lightseg.predict(tmp_path / "in", tmp_path / "out", run, progress=False)
    expected_ras = np.asarray(nib.load(tmp_path / "out" / "ras.nii.gz").dataobj)
    assert 100 < expected_ras.sum() < expected_ras.size - 100
    for codes, ornt in turns.items():
        out = nib.load(tmp_path / "out" / f"{codes.lower()}.nii.gz")
        source = nib.load(tmp_path / "in" / f"{codes.lower()}_0000.nii.gz")
        assert out.shape == source.shape and np.array_equal(out.affine, source.affine)
        assert "".join(nib.aff2axcodes(out.affine)) == codes
        assert np.array_equal(np.asarray(out.dataobj), nib.orientations.apply_orientation(expected_ras, ornt))

    old = load_plan(run / "plan.json").to_json()  # a plan written before the key: fed as it is stored
    write_json(run / "plan.json", {k: v for k, v in old.items() if k != "reorient"})
    lightseg.predict(tmp_path / "in", tmp_path / "old", run, progress=False)
    unturned = np.asarray(nib.load(tmp_path / "old" / "lsa.nii.gz").dataobj)
    assert not np.array_equal(unturned, nib.orientations.apply_orientation(expected_ras, turns["LSA"]))
