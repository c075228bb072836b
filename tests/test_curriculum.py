"""PGPS/RPSS schedules against the worked examples and edge cases of the PGPS specification."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightseg.errors import ModelError
from lightseg.training.curriculum import cap_batch, pgps_schedule, rpss_schedule, voxels_seen

CUBE = (128, 128, 128)
CUBE_STEP = (32, 32, 32)  # 5 poolings per axis


def test_v1_cube_sizes_and_timing():
    s = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=1000, version="v1")
    assert s.patch_sizes == (
        (64, 32, 32), (64, 64, 32), (64, 64, 64), (96, 64, 64), (96, 96, 64),
        (96, 96, 96), (128, 96, 96), (128, 128, 96), (128, 128, 128),
    )
    assert s.phase_length == 111
    assert s.stage_at(887) == 7 and s.stage_at(888) == 8
    assert sum(s.stage_at(e) == 8 for e in range(1000)) == 112


def test_v2_cube_sizes_and_timing():
    s = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=1000)
    assert s.patch_sizes == (
        (32, 32, 32), (64, 32, 32), (64, 64, 32), (64, 64, 64), (96, 64, 64),
        (96, 96, 64), (96, 96, 96), (128, 96, 96), (128, 128, 96), (128, 128, 128),
    )
    assert s.phase_length == 100
    assert [s.stage_at(e) for e in (0, 99, 100, 899, 900, 999)] == [0, 0, 1, 8, 9, 9]
    assert s.batch_sizes == (2,) * 10


def test_v2_anisotropic_example():
    s = pgps_schedule((80, 192, 160), (16, 32, 32), base_batch=2, num_epochs=1000)
    assert s.patch_sizes[:8] == (
        (16, 32, 32), (32, 32, 32), (48, 32, 32), (64, 32, 32), (64, 64, 32),
        (64, 64, 64), (80, 64, 64), (80, 96, 64),
    )
    assert s.num_stages == 14 and s.patch_sizes[-1] == (80, 192, 160)
    assert s.phase_length == 71
    assert sum(s.stage_at(e) == 13 for e in range(1000)) == 77


def test_phases_start_at_multiples_of_the_phase_length():
    s = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=1000, version="v1")
    starts = [e for e in range(1, 1000) if s.stage_at(e) != s.stage_at(e - 1)]
    assert starts == [k * 111 for k in range(1, 9)]
    assert s.stage_at(5000) == 8


def test_v2_performance_batches_keep_voxels_constant():
    s = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=1000, mode="performance")
    assert s.batch_sizes == (128, 64, 32, 16, 10, 7, 4, 3, 2, 2)
    assert all(b * math.prod(p) <= 2 * math.prod(CUBE) for b, p in zip(s.batch_sizes, s.patch_sizes))


def test_v2_performance_hippocampus_asks_for_1575():
    s = pgps_schedule((40, 56, 40), (8, 8, 8), base_batch=9, num_epochs=1000, mode="performance")
    assert s.patch_sizes[0] == (8, 8, 8)
    assert s.batch_sizes[0] == 1575
    assert s.batch_sizes[-1] == 9


def test_v1_pgps_plus_batches_under_compensate():
    s = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=1000, mode="performance", version="v1")
    assert s.batch_sizes == (24, 12, 6, 4, 3, 2, 2, 2, 2)


def test_v1_pgps_plus_clamps_to_base_batch_after_the_recursion():
    s = pgps_schedule(CUBE, CUBE_STEP, base_batch=5, num_epochs=1000, mode="performance", version="v1")
    assert s.batch_sizes == (24, 12, 6, 5, 5, 5, 5, 5, 5)


def test_voxel_budget_relative_to_constant_patch():
    constant = 1000 * 2 * math.prod(CUBE)
    eff = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=1000)
    perf = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=1000, mode="performance")
    assert voxels_seen(eff) / constant == pytest.approx(220 / 640)  # 0.344 (spec section 4)
    assert voxels_seen(perf) / constant == pytest.approx(0.936, abs=5e-4)
    assert voxels_seen(perf, iters_per_epoch=3) == 3 * voxels_seen(perf)


def test_axis_starting_at_its_maximum_is_done_from_the_start():
    v2 = pgps_schedule((16, 64, 64), (16, 32, 32), base_batch=2, num_epochs=30)
    assert v2.patch_sizes == ((16, 32, 32), (16, 64, 32), (16, 64, 64))
    assert v2.phase_length == 10
    v1 = pgps_schedule((16, 64, 64), (16, 32, 32), base_batch=2, num_epochs=30, version="v1")
    assert v1.patch_sizes == ((16, 32, 32), (16, 64, 32), (16, 64, 64))


def test_whole_patch_of_one_step_is_a_single_stage():
    s = pgps_schedule((32, 32, 32), (32, 32, 32), base_batch=2, num_epochs=5, mode="performance")
    assert s.patch_sizes == ((32, 32, 32),) and s.batch_sizes == (2,)
    assert s.phase_length == 5 and s.stage_at(4) == 0


def test_more_sizes_than_epochs_spreads_them_and_ends_at_full_size():
    s = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=4, mode="performance")
    assert s.patch_sizes == ((32, 32, 32), (64, 64, 64), (96, 96, 96), (128, 128, 128))
    assert s.batch_sizes == (128, 16, 4, 2)
    assert s.phase_length == 1 and [s.stage_at(e) for e in range(4)] == [0, 1, 2, 3]
    single = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=1)
    assert single.patch_sizes == (CUBE,)


def test_a_curriculum_run_with_a_bad_patch_is_refused_once_before_the_run_folder(synthetic_dataset, tmp_path):
    """The patch is checked once, when the configuration is resolved, not again by the schedule."""
    from lightseg.training.run import train

    with pytest.raises(ModelError, match=r"not a multiple of.*\(16, 16, 16\)"):
        train(synthetic_dataset, tmp_path / "run", "lunet", model_kwargs={"width": 4, "levels": 3}, patch_size=(18, 16, 16),
              curriculum="pgps-efficiency", device="cpu", workers=0)
    assert not (tmp_path / "run" / "config.json").exists()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        pgps_schedule(CUBE, CUBE_STEP, 2, 10, mode="fast")
    with pytest.raises(ValueError, match="version"):
        pgps_schedule(CUBE, CUBE_STEP, 2, 10, version="v3")
    with pytest.raises(ValueError, match="epoch"):
        pgps_schedule(CUBE, CUBE_STEP, 2, 10).stage_at(-1)


def test_rpss_draws_from_the_same_pool_reproducibly():
    pgps = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=200)
    rpss = rpss_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=200, seed=3)
    assert rpss.patch_sizes == pgps.patch_sizes and set(rpss.batch_sizes) == {2}
    draws = [rpss.stage_at(e) for e in range(200)]
    assert draws == [rpss_schedule(CUBE, CUBE_STEP, 2, 200, seed=3).stage_at(e) for e in range(200)]
    assert set(draws) == set(range(10))
    assert draws != [rpss_schedule(CUBE, CUBE_STEP, 2, 200, seed=4).stage_at(e) for e in range(200)]
    assert rpss_schedule(CUBE, CUBE_STEP, 2, 20, version="v1").patch_sizes == pgps_schedule(
        CUBE, CUBE_STEP, 2, 20, version="v1"
    ).patch_sizes


def test_cap_batch():
    assert cap_batch(1575, (8, 8, 8)) == 1575
    assert cap_batch(1575, (8, 8, 8), max_batch=64) == 64
    assert cap_batch(128, (32, 32, 32), max_voxels=2 * 64**3) == 16
    assert cap_batch(2, (128, 128, 128), max_voxels=64**3) == 1
    assert cap_batch(10, (8, 8, 8), max_voxels=10**9, max_batch=100) == 10


@settings(max_examples=60, deadline=None)
@given(
    pools=st.tuples(*[st.integers(0, 4)] * 3),
    steps=st.tuples(*[st.integers(1, 6)] * 3),
    version=st.sampled_from(["v1", "v2"]),
    epochs=st.integers(1, 60),
)
def test_sizes_grow_one_legal_step_at_a_time(pools, steps, version, epochs):
    divisors = tuple(2**p for p in pools)
    final = tuple(d * k for d, k in zip(divisors, steps))
    s = pgps_schedule(final, divisors, base_batch=2, num_epochs=10**6, version=version)
    assert s.patch_sizes[-1] == final
    expected_n = sum(math.ceil((p - s0) / d) for p, s0, d in zip(final, s.patch_sizes[0], divisors)) + 1
    assert s.num_stages == expected_n
    for a, b in zip(s.patch_sizes, s.patch_sizes[1:]):
        grown = [(y - x) // d for x, y, d in zip(a, b, divisors)]
        assert sorted(grown) == [0, 0, 1]
    short = pgps_schedule(final, divisors, base_batch=2, num_epochs=epochs, version=version)
    assert short.patch_at(epochs - 1) == final
    assert short.phase_length >= 1


def test_min_patch_replaces_the_start():
    s = pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=90, min_patch=(64, 32, 32))
    assert s.patch_sizes[:3] == ((64, 32, 32), (64, 64, 32), (64, 64, 64))
    assert s.patch_sizes[-1] == CUBE and s.num_stages == 9
    with pytest.raises(ModelError, match="min_patch"):
        pgps_schedule(CUBE, CUBE_STEP, base_batch=2, num_epochs=90, min_patch=(48, 32, 32))


class _Sampler:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_patch_size(self, patch) -> None:
        self.calls.append(("patch", tuple(patch)))

    def set_batch_size(self, batch) -> None:
        self.calls.append(("batch", batch))


class _Trainer:
    num_epochs = 8

    def __init__(self) -> None:
        self.sampler = _Sampler()
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def _run_epochs(callback, trainer, epochs):
    history = []
    for epoch in epochs:
        callback.on_epoch_start(trainer, epoch)
        entry = {"epoch": epoch}
        callback.on_epoch_end(trainer, epoch, entry)
        history.append(entry)
    return history


def test_callback_changes_sampler_only_at_phase_starts():
    from lightseg.training.curriculum_callback import PGPSCallback

    schedule = pgps_schedule((16, 16, 16), (8, 8, 8), base_batch=2, num_epochs=8, mode="performance")
    assert schedule.patch_sizes == ((8, 8, 8), (16, 8, 8), (16, 16, 8), (16, 16, 16))
    trainer = _Trainer()
    history = _run_epochs(PGPSCallback(schedule), trainer, range(8))
    assert trainer.sampler.calls[::2] == [("patch", p) for p in schedule.patch_sizes]
    assert trainer.sampler.calls[1::2] == [("batch", b) for b in (16, 8, 4, 2)]
    assert len(trainer.lines) == 4 and "epoch 3/8, stage 2/4: patch 16x8x8, batch 8" in trainer.lines[1]
    assert [math.prod(h["patch_size"]) for h in history] == [512, 512, 1024, 1024, 2048, 2048, 4096, 4096]
    assert [h["batch_size"] for h in history][::2] == [16, 8, 4, 2]
    assert history[-1]["patch_size"] == [16, 16, 16]


def test_callback_resume_recomputes_the_stage_from_the_epoch():
    from lightseg.training.curriculum_callback import PGPSCallback

    schedule = pgps_schedule((16, 16, 16), (8, 8, 8), base_batch=2, num_epochs=8)
    before = PGPSCallback(schedule)
    _run_epochs(before, _Trainer(), range(3))
    resumed = PGPSCallback(schedule)
    resumed.load_state_dict(before.state_dict())
    trainer = _Trainer()
    _run_epochs(resumed, trainer, range(3, 8))
    assert trainer.sampler.calls[0] == ("patch", (16, 8, 8))
    assert [c for c in trainer.sampler.calls if c[0] == "patch"] == [("patch", p) for p in schedule.patch_sizes[1:]]


def test_callback_refuses_a_different_curriculum_on_resume():
    from lightseg.errors import CheckpointError
    from lightseg.training.curriculum_callback import PGPSCallback

    v2 = PGPSCallback(pgps_schedule(CUBE, CUBE_STEP, 2, 100))
    v1 = PGPSCallback(pgps_schedule(CUBE, CUBE_STEP, 2, 100, version="v1"))
    with pytest.raises(CheckpointError, match="pgps-efficiency-v1"):
        v2.load_state_dict(v1.state_dict())
    v2.load_state_dict({})


def test_callback_logs_when_the_cap_bites():
    from lightseg.training.curriculum_callback import PGPSCallback

    schedule = pgps_schedule((40, 56, 40), (8, 8, 8), base_batch=9, num_epochs=100, mode="performance")
    trainer = _Trainer()
    history = _run_epochs(PGPSCallback(schedule, max_voxels=9 * 40 * 56 * 40, max_batch=64), trainer, [0])
    assert history[0]["batch_size"] == 64
    assert "asks for 1575; capped by" in trainer.lines[0] and "max batch 64" in trainer.lines[0]


def test_curriculum_callback_starts_models_that_need_it_at_a_2x1x1_bottleneck():
    from lightseg.models import create_model
    from lightseg.training.curriculum_callback import curriculum_callback

    torch = pytest.importorskip("torch")
    norm_in = create_model("plainunet", in_channels=1, num_classes=2, stages=3, width=4, max_width=8)
    assert curriculum_callback("none", norm_in, 1, (16, 16, 16), 2, 10) is None
    cb = curriculum_callback("pgps-efficiency", norm_in, 1, (16, 16, 16), 2, 10)
    assert cb.schedule.patch_sizes[0] == (8, 4, 4) and cb.schedule.patch_sizes[-1] == (16, 16, 16)
    norm_bn = create_model("lunet", in_channels=1, num_classes=2, width=4, levels=3)
    before = {k: v.clone() for k, v in norm_bn.state_dict().items()}
    cb = curriculum_callback("pgps-performance", norm_bn, 1, (16, 16, 16), 2, 10, batch_memory=0.5)
    assert cb.schedule.patch_sizes[0] == (4, 4, 4)
    assert cb.max_voxels == 4096
    assert all(torch.equal(v, norm_bn.state_dict()[k]) for k, v in before.items())
    rpss = curriculum_callback("rpss", norm_bn, 1, (16, 16, 16), 2, 10, seed=1)
    assert rpss.schedule.seed == 1 and rpss.schedule.label == "rpss-v2"
    # batch norm at a batch of one (or a cap of one) needs 2 bottleneck voxels, as instance norm does
    for batch, max_batch in ((1, None), (2, 1)):
        cb = curriculum_callback("pgps-efficiency", norm_bn, 1, (16, 16, 16), batch, 10, max_batch=max_batch)
        assert cb.schedule.patch_sizes[0] == (8, 4, 4)


def test_train_verb_passes_the_curriculum_flags():
    from lightseg.cli import build_parser

    args = build_parser().parse_args(
        ["train", "DATA", "-o", "RUN", "--curriculum", "rpss", "--pgps-version", "v1", "--max-batch", "4", "--batch-memory", "0.5"]
    )
    assert (args.curriculum, args.pgps_version, args.max_batch, args.batch_memory) == ("rpss", "v1", 4, 0.5)


def test_curriculum_callback_rejects_bad_settings():
    from lightseg.errors import TrainingError
    from lightseg.models import create_model
    from lightseg.training.curriculum_callback import curriculum_callback

    model = create_model("lunet", in_channels=1, num_classes=2, width=4, levels=3)
    with pytest.raises(TrainingError, match="pgps-fast"):
        curriculum_callback("pgps-fast", model, 1, (16, 16, 16), 2, 10)
    with pytest.raises(TrainingError, match="max_batch"):
        curriculum_callback("pgps-performance", model, 1, (16, 16, 16), 2, 10, max_batch=0)
