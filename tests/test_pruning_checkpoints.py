"""PSP-Seg branch masks travel with every checkpoint, so a reloaded checkpoint is the validated network."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lightseg.models.pspseg import PSPSeg
from lightseg.training.callbacks import Callback
from lightseg.training.pruning import _set_masks

MASKS = {"enc1": [1, 2], "bottleneck": [0]}


def test_state_dict_carries_masks_and_old_state_dicts_still_load():
    model = PSPSeg(1, 3, channels=(4, 8, 8, 8, 8))
    _set_masks(model, MASKS, True)
    state = copy.deepcopy(model.state_dict())
    fresh = PSPSeg(1, 3, channels=(4, 8, 8, 8, 8))
    fresh.load_state_dict(state)
    assert {n: sorted(rm.masked) for n, rm in fresh.rms.items() if rm.masked} == MASKS
    assert not any(p.requires_grad for p in fresh.rms["enc1"].branches["1"].parameters())
    torch.save(state, buffer := io.BytesIO())
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["rms.enc1._extra_state"].tolist() == [1, 2]
    # a state dict written before masks were stored loads with none masked
    old = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    fresh.load_state_dict(old)
    assert all(not rm.masked for rm in fresh.rms.values())


class _MaskAndRecord(Callback):
    """Makes every branch matter (gates 1), masks some before epoch 0, un-masks them at the end
    (an over-pruning undo), and records the eval-mode logits of the network each epoch ends with."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.logits, self.final = x, {}, None

    def _record(self, model):
        model.eval()
        with torch.no_grad():
            out = model(self.x).clone()
        model.train()
        return out

    def on_train_start(self, trainer):
        with torch.no_grad():
            for rm in trainer.model.rms.values():
                for branch in rm.branches.values():
                    branch.gate.fill_(1.0)

    def on_epoch_start(self, trainer, epoch):
        if epoch == 0:
            _set_masks(trainer.model, MASKS, True)
            trainer.replace_model(trainer.model, trainer.optimizer)

    def on_epoch_end(self, trainer, epoch, metrics):  # the weights the trainer then checkpoints
        self.logits[epoch] = self._record(trainer.model)

    def on_train_end(self, trainer):
        _set_masks(trainer.model, MASKS, False)
        self.final = self._record(trainer.model)


@pytest.mark.slow
def test_best_and_latest_reload_the_masked_network_they_were_saved_as(synthetic_dataset, tmp_path):
    from lightseg.run_folder import load_checkpoint, load_run
    from lightseg.training.run import train

    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    recorder = _MaskAndRecord(x)
    run = tmp_path / "run"
    train(synthetic_dataset, run, "pspseg", model_kwargs={"channels": [4, 8, 8, 8, 8]}, epochs=3, iters_per_epoch=2,
          patch_size=(32, 32, 32), batch_size=1, val_fraction=0.25, device="cpu", workers=0, augment="none",
          lr=0.05, callbacks=[recorder])
    for which in ("best", "latest"):
        epoch = int(load_checkpoint(run / f"checkpoint_{which}.pth")["epoch"]) - 1
        model, *_ = load_run(run, which)
        assert {n: sorted(rm.masked) for n, rm in model.rms.items() if rm.masked} == MASKS
        with torch.no_grad():
            out = model(x)
        assert torch.equal(out, recorder.logits[epoch]), which
        _set_masks(model, MASKS, False)  # the network the checkpoint reloaded as before masks were stored
        with torch.no_grad():
            assert not torch.allclose(model(x), out, atol=1e-4)
    final, *_ = load_run(run, "final")
    assert all(not rm.masked for rm in final.rms.values())
    with torch.no_grad():
        assert torch.equal(final(x), recorder.final)
