"""Training's final validation predicts as ``lightseg predict`` does: a fresh copy of the weights,
accelerated, in the inference layout; its labels are the plain model's, and the training model is
left in its training form."""

from __future__ import annotations

import numpy as np
import torch
from cache_helper import make_cache

import lightseg.training.trainer as trainer_module
from lightseg.accel import TRAINING_FORMS, accelerate
from lightseg.accel.lightmedseg import FastLightMedSeg
from lightseg.data import make_synthetic_dataset
from lightseg.data.sampling import CachedCase
from lightseg.inference.sliding import TorchExecutor, WindowSettings, sliding_window
from lightseg.models.lightmedseg import LightMedSeg
from lightseg.run_folder import load_run
from lightseg.training.run import train


def test_final_validation_runs_the_accelerated_copy_with_the_plain_models_labels(tmp_path, monkeypatch):
    raw = make_synthetic_dataset(tmp_path / "raw", num_cases=3, shape=(40, 36, 44), num_classes=3)
    cache = make_cache(raw, tmp_path / "cache")
    seen = {}
    validate = trainer_module.case_validation

    def spy(model, cache_dir, cases, coding, patch_size, device, precision, on_case):
        def keep(name, logits):
            seen.setdefault("logits", {})[name] = logits.copy()
            on_case(name, logits)

        results = validate(model, cache_dir, cases, coding, patch_size, device, precision, keep)
        seen["validated"] = model
        return results

    monkeypatch.setattr(trainer_module, "case_validation", spy)
    run = train(cache, tmp_path / "run", "lightmedseg", epochs=2, iters_per_epoch=3, patch_size=(32, 32, 32), batch_size=2,
                workers=0, augment="none", val_fraction=0.34, seed=0)

    validated = seen["validated"]  # the copy case_validation ran: predict's form, in place
    assert type(validated) is FastLightMedSeg
    convs = [m for m in validated.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(type(m).__module__ == "lightseg.accel.layers" for m in convs)  # no training forms left
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs if m.weight.dim() == 5)
    assert not validated._forward_pre_hooks  # no training layout hook

    plain, config, _, _ = load_run(run, "final")  # the plain model, contiguous, as LIGHTSEG_ACCEL=0 runs it
    plain = accelerate(plain, enable=False)
    assert type(plain) is LightMedSeg and plain.channels_last is False
    for name, logits in seen["logits"].items():
        image = np.array(CachedCase.open(cache, name).image, dtype=np.float32)
        settings = WindowSettings.build(config.data.patch_size, image.shape[0])
        reference = sliding_window(TorchExecutor(plain, settings, out_channels=config.data.num_classes), settings, image)
        assert np.abs(logits - reference).max() < 1e-4
        np.testing.assert_array_equal(logits.argmax(0), reference.argmax(0))


def test_the_copy_leaves_the_training_model_and_its_hooks(monkeypatch):
    """The training model keeps its class, training convs, layout and hook; the copy has its weights,
    no hooks, and is accelerated like the plain model (the training convs taken for nn.Conv3d)."""
    from lightseg.inference.predictor import inference_form
    from lightseg.models import create_model
    from lightseg.training.memory_format import prepare_for_training
    from lightseg.training.validation import inference_copy

    torch.manual_seed(0)
    model = prepare_for_training(create_model("lightmedseg", 1, 3), "lightmedseg", "cpu")
    before = {n: type(m) for n, m in model.named_modules()}
    assert any(t.__module__.startswith(TRAINING_FORMS) for t in before.values())  # training forms present
    copy = inference_copy(model)
    assert not copy._forward_pre_hooks and model._forward_pre_hooks
    assert not {id(p) for p in copy.parameters()} & {id(p) for p in model.parameters()}
    assert all(v.equal(copy.state_dict()[k]) for k, v in model.state_dict().items())
    fast, channels_last = inference_form(copy, "cpu")
    assert channels_last and type(fast) is FastLightMedSeg
    reference, _ = inference_form(create_model("lightmedseg", 1, 3), "cpu")
    assert [type(m) for m in fast.modules()] == [type(m) for m in reference.modules()]
    assert {n: type(m) for n, m in model.named_modules()} == before
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last_3d)), model.eval()(x), atol=1e-4, rtol=0)
    monkeypatch.setenv("LIGHTSEG_ACCEL", "0")  # the switch off: the copy runs plain, contiguous (accurate group norm)
    plain, channels_last = inference_form(inference_copy(model), "cpu")
    assert not channels_last and all(p.is_contiguous() for p in plain.parameters())
    weights = [p for p in model.parameters() if p.dim() == 5]  # the training model's: still in its layout
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
    assert any(not p.is_contiguous() for p in weights)
    model.features = {"encoder": [torch.ones(2, requires_grad=True) * 2]}  # graph tensors a training forward left (PSP-Seg)
    assert inference_copy(model).features is model.features
