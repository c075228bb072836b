"""Channel pruning of the U-Net family: STAMP's ranking, targeted dropout, the random baselines,
and a pruned run that saves, resumes, reloads, predicts and exports (lunet spec section 2)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_pruning import _Stop, _StopAt  # a kill simulated at the start of an epoch

from lightseg.errors import ConfigError, TrainingError
from lightseg.models import create_model
from lightseg.models.lunet import conv_units
from lightseg.training.config import TrainConfig
from lightseg.training.channel_pruning import (
    ChannelPruning,
    ChannelPruningConfig,
    channel_pruning_callbacks,
    largest_layer,
    lowest_channels,
    normalise_per_layer,
    random_in_largest_layer,
    random_in_layers,
    targeted_dropout,
    taylor_scores,
)


def test_per_layer_normalisation_is_abs_over_l2_norm():
    scores = normalise_per_layer({"a": torch.tensor([3.0, -4.0]), "b": torch.zeros(3)})
    torch.testing.assert_close(scores["a"], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert scores["b"].tolist() == [0.0, 0.0, 0.0]


def test_stamp_takes_the_globally_lowest_and_so_the_widest_layer():
    """Equal raw scores: after normalisation a unit of n channels scores 1/sqrt(n) each, so the
    widest unit loses channels first (spec 2.1, why STAMP prunes the widest layers)."""
    scores = normalise_per_layer({"narrow": torch.ones(4), "wide": torch.ones(16), "mid": torch.ones(8)})
    assert lowest_channels(scores, 3) == [("wide", 0), ("wide", 1), ("wide", 2)]
    raw = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([0.2, 0.05])}
    assert lowest_channels(raw, 3) == [("b", 1), ("a", 1), ("a", 0)]  # b keeps its last channel


def test_stamp_never_takes_a_unit_below_its_floor():
    raw = {"a": torch.tensor([0.01, 0.02]), "b": torch.tensor([0.5, 0.6, 0.7])}
    assert lowest_channels(raw, 3, min_channels=1) == [("a", 0), ("b", 0), ("b", 1)]
    assert lowest_channels(raw, 9, min_channels=2) == [("b", 0)]


def test_random_in_stamp_layer_keeps_stamps_layers_and_draws_the_channels():
    widths = {"a": 8, "b": 4}
    order = ["a", "b", "a"]
    picks = [random_in_layers(order, widths, np.random.default_rng(seed)) for seed in range(20)]
    for choice in picks:
        assert [name for name, _ in choice] == order
        assert choice[0][1] != choice[2][1] and all(0 <= i < widths[n] for n, i in choice)
    assert len({tuple(c) for c in picks}) > 1  # random, not a fixed rule
    assert picks[3] == random_in_layers(order, widths, np.random.default_rng(3))  # seeded


def test_largest_layer_and_its_ties():
    assert largest_layer({"a": 4, "b": 16, "c": 8}, np.random.default_rng(0)) == "b"
    tied = {largest_layer({"a": 4, "b": 16, "c": 16}, np.random.default_rng(s)) for s in range(20)}
    assert tied == {"b", "c"}
    assert largest_layer({"a": 1, "b": 1}, np.random.default_rng(0)) is None


def test_random_in_largest_layer_follows_the_shrinking_maximum():
    choice = random_in_largest_layer({"a": 3, "b": 5, "c": 2}, 4, np.random.default_rng(0))
    assert [name for name, _ in choice[:2]] == ["b", "b"]  # 5 -> 4 -> 3, then a and b tie at 3
    assert {name for name, _ in choice[2:]} <= {"a", "b"}
    by_unit = {}
    for name, index in choice:
        by_unit.setdefault(name, []).append(index)
    assert all(len(set(v)) == len(v) for v in by_unit.values())  # never the same channel twice
    assert len(random_in_largest_layer({"a": 2, "b": 1}, 5, np.random.default_rng(0))) == 1  # floor: 1 channel


def test_targeted_dropout_follows_stamps_update():
    """Sorted low to high: a0, a1, b0, b1 get inverse ranks 3, 2, 1, 0; unit means 2.5 and 0.5;
    divided by the largest (2.5) and scaled to 0.1."""
    p = targeted_dropout({"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 0.4])}, max_p=0.1)
    assert p == pytest.approx({"a": 0.1, "b": 0.02})


def test_taylor_ranking_finds_a_silent_channel():
    """A channel whose norm scale is zero has no gradient, so its Taylor score is zero: STAMP
    removes it first."""
    torch.manual_seed(0)
    model = create_model("unet", 1, 2, width=4, levels=3)
    norm = conv_units(model)["encoders.1.0"][2]
    with torch.no_grad():
        norm.weight[5] = 0
    x, target = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 2, (2, 16, 16, 16))
    raw, used = taylor_scores(model, [(x, target)] * 2, torch.nn.CrossEntropyLoss())
    assert used == 2 and raw["encoders.1.0"][5] == 0 and all(p.grad is None for p in model.parameters())
    assert "head.0" not in raw
    assert lowest_channels(normalise_per_layer(raw), 1) == [("encoders.1.0", 5)]


def _trainer(model):
    logs = []
    trainer = SimpleNamespace(model=model, log=logs.append, replace_model=lambda m, o=None: None)
    return trainer, logs


def test_targeted_dropout_drops_whole_channels_in_training_only():
    torch.manual_seed(0)
    model = create_model("unet", 1, 2, width=4, levels=3)
    callback = ChannelPruning(ChannelPruningConfig(rule="stamp"))
    trainer, _ = _trainer(model)
    callback.on_train_start(trainer)
    assert set(callback.dropout.values()) == {0.005} and "head.0" not in callback.dropout  # STAMP's start
    callback.dropout["encoders.0.0"] = 0.5
    outputs = {}
    conv_units(model)["encoders.0.0"].register_forward_hook(lambda m, i, o: outputs.__setitem__("y", o))
    x = torch.randn(8, 1, 16, 16, 16)
    model.train()
    model(x)
    zero = (outputs["y"].abs().amax(dim=(2, 3, 4)) == 0).float().mean()
    assert 0.2 < zero < 0.8  # about half of the (sample, channel) maps, each whole
    model.eval()
    model(x)
    assert (outputs["y"].abs().amax(dim=(2, 3, 4)) > 0).all()
    callback.on_train_end(trainer)
    model.train()
    model(x)
    assert (outputs["y"].abs().amax(dim=(2, 3, 4)) > 0).all()  # hooks gone after training


def test_random_in_largest_layer_trains_without_dropout():
    model = create_model("unet", 1, 2, width=4, levels=3)
    callback = ChannelPruning(ChannelPruningConfig(rule="random-in-largest-layer"))
    callback.on_train_start(_trainer(model)[0])
    assert callback.dropout == {} and callback._handles == []


def test_bad_configurations_and_models_are_refused():
    with pytest.raises(ConfigError, match="unknown channel-pruning rule"):
        ChannelPruningConfig(rule="l1")
    with pytest.raises(ConfigError, match="'channel_pruning_channels_per_step' must be an integer >= 1"):
        ChannelPruningConfig(rule="stamp", channels_per_step=0)
    with pytest.raises(TrainingError, match="unet or lunet"):
        ChannelPruning(ChannelPruningConfig(rule="stamp")).on_train_start(_trainer(create_model("pspseg", 1, 2))[0])


def _config(**fields) -> TrainConfig:
    return TrainConfig.from_options(dict(model="unet", in_channels=1, num_classes=2, patch_size=(16, 16, 16), label_values=(0, 1),
                                         **fields))


def test_the_callback_is_built_from_the_training_configuration_alone():
    """config.json holds the rule and its schedule (no side file), with ChannelPruningConfig's defaults."""
    assert channel_pruning_callbacks(_config()) == []
    assert _config(channel_pruning="stamp").channel_pruning == ChannelPruningConfig(rule="stamp")
    (callback,) = channel_pruning_callbacks(_config(channel_pruning="random-in-stamp-layer", channel_pruning_target_params=1000, seed=3))
    assert callback.config == ChannelPruningConfig(rule="random-in-stamp-layer", target_params=1000) and callback.seed == 3
    with pytest.raises(ConfigError, match="needs a rule"):
        ChannelPruning(ChannelPruningConfig())


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["stamp", "random-in-largest-layer"])
def test_pruned_run_saves_resumes_reloads_predicts_and_exports(synthetic_dataset, tmp_path, rule):
    from lightseg.inference.export import export_run
    from lightseg.inference.predictor import predict
    from lightseg.run_folder import load_run
    from lightseg.training.run import train

    full = sum(p.numel() for p in create_model("unet", 1, 3, width=4, levels=3).parameters())
    run = tmp_path / "run"
    kwargs = dict(
        model_kwargs={"width": 4, "levels": 3}, epochs=5, iters_per_epoch=2, patch_size=(16, 16, 16), batch_size=2,
        val_fraction=0.25, device="cpu", workers=0, augment="none", channel_pruning=rule, channel_pruning_channels_per_step=6,
        channel_pruning_start_epoch=1, channel_pruning_recovery_epochs=1, channel_pruning_target_params=full // 2,
        channel_pruning_ranking_batches=1,
    )
    with pytest.raises(_Stop):
        train(synthetic_dataset, run, "unet", callbacks=[_StopAt(3)], **kwargs)
    mid = json.loads((run / "architecture.json").read_text())
    train(synthetic_dataset, run, "unet", callbacks=[_StopAt(None)], resume=True)  # the pruning comes from config.json
    final = json.loads((run / "architecture.json").read_text())
    assert sum(final.values()) < sum(mid.values()) < sum(create_model("unet", 1, 3, width=4, levels=3).architecture().values())
    log = (run / "training_log.txt").read_text()
    assert "resumed" in log and "step 1" in log and "step 2" in log

    model, *_ = load_run(run, "final")
    assert model.architecture() == final
    params = sum(p.numel() for p in model.parameters())
    assert params < full
    history = torch.load(run / "checkpoint_final.pth", weights_only=True)["history"]
    assert history[0]["num_params"] == full and history[-1]["num_params"] == params
    load_run(run, "best")  # may predate a later step: rebuilt to its own widths
    written = predict(synthetic_dataset / "imagesTr", tmp_path / "pred", run, progress=False)
    assert len(written) == 4 and all(p.is_file() for p in written)
    onnx_path, sidecar, difference = export_run(run, tmp_path / "model.onnx")
    assert onnx_path.is_file() and difference <= 1e-4
    assert json.loads(sidecar.read_text())["architecture"] == final
    # Profiled like a pruned PSP-Seg on the results page: the architecture as a builder argument.
    from lightseg.benchmark.profile import ModelSpec, profile_model

    row = profile_model(ModelSpec("unet", {"width": 4, "levels": 3, "architecture": final}), [(1, 16, 16, 16)], num_classes=3,
                        threads=1, warmup=0, repeats=1)
    assert row.params == params


