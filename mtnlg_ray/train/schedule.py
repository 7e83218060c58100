"""Learning-rate and batch-size schedules, both functions of how much data has been consumed.

Neither holds state: the trainer's state is (step, consumed samples), saved in every checkpoint,
so a resumed or resized run continues on exactly the same curve.

Learning rate (Megatron-LM's token-based schedule, as used for MT-NLG)
    warmup   lr(t) = peak * t / warmup_tokens                              for t < warmup_tokens
    cosine   lr(t) = floor + (peak - floor) * (1 + cos(pi * r)) / 2,       r = (t - warmup) / (decay - warmup)
    floor    lr(t) = floor = min_lr, or min_lr_ratio * peak                for t >= decay_tokens
  with t the tokens consumed *including* the step being taken (so the first step does not get
  lr = 0) and decay_tokens the end of the cosine counted from token 0 (warmup included);
  `decay_tokens: None` means the whole run (`planned_tokens`). Lengths given in optimizer steps
  (`warmup_steps`, `decay_steps`, as nanoGPT) are the tokens consumed by that many steps
  (`in_tokens`; with a batch ramp-up, its smaller batches count as they are).

Batch-size ramp-up (Megatron-LM's `--rampup-batch-size start increment samples`)
    The global batch starts at `start` sequences and grows by `increment` after every
    samples / ((global - start) / increment) consumed samples, reaching the configured
    global batch once `samples` have been consumed.
"""

from __future__ import annotations

import math

from mtnlg_ray.config import OptimConfig, RampupConfig, TrainConfig


def global_batch_at(consumed_samples: int, global_batch_size: int, rampup: RampupConfig | None) -> int:
    """Sequences in the next optimizer step, after `consumed_samples` sequences were trained on."""
    if rampup is None or consumed_samples >= rampup.samples:
        return global_batch_size
    increments = (global_batch_size - rampup.start) // rampup.increment
    if increments <= 0:
        return global_batch_size
    samples_per_increment = rampup.samples / increments
    done = int(consumed_samples / samples_per_increment)
    return min(rampup.start + done * rampup.increment, global_batch_size)


def lr_at(tokens: int, cfg: OptimConfig, total_tokens: int) -> float:
    """Learning rate for a step that brings the run to `tokens` consumed tokens (see module doc)."""
    peak, floor = cfg.lr, cfg.floor
    warmup = cfg.warmup_tokens
    if warmup > 0 and tokens < warmup:
        return peak * tokens / warmup
    decay = cfg.decay_tokens or total_tokens
    if tokens >= decay or decay <= warmup:
        return floor
    ratio = (tokens - warmup) / (decay - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def batch_sizes(train: TrainConfig, steps: int | None = None, consumed_samples: int = 0) -> list[int]:
    """The global batch of each of the next `steps` steps (default: the whole run from the start)."""
    out, consumed = [], consumed_samples
    for _ in range(train.max_steps if steps is None else steps):
        b = global_batch_at(consumed, train.global_batch_size, train.rampup)
        out.append(b)
        consumed += b
    return out


def planned_samples(train: TrainConfig) -> int:
    """Sequences the whole run trains on (max_steps steps, ramp-up included)."""
    if train.rampup is None:
        return train.max_steps * train.global_batch_size
    return sum(batch_sizes(train))


def planned_tokens(train: TrainConfig, seq_len: int) -> int:
    """Tokens the whole run trains on (max_steps steps, ramp-up included): the default decay length."""
    if train.rampup is None:
        return train.max_steps * train.global_batch_size * seq_len
    return sum(batch_sizes(train)) * seq_len


def in_tokens(cfg: OptimConfig, train: TrainConfig, seq_len: int) -> OptimConfig:
    """`cfg` with warmup_steps / decay_steps turned into the tokens those steps consume."""
    update = {}
    if cfg.warmup_steps is not None:
        update.update(warmup_tokens=sum(batch_sizes(train, cfg.warmup_steps)) * seq_len, warmup_steps=None)
    if cfg.decay_steps is not None:
        update.update(decay_tokens=sum(batch_sizes(train, cfg.decay_steps)) * seq_len, decay_steps=None)
    return cfg.model_copy(update=update)
