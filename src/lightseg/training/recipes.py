"""Named recipes: each paper's training setting as a set of ``TrainConfig`` values.

``lightseg train --recipe NAME`` (``lightseg.train(..., recipe=NAME)``) starts from a recipe;
any flag or keyword replaces its value (order: defaults < model registry recipe < named recipe
< ``--config`` file < flags, applied by :func:`lightseg.training.config.layer_options`). A recipe
names its model, so ``--model`` is not needed. docs/recipes.md gives, per recipe, the paper's
setting, ours and every deviation with its reason; the values below cite the specs
(``specs/*.md``) they come from. Pure data: listing recipes imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from lightseg.errors import ConfigError, PlanError


@dataclass(frozen=True)
class Recipe:
    """A named set of training options (``TrainConfig`` fields plus ``model``) and where it comes from."""

    name: str
    source: str
    summary: str
    options: Mapping[str, Any] = field(default_factory=dict)


# nnU-Net v2's default trainer as PSP-Seg and PGPS use it (specs/psp-seg.md section 1,
# specs/pgps.md section 1): SGD Nesterov 0.99, weight decay 3e-5, PolyLR 0.9, 1000 x 250,
# Dice + CE with deep supervision, gradient clipping 12, its augmentation, region-based
# training where dataset.json declares regions, batch 2 at the planned patch.
_NNUNET = dict(
    epochs=1000, iters_per_epoch=250, batch_size=2, optimizer="sgd", lr=1e-2, momentum=0.99, weight_decay=3e-5,
    schedule="poly", warmup_epochs=0, loss="dice_ce", deep_supervision=True, grad_clip=12.0, augment="default",
    oversample_foreground=1 / 3, region_training=True,
)

# PSP-Seg's trainer (specs/psp-seg.md section 1): nnU-Net's, with LR 1e-3, patch forced to 128^3,
# batch 2, FD loss + progressive pruning with the published schedule settings.
_PSPSEG = dict(
    _NNUNET, model="pspseg", lr=1e-3, patch_size=(128, 128, 128), pruning="progressive", pruning_step=2,
    pruning_window=10, pruning_tolerance=1e-3, pruning_deadline=0.4, pruning_calibration_batches=100,
)

# LightMedSeg (specs/lightmedseg.md section 5): AdamW (0.9, 0.999), cosine after a warm-up, 300
# epochs, batch 8, flips/rotations/noise, Eq. 22 loss; the stripped values are the spec's [G].
_LIGHTMEDSEG = dict(
    model="lightmedseg", epochs=300, iters_per_epoch=250, batch_size=8, optimizer="adamw", lr=1e-3, weight_decay=1e-4,
    schedule="cosine", warmup_epochs=5, min_lr=1e-6, loss="lightmedseg", augment="light", grad_clip=0.0,
    region_training=False,
)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("lightmedseg", "LightMedSeg, BraTS setting (specs/lightmedseg.md section 5)",
               "300 x 250 at batch 8, 128^3 crops, flips/rotations/noise, AdamW + cosine, Eq. 22 on the classes, "
               "WT/TC/ET scored where the data set declares regions",
               dict(_LIGHTMEDSEG, patch_size=(128, 128, 128))),
        Recipe("lightmedseg-acdc", "LightMedSeg, ACDC setting (specs/lightmedseg.md section 5)",
               "as lightmedseg at the planned patch, on a cache preprocessed with --normalization percentile (the "
               "paper's 0.5-99.5 percentile clip scaled to [0, 1]; training refuses another plan)",
               dict(_LIGHTMEDSEG)),
        Recipe("lunet", "LUnet (specs/lunet.md; its training recipe is unpublished, section 5 question 3)",
               "LUnet C=16, 5 levels with nnU-Net's schedule length and Dice + CE, the registry's AdamW + cosine",
               dict(model="lunet", model_kwargs={"width": 16, "levels": 5}, epochs=1000, iters_per_epoch=250, batch_size=2,
                    optimizer="adamw", lr=1e-3, weight_decay=1e-5, schedule="cosine", warmup_epochs=5, loss="dice_ce",
                    augment="default", region_training=True)),
        *(Recipe(f"pspseg-{size.lower()}", f"PSP-Seg-{size} (specs/psp-seg.md sections 1, 2.3, 4)",
                 f"PSP-Seg-{size}: nnU-Net trainer at LR 1e-3, 128^3, batch 2, 1000 x 250, FD loss + progressive "
                 "pruning (step 2, window 10, deadline 40 %)",
                 dict(_PSPSEG, model_kwargs={"size": size}))
          for size in ("S", "B", "L")),
        Recipe("nnunet", "nnU-Net v2 3d_fullres default trainer (specs/psp-seg.md and specs/pgps.md baselines)",
               "plainunet with deep supervision, nnU-Net Dice + CE, SGD 0.99 Nesterov, LR 1e-2, poly, 1000 x 250, "
               "batch 2 at the planned patch, region training where regions are declared",
               dict(_NNUNET, model="plainunet")),
        Recipe("pgps-efficiency", "PGPS efficiency mode on nnU-Net (specs/pgps.md sections 2-4, V2)",
               "the nnunet recipe with the patch growing in phases at constant batch",
               dict(_NNUNET, model="plainunet", curriculum="pgps-efficiency", pgps_version="v2")),
        Recipe("pgps-performance", "PGPS performance mode on nnU-Net (specs/pgps.md sections 2-4, V2)",
               "the nnunet recipe with the patch growing and the batch raised to keep the voxels per step",
               dict(_NNUNET, model="plainunet", curriculum="pgps-performance", pgps_version="v2")),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)} (`lightseg recipes` lists them)") from None


def format_recipes() -> str:
    """The table ``lightseg recipes`` prints: name, model, source and a one-line summary each."""
    lines = []
    for recipe in RECIPES.values():
        lines.append(f"{recipe.name:18} model {recipe.options['model']:12} {recipe.source}\n{'':18} {recipe.summary}")
    return "\n".join(lines)


# Plan values a recipe needs, as keyword arguments of lightseg.data.preprocess.preprocess_dataset
# (and flags of `lightseg preprocess`). The cache's plan.json is made by preprocessing, before
# training, so a recipe cannot set it: training preprocesses a raw data set with them
# (:func:`plan_needs`) and refuses a cache planned otherwise (:func:`check_recipe_plan`).
PLAN_NEEDS: dict[str, dict[str, str]] = {
    "lightmedseg-acdc": {"normalization": "percentile"},  # specs/lightmedseg.md section 5: 0.5-99.5 percentiles to [0, 1]
}


def plan_needs(name: str | None) -> dict[str, str]:
    """What recipe ``name`` (``None``: no recipe) needs of the plan, as ``preprocess_dataset`` keywords."""
    return dict(PLAN_NEEDS.get(name or "", {}))


def check_recipe_plan(name: str | None, plan: Mapping[str, Any], cache_dir: Any, advice: str | None = None) -> None:
    """Refuse (:class:`PlanError`) to train recipe ``name`` on a cache whose ``plan`` (plan.json's
    JSON form) normalises a channel otherwise than the recipe needs, with ``advice`` (default: the
    command that makes a cache it can use)."""
    scheme = plan_needs(name).get("normalization")
    if scheme is None:
        return
    for channel, norm in zip(plan["channel_names"], plan["normalization"]):
        if norm["scheme"] != scheme:
            raise PlanError(
                f"recipe {name!r} trains on the {scheme!r} normalisation, but {cache_dir}/plan.json normalises channel "
                f"{channel!r} with {norm['scheme']!r}; " + (advice or f"preprocess the data set with it into a new cache, "
                f"`lightseg preprocess DATASET_DIR -o {cache_dir}-{scheme} --normalization {scheme}`, and train on that")
            )
