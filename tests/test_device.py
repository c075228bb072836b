"""Device-dependent defaults, precision and RNG state, with CUDA mocked where it cannot run here.

No test needs a GPU: ``torch.cuda`` queries are monkeypatched, and only code that decides (never
code that launches CUDA kernels) runs under the mock. ``benchmarks/gpu_check.py`` runs the real
thing on a GPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from cache_helper import make_cache
from test_model_contract import IN_CHANNELS, NUM_CLASSES, TEST_CONFIGS

from lightseg import device as dev
from lightseg.data import make_synthetic_dataset
from lightseg.data.sampling import PatchSampler
from lightseg.errors import ConfigError, TrainingError
from lightseg.inference import default_batch_tiles
from lightseg.models import create_model, list_models
from lightseg.accel.layers import GroupSumConv3d
from lightseg.run_folder import load_checkpoint
from lightseg.training import checkpoint
from lightseg.training.callbacks import Callback
from lightseg.training.distributed import freeze_unreached
from lightseg.training.loader import patch_loader
from lightseg.training.losses import deep_supervision_weights
from lightseg.training.run import train

TINY = dict(model_kwargs={"width": 4, "levels": 3}, patch_size=(16, 16, 16), batch_size=2, workers=0, augment="none")


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine as far as lightseg's decisions can tell; ``gpu(bf16=False)`` for an older GPU."""

    def mock(bf16: bool = True, free: int = 80 * 2**30) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, 2 * free))

    return mock


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    raw = make_synthetic_dataset(root / "raw", num_cases=4, shape=(24, 24, 24), num_classes=3)
    return make_cache(raw, root / "cache")


# ----- precision ------------------------------------------------------------------------------
def test_default_precision_follows_the_device(gpu):
    assert dev.default_precision("cpu") == "fp32"
    gpu(bf16=True)
    assert dev.default_precision("cuda") == "bf16" and dev.default_precision(torch.device("cuda", 1)) == "bf16"
    gpu(bf16=False)
    assert dev.default_precision("cuda") == "fp16"
    assert dev.grad_scaler(torch.device("cuda"), "fp16").is_enabled()  # fp16 scales losses; bf16 and fp32 do not
    assert not dev.grad_scaler(torch.device("cuda"), "bf16").is_enabled()
    assert not dev.grad_scaler(torch.device("cpu"), "fp32").is_enabled()


def test_precision_checks_and_fallbacks(gpu):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        dev.check_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="choose one of"):
        dev.check_precision("fp8", "cpu")
    dev.check_precision("fp32", "cpu")
    assert dev.runnable_precision("bf16", "cpu")[0] == "fp32" and "fp32" in dev.runnable_precision("bf16", "cpu")[1]
    assert dev.runnable_precision("fp32", "cpu") == ("fp32", None)
    gpu(bf16=False)
    with pytest.raises(ConfigError, match="does not support bfloat16"):
        dev.check_precision("bf16", "cuda")
    assert dev.runnable_precision("bf16", "cuda")[0] == "fp16"
    gpu(bf16=True)
    assert dev.runnable_precision("bf16", "cuda") == ("bf16", None)


def test_a_new_cpu_run_stores_fp32_and_refuses_gpu_precisions(cache, tmp_path):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train(cache, tmp_path / "bad", "lunet", epochs=1, iters_per_epoch=1, device="cpu", precision="fp16", **TINY)
    run = train(cache, tmp_path / "run", "lunet", epochs=1, iters_per_epoch=1, device="cpu", val_fraction=0.25, **TINY)
    assert json.loads((run / "config.json").read_text())["runtime"]["precision"] == "fp32"
    with pytest.raises(ConfigError, match="precision"):  # a resume keeps the stored precision
        train(cache, run, "lunet", device="cpu", precision="bf16", resume=True, **TINY)


def test_config_written_before_precision_existed_still_loads():
    from lightseg.training.config import TrainConfig

    base = dict(model="lunet", in_channels=1, num_classes=2, patch_size=[16, 16, 16], label_values=[0, 1])
    assert TrainConfig.from_json({**base, "amp": True}).runtime.precision == "fp16"
    assert TrainConfig.from_json({**base, "amp": False}).runtime.precision == "fp32"


