"""Region data sets (BraTS-style): class training scored on the regions unless region training is asked for."""

from __future__ import annotations

import json

import pytest
import torch
from cache_helper import make_cache

from lightseg.data import make_synthetic_dataset
from lightseg.errors import ConfigError
from lightseg.models import create_model
from lightseg.run_folder import load_checkpoint
from lightseg.training.run import train
from lightseg.training.validation import LabelCoding

REGIONS = [[1, 2, 3], [2, 3], [3]]  # the synthetic set's nested regions (whole > core > enhancing)


@pytest.fixture(scope="module")
def region_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    raw = make_synthetic_dataset(root / "raw", num_cases=3, shape=(20, 20, 20), num_classes=4, regions=True)
    return make_cache(raw, root / "cache")


def test_class_logits_are_scored_on_regions():
    coding = LabelCoding((0, 1, 2, 3), None, REGIONS)
    raw = torch.tensor([0, 1, 2, 3]).reshape(1, 1, 4, 1, 1)
    logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 2, 3]), 4).T.reshape(1, 4, 4, 1, 1).float()
    assert coding.num_channels == 3
    assert coding.target(raw).flatten().tolist() == [0, 1, 2, 3]  # the loss still sees classes
    assert coding.truth(raw)[0, :, :, 0, 0].tolist() == [[False, True, True, True], [False, False, True, True], [False, False, False, True]]
    assert coding.predicted(logits)[0, :, :, 0, 0].tolist() == [[False, True, True, True], [False, True, True, True], [False, False, False, True]]


def test_lightmedseg_trains_classes_with_eq22_and_is_validated_on_regions(region_cache, tmp_path):
    run = train(region_cache, tmp_path / "run", "lightmedseg", epochs=1, iters_per_epoch=2, patch_size=(16, 16, 16),
                batch_size=2, workers=0, device="cpu", augment="none")
    config = json.loads((run / "config.json").read_text())
    data = config["data"]
    assert config["loss"]["name"] == "lightmedseg" and data["num_classes"] == 4 and data["regions"] is None
    assert data["eval_regions"] == REGIONS and data["region_training"] is False
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert summary["classes"] == ["region1", "region2", "region3"]
    history = load_checkpoint(run / "checkpoint_final.pth")["history"]
    assert {"val_dice_region1", "val_dice_region2", "val_dice_region3"} <= set(history[0])


def test_region_training_only_when_asked(region_cache, tmp_path):
    tiny = dict(model_kwargs={"width": 4, "levels": 3}, epochs=1, iters_per_epoch=1, patch_size=(16, 16, 16),
                batch_size=1, workers=0, device="cpu")
    run = train(region_cache, tmp_path / "run", "lunet", region_training=True, **tiny)
    config = json.loads((run / "config.json").read_text())
    data = config["data"]
    assert config["loss"]["name"] == "region" and data["num_classes"] == 3 and data["regions"] == REGIONS
    assert data["eval_regions"] is None
    with pytest.raises(ConfigError, match="region loss"):
        train(region_cache, tmp_path / "bad", "lunet", region_training=True, loss="dice_ce", **tiny)


def test_the_region_loss_needs_regions(synthetic_dataset, tmp_path):
    with pytest.raises(ConfigError, match="declares regions"):
        train(synthetic_dataset, tmp_path / "run", "lunet", loss="region", device="cpu", workers=0)


def test_plainunet_deep_supervision_is_on_by_default():
    model = create_model("plainunet", 1, 2, stages=4, width=4, max_width=16)
    x = torch.randn(1, 1, 16, 16, 16)
    outputs = model.train()(x)
    assert isinstance(outputs, list) and len(outputs) == 3
    with torch.no_grad():  # eval runs the full-resolution head alone, the same function (instance norm has no running stats)
        torch.testing.assert_close(model.eval()(x), outputs[0].detach())


def test_recipes_choose_region_or_class_training_on_a_region_data_set(region_cache, tmp_path):
    budget = dict(epochs=1, iters_per_epoch=1, batch_size=1, workers=0, device="cpu", val_fraction=0)
    tiny = dict(patch_size=(16, 16, 16), model_kwargs={"stages": 3, "width": 4, "max_width": 8})
    run = train(region_cache, tmp_path / "nnunet", recipe="nnunet", **tiny, **budget)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == "plainunet" and config["loss"]["name"] == "region" and config["data"]["regions"] == REGIONS
    with pytest.raises(ConfigError, match="region loss"):  # an explicit class loss contradicts region training
        train(region_cache, tmp_path / "bad", recipe="nnunet", loss="dice_ce", **tiny, **budget)
    run = train(region_cache, tmp_path / "lms", recipe="lightmedseg", patch_size=(16, 16, 16), **budget)
    config = json.loads((run / "config.json").read_text())
    assert config["loss"]["name"] == "lightmedseg" and config["data"]["num_classes"] == 4 and config["data"]["eval_regions"] == REGIONS
