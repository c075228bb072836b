"""Training whose loss becomes NaN: it stops with a clear message naming the last good checkpoint,
which is left exactly as it was, and never writes non-finite weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lightseg.errors import TrainingError
from lightseg.training.callbacks import Callback
from lightseg.run_folder import load_checkpoint
from lightseg.training.run import train

from .conftest import TINY_TRAIN
from .helpers import cli


def _poison_cache(cache: Path) -> None:
    for path in (cache / "cases").glob("*_image.npy"):
        image = np.load(path)
        image[:] = np.nan
        np.save(path, image)


class _NaNLoss(Callback):
    """From epoch 2 on the loss is NaN (as after a data or optimizer failure); keeps a copy of the
    checkpoint as it was before the failing epoch."""

    def __init__(self, armed: bool = True) -> None:
        self.armed, self.before = armed, b""

    def on_epoch_start(self, trainer, epoch) -> None:
        if epoch == 1 and self.armed:
            self.before = (trainer.run_dir / "checkpoint_latest.pth").read_bytes()

    def extra_loss(self, trainer, images, labels, outputs):
        return torch.tensor(float("nan")) if self.armed and trainer.epoch >= 1 else None


def test_nan_loss_stops_training_and_names_the_last_good_checkpoint(base, tmp_path):
    run = tmp_path / "run"
    args = dict(model_kwargs={"width": 2, "levels": 2}, epochs=3, iters_per_epoch=1, batch_size=1, patch_size=(16, 16, 16),
                workers=0, device="cpu")
    poison = _NaNLoss()
    with pytest.raises(TrainingError) as info:
        train(base["cache"], run, "lunet", callbacks=[poison], **args)
    assert f"Last good checkpoint: {run / 'checkpoint_latest.pth'} (after epoch 0)" in str(info.value)
    assert "resume with --resume" in str(info.value)
    assert (run / "checkpoint_latest.pth").read_bytes() == poison.before and not (run / "checkpoint_final.pth").exists()
    train(base["cache"], run, "lunet", callbacks=[_NaNLoss(armed=False)], resume=True, **args)  # the cause fixed
    assert load_checkpoint(run / "checkpoint_final.pth")["epoch"] == 3


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint_yet(base, tmp_path):
    cache = Path(shutil.copytree(base["cache"], tmp_path / "cache"))
    _poison_cache(cache)
    code, err = cli("train", cache, "-o", tmp_path / "run", *TINY_TRAIN)
    assert code == 1 and "none yet" in err and not list((tmp_path / "run").glob("*.pth"))


class _BreakWeights(Callback):
    """Makes one weight NaN at the end of epoch 2 while the loss stayed finite (an optimizer blow-up)."""

    def on_epoch_end(self, trainer, epoch, entry) -> None:
        if epoch == 1:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("nan")


def test_non_finite_weights_are_never_saved_over_a_good_checkpoint(base, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="weights are not finite after epoch 1"):
        train(base["cache"], run, "lunet", model_kwargs={"width": 2, "levels": 2}, epochs=3, iters_per_epoch=1,
              batch_size=1, patch_size=(16, 16, 16), workers=0, device="cpu", callbacks=[_BreakWeights()])
    state = load_checkpoint(run / "checkpoint_latest.pth")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
