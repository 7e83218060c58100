"""LR and batch-size schedules against hand-computed values."""

import math

import pytest

from mtnlg_ray.config import OptimConfig, RampupConfig, TrainConfig
from mtnlg_ray.train.schedule import batch_sizes, global_batch_at, lr_at, planned_tokens

OPT = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_tokens=100, decay_tokens=1100)


@pytest.mark.parametrize("tokens, expected", [
    (0, 0.0), (50, 5e-4), (99, 9.9e-4),               # linear warmup
    (100, 1e-3),                                       # peak at the end of warmup
    (600, 1e-4 + 0.5 * 9e-4),                          # halfway: cos(pi/2) = 0
    (350, 1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4),
    (1100, 1e-4), (5000, 1e-4),                        # the 10% floor afterwards
])
def test_lr_warmup_cosine_floor(tokens, expected):
    assert lr_at(tokens, OPT, total_tokens=10**9) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_decays_over_the_whole_run_by_default():
    opt = OptimConfig(lr=2e-3, min_lr_ratio=0.0, warmup_tokens=0)
    assert lr_at(500, opt, total_tokens=1000) == pytest.approx(1e-3)
    assert lr_at(1000, opt, total_tokens=1000) == 0.0


def test_decay_must_end_after_warmup():
    with pytest.raises(ValueError, match="decay_tokens=100 must exceed warmup_tokens=200"):
        OptimConfig(warmup_tokens=200, decay_tokens=100)


def test_megatron_rampup_small():
    # 16 = 4 + 3 x 4: one increment every 30 / 3 = 10 consumed samples
    r = RampupConfig(start=4, increment=4, samples=30)
    assert [global_batch_at(c, 16, r) for c in (0, 9, 10, 19, 20, 29, 30, 1000)] == [4, 4, 8, 8, 12, 12, 16, 16]
    train = TrainConfig(global_batch_size=16, micro_batch_size=4, rampup=r, max_steps=7)
    # consumed before each step: 0, 4, 8, 12, 20, 32, 48
    assert batch_sizes(train) == [4, 4, 4, 8, 12, 16, 16]
    assert planned_tokens(train, seq_len=10) == 64 * 10


def test_mtnlg_rampup():
    # MT-NLG: 32 -> 1920 in steps of 32 over 12B tokens = 5,859,375 samples of 2048; 59 increments
    r = RampupConfig(start=32, increment=32, samples=5_859_375)
    per_increment = 5_859_375 / 59  # 99311.44 samples
    assert global_batch_at(0, 1920, r) == 32
    assert global_batch_at(int(per_increment), 1920, r) == 32
    assert global_batch_at(int(per_increment) + 1, 1920, r) == 64
    assert global_batch_at(5_859_374, 1920, r) == 32 + 58 * 32
    assert global_batch_at(5_859_375, 1920, r) == 1920


def test_rampup_must_fit_the_global_batch():
    with pytest.raises(ValueError, match="increment=5 must divide"):
        TrainConfig(global_batch_size=16, micro_batch_size=1, rampup=RampupConfig(start=4, increment=5, samples=10))
    # the micro-batch need not divide the global batch: the loop deals any batch out (batching.py)
    assert TrainConfig(global_batch_size=16, micro_batch_size=3).micro_batch_size == 3


def test_schedule_in_steps_equals_the_same_schedule_in_tokens():
    from mtnlg_ray.config import TrainConfig
    from mtnlg_ray.train.schedule import in_tokens

    train = TrainConfig(global_batch_size=12, max_steps=2000)
    steps = in_tokens(OptimConfig(lr=1e-3, warmup_steps=100, decay_steps=2000, min_lr=1e-4), train, seq_len=64)
    tokens = OptimConfig(lr=1e-3, warmup_tokens=100 * 12 * 64, decay_tokens=2000 * 12 * 64, min_lr_ratio=0.1)
    assert (steps.warmup_tokens, steps.decay_tokens) == (tokens.warmup_tokens, tokens.decay_tokens)
    for t in (768, 50_000, 76_800, 1_000_000, 1_536_000, 2_000_000):
        assert lr_at(t, steps, 0) == pytest.approx(lr_at(t, tokens, 0), rel=1e-12)
    assert lr_at(1_536_000, steps, 0) == pytest.approx(1e-4)


@pytest.mark.parametrize("pair", [{"warmup_tokens": 10, "warmup_steps": 1}, {"decay_tokens": 10, "decay_steps": 2},
                                  {"min_lr_ratio": 0.1, "min_lr": 1e-5}])
def test_one_of_each_schedule_pair(pair):
    with pytest.raises(ValueError, match="give one of them"):
        OptimConfig(**pair)


def test_schedule_pairs_survive_the_workers_revalidation():
    """The worker re-validates a full dump of the job: every field is present there."""
    cfg = OptimConfig(lr=1e-3, warmup_steps=100, decay_steps=2000, min_lr=1e-4)
    again = OptimConfig(**cfg.model_dump())
    assert again == cfg and again.floor == 1e-4 and OptimConfig().floor == pytest.approx(6e-5)
