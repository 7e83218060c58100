"""What the replica and its engine process say to each other (engine_process.py), one dataclass each.

They cross one socket pair as pickled objects (multiprocessing `Connection`), between two processes
of this package only; a field added on one side is a field on the other, and a handler matches on
the class, never on a position in a tuple.

    replica -> engine process    EngineSpec (once), then Add | Abort | LoadLora | UnloadLora | Shutdown
    engine process -> replica    Ready | LoadFailed (once), then a StepResult per step, a LoraDone per
                                 LoadLora / UnloadLora (in their order), or Dead (a step raised; the
                                 process then exits)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module stays import-light
    from mtnlg_ray.config import ModelConfig
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
    lora_adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters loaded at start: name -> path
    max_loras: int = 4  # adapter slots of the model's LoRA bank
    quantization: str = "none"  # "int8": int8 weights for decoding (model/quantize.py)


@dataclass(frozen=True)
class Add:
    """Queue a request. The prompt was validated by the engine client (engine_client.py)."""

    request_id: str
    prompt: list[int]  # token ids
    params: SamplingParams
    lora: str | None = None  # a loaded LoRA adapter's name; None: the base model


@dataclass(frozen=True)
class Abort:
    """Drop a request now (the client left); its row is free at the next step."""

    request_id: str


@dataclass(frozen=True)
class LoadLora:
    """Read a LoRA run's adapters (checkpoint/lora_adapter.py) into a free slot of the bank, as `name`."""

    name: str  # the `model` requests name it by
    path: str  # a LoRA fine-tune's run directory, checkpoint_* or remote URI


@dataclass(frozen=True)
class UnloadLora:
    """Free adapter `name`'s slot (the replica sends it once no request uses the adapter)."""

    name: str


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
    model: ModelConfig | None = None  # the served model's architecture (LoRA adapters are checked against it)


@dataclass(frozen=True)
class LoadFailed:
    """The checkpoint could not be loaded; `message` is one line for the operator."""

    message: str


@dataclass(frozen=True)
class LoraDone:
    """The answer to a LoadLora or UnloadLora: `error` is one line when it failed, else None."""

    name: str
    error: str | None = None


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
