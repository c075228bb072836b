"""Checkpoints: unsafe payloads refused, truncation detected, RNG round trip, resume equivalence."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from cache_helper import make_cache

from lightseg.data import make_synthetic_dataset
from lightseg.errors import CheckpointError
from lightseg.training.callbacks import Callback
from lightseg.run_folder import load_checkpoint, load_run
from lightseg.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from lightseg.training.run import train


class Payload:
    """A custom class: unpickling it would run arbitrary code in a malicious file."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    good = tmp_path / "good.pth"
    save_checkpoint(good, {"model": {"w": torch.ones(1000)}, "epoch": 3})
    assert load_checkpoint(good)["epoch"] == 3
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(cut)
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match="not a lightseg checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c.pth", {"model": {}, "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


class _Interrupt(Callback):
    """Stops the run right after epoch 0's checkpoint, as a kill between epochs would."""

    def on_epoch_start(self, trainer, epoch):
        if epoch == 1:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    raw = make_synthetic_dataset(root / "raw", num_cases=3, shape=(20, 20, 20), num_classes=3)
    return make_cache(raw, root / "cache")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(cache, tmp_path):
    # dropout makes the model consume the torch RNG, so restoring it is tested too
    args = dict(model="lunet", model_kwargs={"width": 4, "levels": 3, "dropout": 0.2}, epochs=2, iters_per_epoch=2,
                patch_size=(16, 16, 16), batch_size=2, workers=0, augment="default", seed=4)
    straight = train(cache, tmp_path / "straight", callbacks=[Callback()], **args)
    with pytest.raises(KeyboardInterrupt):
        train(cache, tmp_path / "resumed", callbacks=[_Interrupt()], **args)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint_latest.pth")["epoch"] == 1
    resumed = train(cache, tmp_path / "resumed", callbacks=[Callback()], resume=True, **args)
    a = load_checkpoint(straight / "checkpoint_final.pth")
    b = load_checkpoint(resumed / "checkpoint_final.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-5)


def test_load_run_passes_architecture_json(cache, tmp_path, monkeypatch):
    run = train(cache, tmp_path / "run", model="lunet", model_kwargs={"width": 4, "levels": 3}, epochs=1, iters_per_epoch=1,
                patch_size=(16, 16, 16), workers=0, augment="none")
    (run / "architecture.json").write_text('{"keep": [1, 2]}')
    seen = {}
    import lightseg.models as models

    real = models.create_model

    def spy(name, in_channels, num_classes, **kwargs):
        seen.update(kwargs)
        kwargs.pop("architecture")
        return real(name, in_channels, num_classes, **kwargs)

    monkeypatch.setattr(models, "create_model", spy)
    load_run(run, "final")
    assert seen["architecture"] == {"keep": [1, 2]}
    with pytest.raises(CheckpointError, match="unknown checkpoint"):
        load_run(run, "newest")
