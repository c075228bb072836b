"""Functional-decoupling loss (spec section 3): terms, fill value, callback wiring."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightseg.models.pspseg import PSPSeg
from lightseg.training.decoupling import (
    FunctionalDecoupling,
    decoder_term,
    encoder_term,
    fill_values,
    foreground_mask,
    masked_image,
)


def test_foreground_mask_accepts_label_maps_regions_and_lists():
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, 1, 1, 1] = 2
    mask = foreground_mask(label)
    assert mask.shape == (2, 1, 4, 4, 4) and mask.sum() == 1
    assert torch.equal(foreground_mask(label[:, 0]), mask)
    assert torch.equal(foreground_mask([label, label[:, :, ::2, ::2, ::2]]), mask)
    regions = torch.zeros(2, 3, 4, 4, 4)
    regions[1, 2, 0, 0, 0] = 1
    assert foreground_mask(regions)[1, 0, 0, 0, 0] == 1 and foreground_mask(regions).sum() == 1


def test_fill_value_is_low_foreground_percentile_per_channel():
    images = torch.stack([torch.arange(1000.0), -torch.arange(1000.0)]).reshape(1, 2, 10, 10, 10)
    mask = torch.zeros(1, 1, 10, 10, 10)
    mask.view(-1)[200:400] = 1  # foreground voxels 200..399
    fill = fill_values(images, mask, percentile=0.5)
    assert fill.tolist() == [200.0, -399.0]
    assert fill_values(images, torch.zeros_like(mask)).tolist() == [0.0, -999.0]  # no foreground: minimum
    out = masked_image(images, mask, fill)
    assert torch.equal(out[0, 0].reshape(-1)[200:400], images[0, 0].reshape(-1)[200:400])
    assert (out[0, 1].reshape(-1)[:200] == -399.0).all()
    assert (masked_image(images, mask, -1024.0)[0, 0].reshape(-1)[:200] == -1024.0).all()


def test_encoder_term_is_zero_for_parallel_features_and_counts_levels():
    f = [torch.randn(2, 4, 3, 3, 3), torch.randn(2, 8, 2, 2, 2)]
    assert encoder_term(f, [2.0 * t for t in f]).item() == pytest.approx(0.0, abs=1e-6)
    assert encoder_term(f, [-t for t in f]).item() == pytest.approx(4.0, abs=1e-5)  # 2 levels x (1 - (-1))


def test_decoder_term_prefers_features_that_encode_the_mask():
    mask = (torch.rand(1, 1, 8, 8, 8) > 0.5).float()
    small = mask[:, :, ::2, ::2, ::2]
    good = (small * 2 - 1).repeat(1, 4, 1, 1, 1) * 10
    assert decoder_term(good, mask) < 0.01 < decoder_term(-good, mask)


def test_callback_adds_weighted_loss_with_gradient_and_logs_means():
    torch.manual_seed(0)
    model = PSPSeg(1, 3, size="S", channels=(4, 8, 8, 8, 8)).train()
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"))
    fd = FunctionalDecoupling()
    fd.on_train_start(trainer)
    fd.on_epoch_start(trainer, 0)
    images = torch.randn(2, 1, 32, 32, 32)
    target = torch.zeros(2, 1, 32, 32, 32, dtype=torch.long)
    target[:, :, 8:24, 8:24, 8:24] = 1
    outputs = model(images)
    loss = fd.extra_loss(trainer, images, target, outputs)
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0
    assert model.features is None  # consumed: no activations kept past the step
    metrics: dict[str, float] = {}
    fd.on_epoch_end(trainer, 0, metrics)
    assert metrics["fd_enc"] + metrics["fd_dec"] == pytest.approx(loss.item() / 0.1, rel=1e-5)
    model.eval()
    model(images)
    assert fd.extra_loss(trainer, images, target, None) is None  # training only


def test_training_end_stops_recording_and_drops_kept_features():
    model = PSPSeg(1, 3, size="S", channels=(4, 8, 8, 8, 8)).train()
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"))
    fd = FunctionalDecoupling()
    fd.on_train_start(trainer)
    model(torch.randn(1, 1, 32, 32, 32))  # a training forward no loss consumed
    assert model.features is not None
    fd.on_train_end(trainer)
    assert model.features is None and not model.record_features
    model(torch.randn(1, 1, 32, 32, 32))
    assert model.features is None
