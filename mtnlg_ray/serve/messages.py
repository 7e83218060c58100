"""What the replica and its engine process say to each other (engine_process.py), one dataclass each.

They cross one socket pair as pickled objects (multiprocessing `Connection`), between two processes
of this package only; a field added on one side is a field on the other, and a handler matches on
the class, never on a position in a tuple.

    replica -> engine process    EngineSpec (once), then Add | Abort | Shutdown
    engine process -> replica    Ready | LoadFailed (once), then a StepResult per step, or Dead
                                 (a step raised; the process then exits)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module stays import-light
    from mtnlg_ray.config.serve import SpeculativeConfig
    from mtnlg_ray.serve.engine import Output, StepStats
    from mtnlg_ray.serve.sampling import SamplingParams


# ------------------------------------------------------------------------- replica -> engine process
@dataclass(frozen=True)
class EngineSpec:
    """What to load and how big the engine is (ServeConfig's values)."""

    checkpoint: str  # any kind checkpoint/source.py opens
    device: str  # "cpu" | "cuda" | "auto"
    max_slots: int  # KV-cache rows
    max_context: int | None  # tokens per row; None: the model's max_seq_len
    max_waiting: int  # queued requests beyond the rows
    prefix_cache_blocks: int | None = None  # 16-token KV blocks of the prefix cache; None: default, 0: off
    speculative: SpeculativeConfig | None = None  # n-gram speculative decoding; None: off


@dataclass(frozen=True)
class Add:
    """Queue a request. The prompt was validated by the engine client (engine_client.py)."""

    request_id: str
    prompt: list[int]  # token ids
    params: SamplingParams


@dataclass(frozen=True)
class Abort:
    """Drop a request now (the client left); its row is free at the next step."""

    request_id: str


@dataclass(frozen=True)
class Shutdown:
    """Stop stepping and exit."""


# ------------------------------------------------------------------------- engine process -> replica
@dataclass(frozen=True)
class Ready:
    """The model is loaded: the engine's sizes, as the engine computed them."""

    max_slots: int
    max_waiting: int
    max_context: int  # tokens per row (the model's max_seq_len at most)
    vocab_size: int
    tokenizer: str  # path of the checkpoint's tokenizer.model, for the replica to load
    device: str


@dataclass(frozen=True)
class LoadFailed:
    """The checkpoint could not be loaded; `message` is one line for the operator."""

    message: str


@dataclass(frozen=True)
class StepResult:
    """One engine step: its outputs and the engine's load after it."""

    outputs: list[Output]
    num_running: int  # rows busy
    num_waiting: int  # queued for a row
    free_rows: int
    stats: StepStats  # what the step did: prefills, decode batch, prefix-cache and speculation counts


@dataclass(frozen=True)
class Dead:
    """A step raised: every open request ends with `outputs` (finish_reason "error"); the process exits."""

    error: str  # "the engine step failed: ExceptionType: message"
    outputs: list[Output]