def test_cli_flags_set_the_configuration_fields(tmp_path, capsys):
    from lightseg import cli

    args = cli.build_parser().parse_args(["train", "data", "-o", str(tmp_path / "run"), "--channel-pruning",
                                          "random-in-largest-layer", "--prune-channels", "4", "--recovery-epochs", "3",
                                          "--prune-start", "0", "--target-params", "1000", "--seed", "2"])
    given = {k: v for k, v in vars(args).items() if k.startswith("channel_pruning")}
    config = _config(seed=args.seed, **given)
    assert config.channel_pruning == ChannelPruningConfig(
        rule="random-in-largest-layer", channels_per_step=4, recovery_epochs=3, start_epoch=0, target_params=1000)
    assert config.runtime.seed == 2
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["train", "data", "-o", str(tmp_path / "bad"), "--channel-pruning", "stamp", "--prune-channels", "0"])
    assert exit_code.value.code == 2
    assert ">= 1" in capsys.readouterr().err


def test_channel_pruning_of_another_model_is_refused_before_training(synthetic_dataset, tmp_path):
    from lightseg.training.run import train

    with pytest.raises(ConfigError, match="unet or lunet"):
        train(synthetic_dataset, tmp_path / "run", "pspseg", epochs=1, iters_per_epoch=1, patch_size=(32, 32, 32), device="cpu",
              workers=0, channel_pruning="stamp")
