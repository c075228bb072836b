"""Progressive pruning (spec section 4): schedule decisions and the combination search, no training."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch

from lightseg.models.pspseg import PSPSeg
from lightseg.training.callbacks import Callback
from lightseg.training.pruning import (
    ProgressivePruning,
    PruningConfig,
    best_combination,
    calibration_bytes,
    candidate_combinations,
    converged,
    decide,
    over_pruned,
    past_deadline,
    removal_errors,
    search_masks,
)

PLATEAU = [5.0, 4.0, 3.0, 2.0] + [2.5] * 12  # best at epoch 3, then flat for 12 epochs
FALLING = [5.0 - 0.1 * e for e in range(16)]


def test_converged_needs_every_log_flat_for_a_full_window():
    assert converged([PLATEAU], last_prune=0, epoch=16, window=10)
    assert not converged([PLATEAU], last_prune=0, epoch=13, window=10)  # best only 10 epochs back
    assert not converged([PLATEAU, FALLING], last_prune=0, epoch=16, window=10)
    assert not converged([PLATEAU], last_prune=6, epoch=16, window=10)  # only 10 epochs since last event
    assert not converged([[1.0] * 10], last_prune=0, epoch=10, window=10)  # too early


def test_over_pruned_compares_with_the_all_time_best():
    recovered = [3.0, 2.0, 2.5, 2.0005, 2.2]
    not_recovered = [3.0, 2.0, 2.5, 2.3, 2.2]
    assert not over_pruned([recovered], last_prune=2, epoch=5, tolerance=1e-3)
    assert over_pruned([not_recovered], last_prune=2, epoch=5, tolerance=1e-3)
    assert over_pruned([recovered, not_recovered], last_prune=2, epoch=5)


def test_deadline_and_decisions():
    cfg = PruningConfig(step=2, window=3)
    flat = [1.0, 0.5] + [0.6] * 8  # converged at epoch 10 for window 3
    assert decide([flat], 10, 100, 0, 2, False, cfg).action == "confirm"
    assert decide([flat], 10, 100, 0, 2, False, cfg).mask_new
    wait = decide([FALLING], 10, 100, 0, 2, True, cfg)
    assert wait.action == "wait" and wait.enabled
    bad = [1.0, 0.5, 0.5, 0.5, 0.8] + [0.9] * 5  # masked at epoch 4, never recovered
    undo = decide([bad], 10, 100, 4, 2, True, cfg)
    assert (undo.action, undo.step, undo.enabled, undo.mask_new) == ("undo", 1, True, False)
    assert decide([bad], 10, 100, 4, 1, True, cfg).enabled is False  # step reaches 0
    assert decide([bad], 10, 100, 4, 2, False, cfg).action == "confirm"  # nothing pending: not an undo
    last = decide([flat], 40, 100, 0, 2, True, PruningConfig(window=3))
    assert (last.action, last.mask_new, last.enabled) == ("confirm", False, False)
    assert past_deadline(40, 100) and not past_deadline(39, 100)


def test_candidates_count_active_branches_and_keep_a_minimum():
    assert candidate_combinations([0, 1, 2, 3], 2) == list(itertools.combinations(range(4), 2))
    assert candidate_combinations([1, 5], 2) == [(1,), (5,)]  # only 2 left: remove 1, keep 1
    assert candidate_combinations([3], 2) == []
    assert candidate_combinations([1, 5], 2, min_branches=0) == [(1, 5)]
    assert len(candidate_combinations(range(7), 2)) == 21
    assert best_combination({(0, 1): 2.0, (0, 2): 1.0, (1, 2): 1.0}) == (0, 2)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_removal_errors_match_explicit_masking(mode):
    torch.manual_seed(0)
    rm = PSPSeg(1, 2, size="B", mode=mode, channels=(4, 8, 8, 8, 8)).rms["enc2"].eval()
    with torch.no_grad():
        for branch in rm.branches.values():
            branch.gate.fill_(1.0)
        rm.masked = {6}
        x = torch.randn(2, 8, 4, 4, 4)
        combos = candidate_combinations(rm.active(), 2)
        errors, held = removal_errors(rm, x, combos)
        y = rm(x)
        for combo, err in zip(combos, errors):
            rm.masked = {6, *combo}
            assert err == pytest.approx(float(torch.linalg.vector_norm(y - rm(x))), rel=1e-4)
            rm.masked = {6}
    assert held > 0


def test_search_masks_picks_the_branch_with_no_effect():
    torch.manual_seed(0)
    model = PSPSeg(1, 2, size="S", channels=(4, 8, 8, 8, 8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(1.0)
        for rm in model.rms.values():
            rm.branches["2"].gate.zero_()  # branch 2 contributes nothing anywhere
    batches = [torch.randn(1, 1, 32, 32, 32) for _ in range(2)]
    model.train()
    chosen, used, peak = search_masks(model, iter(batches), step=1)
    assert used == 2 and peak > 0 and model.training
    assert chosen == {name: (2,) for name in model.rms}
    assert not any(rm._forward_hooks for rm in model.rms.values())


def test_published_cache_size_estimate():
    model = PSPSeg(1, 3, size="S")
    # enc1 at 64^3 x 32 channels x batch 2 in fp32 is 67 MB per tensor (spec section 4 caveats).
    per_batch = calibration_bytes(model, (128, 128, 128), 2)
    assert per_batch > 4 * 67e6
    assert calibration_bytes(model, (128, 128, 128), 2, bytes_per_value=2) == per_batch // 2


class _FakeTrainer:
    """The callback members of the trainer (lightseg.training.callbacks), without training."""

    def __init__(self, run_dir, model, num_epochs=100):
        self.model, self.run_dir, self.num_epochs = model, run_dir, num_epochs
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.history: list[dict] = []
        self.device, self.is_main, self.lines = torch.device("cpu"), True, []
        self.config = SimpleNamespace(data=SimpleNamespace(patch_size=(32, 32, 32), batch_size=1))
        self.sampler = SimpleNamespace(batch=lambda i: (torch.randn(1, 1, 32, 32, 32), None))

    def log(self, message):
        self.lines.append(message)

    def replace_model(self, model, optimizer=None):
        self.model, self.optimizer = model, optimizer

    def run_epoch(self, callback, epoch, loss):
        callback.on_epoch_start(self, epoch)
        entry = {"epoch": epoch, "train_loss": loss}
        callback.on_epoch_end(self, epoch, entry)
        self.history.append(entry)


def _gated_model():
    torch.manual_seed(0)
    model = PSPSeg(1, 2, size="S", channels=(4, 8, 8, 8, 8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.uniform_(0.5, 1.5)
    return model


def test_callback_masks_confirms_and_writes_architecture(tmp_path):
    model = _gated_model()
    full = sum(p.numel() for p in model.parameters())
    trainer = _FakeTrainer(tmp_path, model)
    cb = ProgressivePruning(PruningConfig(step=2, window=2, calibration_batches=2))
    cb.on_train_start(trainer)
    # Flat after epoch 1: converged at epoch 4 (best 3 epochs back); masks 2 of 4 in every module.
    for epoch, loss in enumerate([3.0, 1.0, 1.5, 1.5]):
        trainer.run_epoch(cb, epoch, loss)
    trainer.run_epoch(cb, 4, 1.2)
    assert all(len(ids) == 2 for ids in cb.pending.values()) and len(cb.pending) == 7
    assert all(len(rm.active()) == 2 and len(rm.present()) == 4 for rm in model.rms.values())
    assert trainer.history[-1]["num_params"] < full
    masked_branch = model.rms["enc1"].branches[str(cb.pending["enc1"][0])]
    assert not any(p.requires_grad for p in masked_branch.parameters())
    momentum_param = model.stem.weight
    trainer.optimizer.state[momentum_param]["momentum_buffer"] = torch.ones_like(momentum_param)
    # Loss came back within tolerance of the best (1.0): the next event confirms and masks 1 more.
    for epoch, loss in zip(range(5, 9), [1.0, 1.1, 1.1, 1.1]):
        trainer.run_epoch(cb, epoch, loss)
    assert all(len(rm.present()) == 2 and len(rm.active()) == 1 for rm in model.rms.values())
    assert torch.equal(trainer.optimizer.state[momentum_param]["momentum_buffer"], torch.ones_like(momentum_param))
    assert json.loads((tmp_path / "architecture.json").read_text()) == model.architecture()
    assert any("removed" in line for line in trainer.lines)
    # Resume: a fresh callback restores the pending masks onto the rebuilt model.
    rebuilt = PSPSeg(1, 2, size="S", channels=(4, 8, 8, 8, 8), architecture=json.loads((tmp_path / "architecture.json").read_text()))
    rebuilt.load_state_dict(model.state_dict())
    resumed = ProgressivePruning(PruningConfig(step=2, window=2, calibration_batches=2))
    resumed.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    trainer2 = _FakeTrainer(tmp_path, rebuilt)
    resumed.on_train_start(trainer2)
    assert {n: rm.active() for n, rm in rebuilt.rms.items()} == {n: rm.active() for n, rm in model.rms.items()}
    # End of training with masks pending and no recovery: undone, nothing removed.
    trainer.history.append({"epoch": 9, "train_loss": 5.0, "num_params": 0.0})
    cb.on_train_end(trainer)
    assert all(len(rm.active()) == 2 for rm in model.rms.values()) and cb.pending == {}


def test_callback_undoes_over_pruning_and_stops_at_step_zero(tmp_path):
    model = _gated_model()
    trainer = _FakeTrainer(tmp_path, model)
    cb = ProgressivePruning(PruningConfig(step=1, window=2, calibration_batches=1))
    for epoch, loss in enumerate([3.0, 1.0, 1.5, 1.5, 2.0, 1.9, 1.95, 1.95]):
        trainer.run_epoch(cb, epoch, loss)
    assert cb.pending and all(len(rm.active()) == 3 for rm in model.rms.values())
    # masked at epoch 4, never back near 1.0 -> undone at epoch 8, step 1 -> 0 ends pruning
    trainer.run_epoch(cb, 8, 2.0)
    assert not cb.enabled and cb.step == 0 and cb.pending == {}
    assert all(len(rm.active()) == 4 for rm in model.rms.values())
    assert any("over-pruned" in line for line in trainer.lines)


def test_callback_refuses_other_models(tmp_path):
    from lightseg.errors import TrainingError

    trainer = _FakeTrainer(tmp_path, PSPSeg(1, 2, channels=(4, 8, 8, 8, 8)))
    trainer.model = torch.nn.Conv3d(1, 1, 1)
    with pytest.raises(TrainingError, match="pspseg"):
        ProgressivePruning().on_train_start(trainer)


class _Stop(Exception):
    pass


class _StopAt(Callback):
    """Simulates a kill at the start of an epoch (after the pruning callback ran)."""

    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise _Stop


@pytest.mark.slow
def test_pruning_run_prunes_saves_resumes_and_predicts(synthetic_dataset, tmp_path):
    from lightseg.inference.predictor import predict
    from lightseg.run_folder import load_run
    from lightseg.training.decoupling import FunctionalDecoupling
    from lightseg.training.run import train

    # Thresholds lowered for a 5-epoch run: the epoch index as the watched "loss" makes every
    # window converge and never over-prune (the decisions themselves are tested above).
    config = PruningConfig(step=2, window=1, tolerance=1e9, deadline=1.0, calibration_batches=2, loss_keys=("epoch",))
    run = tmp_path / "run"
    kwargs = dict(
        model_kwargs={"channels": [4, 8, 8, 8, 8]}, epochs=5, iters_per_epoch=2, patch_size=(32, 32, 32), batch_size=1,
        val_fraction=0.25, device="cpu", workers=0, augment="none",
    )
    with pytest.raises(_Stop):
        train(synthetic_dataset, run, "pspseg", callbacks=[FunctionalDecoupling(), ProgressivePruning(config), _StopAt(4)], **kwargs)
    saved = json.loads((run / "architecture.json").read_text())
    assert all(len(ids) == 4 for ids in saved.values())  # masked at epoch 2, not yet removed
    assert "masked" in (run / "training_log.txt").read_text()

    train(synthetic_dataset, run, "pspseg", callbacks=[FunctionalDecoupling(), ProgressivePruning(config), _StopAt(None)],
          resume=True, **kwargs)
    final = json.loads((run / "architecture.json").read_text())
    assert all(len(ids) == 1 for ids in final.values())  # removed at epoch 4 and at the end
    log = (run / "training_log.txt").read_text()
    assert "resumed" in log and "removed" in log
    model, *_ = load_run(run, "final")
    assert model.architecture() == final
    full = sum(p.numel() for p in PSPSeg(1, 3, channels=(4, 8, 8, 8, 8)).parameters())
    assert sum(p.numel() for p in model.parameters()) < full
    load_run(run, "best")  # may predate the last removal: its own branches are rebuilt
    history = torch.load(run / "checkpoint_final.pth", weights_only=True)["history"]
    assert history[-1]["num_params"] < history[0]["num_params"] and "fd_enc" in history[0]
    written = predict(synthetic_dataset / "imagesTr", tmp_path / "pred", run, progress=False)
    assert len(written) == 4 and all(p.is_file() for p in written)


def test_pruning_callbacks_come_from_the_config_alone(tmp_path):
    from lightseg.training.config import TrainConfig
    from lightseg.training.decoupling import FunctionalDecoupling
    from lightseg.training.pruning import pruning_callbacks

    options = dict(model="pspseg", in_channels=1, num_classes=3, patch_size=(32, 32, 32), label_values=(0, 1, 2))
    base = TrainConfig.from_options(options)
    assert pruning_callbacks(base) == []
    assert base.pruning == PruningConfig()  # the config's section is the schedule's settings, published defaults
    assert (PruningConfig().step, PruningConfig().window, PruningConfig().deadline) == (2, 10, 0.4)
    assert [type(c) for c in pruning_callbacks(TrainConfig.from_options(dict(options, pruning="fd")))] == [FunctionalDecoupling]
    progressive = pruning_callbacks(TrainConfig.from_options(dict(options, pruning="progressive", pruning_window=3,
                                                                  pruning_loss_keys=("epoch",))))
    assert [type(c) for c in progressive] == [FunctionalDecoupling, ProgressivePruning]
    assert progressive[1].config == PruningConfig(mode="progressive", window=3, loss_keys=("epoch",))