class _Recorder(nn.Module):
    """Records the autocast state each forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return self.conv(x)


def test_sliding_window_runs_the_network_in_the_asked_precision():
    from lightseg.inference.sliding import TorchExecutor, WindowSettings, sliding_window

    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    model = _Recorder().eval()
    settings = WindowSettings((8, 8, 8))
    bf16 = sliding_window(TorchExecutor(model, settings, "bf16"), settings, image)
    assert model.seen and all(seen == (True, torch.bfloat16) for seen in model.seen)
    model.seen.clear()
    fp32 = sliding_window(TorchExecutor(model, settings, "fp32"), settings, image)
    assert model.seen and not any(enabled for enabled, _ in model.seen)
    assert bf16.dtype == fp32.dtype == np.float32  # blended in float32 either way
    assert np.allclose(bf16, fp32, atol=0.05) and not np.array_equal(bf16, fp32)


def test_patch_validation_honours_precision(cache):
    from lightseg.data.sampling import validation_patches
    from lightseg.training.losses import DeepSupervisionLoss, build_loss
    from lightseg.training.validation import LabelCoding, patch_validation

    class Net(_Recorder):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 3, 1)

    patches = validation_patches(cache, ["case_tr000"], (16, 16, 16), 1, 0)
    net = Net()
    patch_validation(net, patches, LabelCoding((0, 1, 2), None), DeepSupervisionLoss(build_loss("dice_ce", 3)),
                     torch.device("cpu"), 1, "bf16")
    assert net.seen == [(True, torch.bfloat16)]


# ----- device-dependent defaults --------------------------------------------------------------
def test_memory_format_is_the_measured_one_per_device():
    lunet = create_model("lunet", 1, 2, width=4)
    plain = create_model("plainunet", 1, 2, width=4, max_width=16, stages=4)
    assert dev.prefers_channels_last(lunet, "cpu") and not dev.prefers_channels_last(plain, "cpu")  # CPU measurements
    assert not dev.prefers_channels_last(lunet, "cuda") and not dev.prefers_channels_last(plain, "cuda")  # none on CUDA
    lunet.channels_last_cuda = True  # a model measured faster in it on a GPU says so
    assert dev.prefers_channels_last(lunet, "cuda")


def test_cudnn_benchmark_only_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    dev.configure_backend("cpu")
    assert torch.backends.cudnn.benchmark is False
    dev.configure_backend(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


def test_blending_on_the_gpu_when_the_volume_fits(gpu):
    cuda = torch.device("cuda", 0)
    assert dev.blend_device(torch.device("cpu"), 4, (240, 240, 155)) == torch.device("cpu")
    gpu(free=80 * 2**30)
    assert dev.blend_device(cuda, 4, (240, 240, 155)) == cuda  # 0.18 GB of 80 free
    gpu(free=2**28)
    assert dev.blend_device(cuda, 4, (240, 240, 155)) == torch.device("cpu")  # 0.18 GB > a quarter of 0.25 GB


def test_tiles_per_call_and_loader_workers_per_device(monkeypatch):
    assert default_batch_tiles(4, (128, 128, 128), "cuda") == 4 and default_batch_tiles(4, (128, 128, 128)) == 1
    assert dev.default_workers("cpu") == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert dev.default_workers("cuda", 1) == 12 and dev.default_workers("cuda", 2) == 7
    assert dev.default_workers("cuda", 8) == 2  # 2 CPUs per GPU: still 2 workers


def test_persistent_workers_see_each_epochs_patch_and_batch(cache):
    sampler = PatchSampler(cache, ["case_tr000", "case_tr001"], (16, 16, 16), 2, 3, seed=5)
    loader = patch_loader(sampler, workers=1, pin_memory=False)
    first = [images for images, _ in loader]
    worker = loader._iterator._workers[0]  # persistent: the same process serves the next epoch
    sampler.set_epoch(1)
    sampler.set_patch_size((8, 8, 8))
    sampler.set_batch_size(3)
    second = [(images, labels) for images, labels in loader]
    assert loader._iterator._workers[0] is worker
    assert [tuple(b.shape) for b in first] == [(2, 1, 16, 16, 16)] * 3
    assert [tuple(b.shape) for b, _ in second] == [(3, 1, 8, 8, 8)] * 3
    for index, (images, labels) in enumerate(second):  # the main process draws the very same batches
        expected = sampler.batch(index)
        assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])


# ----- DDP: parameters no used output reaches -------------------------------------------------
@pytest.mark.parametrize("name", [n for n in list_models() if not TEST_CONFIGS.get(n, {}).get("slow")])
def test_after_freezing_every_trainable_parameter_gets_a_gradient(name):
    """What DDP needs of every registered model: each parameter it watches gets a gradient."""
    kwargs = dict(TEST_CONFIGS.get(name, {}).get("kwargs", {}))
    if name == "plainunet":
        kwargs["deep_supervision"] = True
    torch.manual_seed(0)
    model = create_model(name, IN_CHANNELS, NUM_CLASSES, **kwargs).train()
    size = TEST_CONFIGS.get(name, {}).get("sizes", [tuple(2 * d for d in model.size_divisor)])[0]
    x = torch.randn(2, IN_CHANNELS, *size)

    def used():
        out = model(x)
        if isinstance(out, torch.Tensor):
            return [out]
        return [o for o, w in zip(out, deep_supervision_weights(len(out))) if w > 0]

    stats = {n: b.clone() for n, b in model.named_buffers()}
    frozen = freeze_unreached(model, used)
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers())  # the probe leaves no trace
    if name in ("pspseg", "plainunet"):
        assert frozen and all(n.startswith("heads.") for n in frozen)  # the weight-0 deep-supervision head
    sum(o.float().mean() for o in used()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_group_sum_conv_off_the_cpu_is_the_plain_grouped_conv():
    conv = GroupSumConv3d(8, 4, 3, padding=1, groups=4)
    x = torch.randn(1, 8, 6, 6, 6)
    scale = torch.rand(1, 8)
    assert torch.allclose(conv(x), conv.grouped(x), atol=1e-5)
    assert torch.allclose(conv(x, scale), conv.grouped(x, scale), atol=1e-5)
    reference = nn.Conv3d(8, 4, 3, padding=1, groups=4)
    reference.load_state_dict(conv.state_dict())
    assert torch.allclose(conv.grouped(x), reference(x), atol=1e-6)


# ----- fp16 overflow: skipped, not fatal --------------------------------------------------------
class _Overflow(Callback):
    """An infinite loss (with infinite gradients) on the steps of ``epochs``; a CPU GradScaler
    stands in for the CUDA one, which behaves the same way."""

    def __init__(self, epochs):
        self.epochs, self.scales = epochs, []

    def on_train_start(self, trainer):
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def extra_loss(self, trainer, images, target, outputs):
        if trainer.epoch in self.epochs:
            return (outputs[0] if isinstance(outputs, list) else outputs).float().mean() * math.inf
        return None

    def on_epoch_end(self, trainer, epoch, metrics):
        self.scales.append(trainer.scaler.get_scale())


def test_fp16_overflow_steps_are_skipped_until_too_many_in_a_row(cache, tmp_path, monkeypatch):
    overflow = _Overflow({1})
    run = train(cache, tmp_path / "run", "lunet", epochs=3, iters_per_epoch=2, device="cpu", val_fraction=0.25,
                callbacks=[overflow], **TINY)
    state = load_checkpoint(run / "checkpoint_final.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert overflow.scales[1] == overflow.scales[0] / 4  # two skipped steps, the scale halved for each
    assert math.isnan(state["history"][1]["train_loss"]) and math.isfinite(state["history"][2]["train_loss"])

    import lightseg.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_STEPS", 3)
    with pytest.raises(TrainingError, match="fp16 steps in a row"):
        train(cache, tmp_path / "diverged", "lunet", epochs=4, iters_per_epoch=2, device="cpu", val_fraction=0.25,
              callbacks=[_Overflow({1, 2, 3})], **TINY)


# ----- checkpoints: RNG state and resume ------------------------------------------------------
def test_rng_state_holds_the_current_gpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *a: calls.append(state.tolist()))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state was set"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = checkpoint.rng_state()
    assert state["cuda"].tolist() == [7] * 4
    checkpoint.set_rng_state(state)
    # An older checkpoint of a 4-GPU run, resumed with one GPU visible: its device 0 state only.
    old = dict(state, cuda=[torch.full((4,), i, dtype=torch.uint8) for i in range(4)])
    checkpoint.set_rng_state(old)
    assert calls == [[7] * 4, [0] * 4]


def test_cpu_resume_of_a_gpu_checkpoint(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = checkpoint.rng_state()
    assert "cuda" not in state
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    checkpoint.set_rng_state(dict(checkpoint.rng_state(), cuda=torch.zeros(16, dtype=torch.uint8)))  # GPU part ignored
    assert torch.equal(torch.rand(3), expected)


class _StopAt(Callback):
    """A kill at the start of epoch ``epoch`` (None: never)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_a_gpu_run_resumed_on_the_cpu_falls_back_to_fp32(cache, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cache, run, "lunet", epochs=2, iters_per_epoch=2, device="cpu", val_fraction=0.25, callbacks=[_StopAt(1)], **TINY)
    # Make it the run a GPU would have written: bf16 in config.json, a CUDA RNG state and a scaler state.
    config = json.loads((run / "config.json").read_text())
    config["runtime"]["precision"] = "bf16"
    (run / "config.json").write_text(json.dumps(config))
    path = run / "checkpoint_latest.pth"
    state = load_checkpoint(path)
    state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    state["scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
    checkpoint.save_checkpoint(path, state)
    capsys.readouterr()
    train(cache, run, "lunet", device="cpu", resume=True, callbacks=[_StopAt(None)], **TINY)
    printed = capsys.readouterr().err
    assert "trained in bf16 on a GPU; the CPU runs it in fp32" in printed
    assert load_checkpoint(run / "checkpoint_final.pth")["epoch"] == 2
    assert json.loads((run / "config.json").read_text())["runtime"]["precision"] == "bf16"  # the run's own choice is kept

    from lightseg.inference.predictor import load_predictor

    assert load_predictor(run, device="cpu").logits.args[0].precision == "fp32"  # predicting on the CPU: fp32 too

    from lightseg.cli import main

    capsys.readouterr()
    images = cache.parent / "raw" / "imagesTr"
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "pred"), "-m", str(run), "--device", "cpu",
                 "--precision", "fp16"]) == 1
    assert "--precision fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_check_says_clearly_that_it_needs_a_gpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU visible" in done.stderr and "Nothing was checked" in done.stderr
