"""A tiny PGPS training run: patches change at the right epochs, resume continues at the right stage."""

from __future__ import annotations

import json

import pytest

from lightseg.training.callbacks import Callback
from lightseg.training.curriculum import pgps_schedule

PATCH = (8, 8, 8)
EPOCHS = 8
MODEL = dict(model="lunet", model_kwargs={"width": 4, "levels": 3})  # BatchNorm, size divisor 4


class _Recorder(Callback):
    """Records the shape of every training batch and can stop the run after an epoch."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.shapes: dict[int, set[tuple[int, ...]]] = {}

    def extra_loss(self, trainer, images, target, outputs):
        self.shapes.setdefault(trainer.epoch, set()).add(tuple(images.shape))
        return None

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self.stop_after is not None and epoch > self.stop_after:
            raise KeyboardInterrupt


def _train(dataset, run_dir, recorder, resume=False):
    from lightseg.training.run import train

    return train(
        dataset, run_dir, **MODEL, epochs=EPOCHS, iters_per_epoch=1, patch_size=PATCH, batch_size=2,
        device="cpu", workers=0, resume=resume, callbacks=[recorder], curriculum="pgps-performance",
        max_batch=8, val_fraction=0.25, augment="none",
    )


@pytest.mark.slow
def test_pgps_run_changes_patches_on_schedule_and_resumes(synthetic_dataset, tmp_path):
    schedule = pgps_schedule(PATCH, (4, 4, 4), base_batch=2, num_epochs=EPOCHS, mode="performance")
    assert schedule.patch_sizes == ((4, 4, 4), (8, 4, 4), (8, 8, 4), (8, 8, 8)) and schedule.phase_length == 2
    run = tmp_path / "run"

    first = _Recorder(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        _train(synthetic_dataset, run, first)
    second = _Recorder()
    _train(synthetic_dataset, run, second, resume=True)

    shapes = {**first.shapes, **second.shapes}
    assert sorted(shapes) == list(range(EPOCHS))
    for epoch, seen in shapes.items():
        batch, patch = min(8, schedule.batch_at(epoch)), schedule.patch_at(epoch)
        assert seen == {(batch, 1, *patch)}, epoch

    from lightseg.run_folder import load_checkpoint

    history = load_checkpoint(run / "checkpoint_final.pth")["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert [tuple(h["patch_size"]) for h in history] == [schedule.patch_at(e) for e in range(EPOCHS)]
    assert [h["batch_size"] for h in history] == [8, 8, 8, 8, 4, 4, 2, 2]  # 16 capped by max_batch
    lrs = [h["lr"] for h in history]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # one decaying schedule, never reset at a phase start

    log = (run / "training_log.txt").read_text()
    assert "pgps-performance-v2: epoch 1/8, stage 1/4: patch 4x4x4, batch 8 (the schedule asks for 16; capped by" in log
    assert "epoch 3/8, stage 2/4: patch 8x4x4, batch 8" in log
    assert "epoch 4/8, stage 2/4: patch 8x4x4" in log  # the resumed run re-applies the stage of epoch 4
    assert "epoch 7/8, stage 4/4: patch 8x8x8, batch 2" in log
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert summary["mean_dice"] is not None
