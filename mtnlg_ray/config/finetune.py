"""Fine-tuning job config: the start point, the task data (SFT) and LoRA; the parallel layout,
optimizer, loop, checkpointing and workers are pretraining's sections (train.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mtnlg_ray.config.base import Section
from mtnlg_ray.config.train import (CheckpointingConfig, OptimConfig, ParallelConfig, TrainConfig,
                                    WorkerScalingConfig)

LoraTarget = Literal["q_proj", "k_proj", "v_proj", "out_proj", "up_proj", "down_proj"]


class LoraConfig(Section):
    """LoRA adapters (model/lora.py): base weights frozen, W + alpha/rank * B @ A learned."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0, description="update scale is alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[LoraTarget] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
                                             min_length=1, description="the model's own linear module names")


class SftDataConfig(Section):
    """Task data (data/sft.py): JSONL ({prompt, response}, OpenAI messages, ShareGPT, Alpaca) or a built-in task."""

    task: Literal["jsonl", "stdlib_code", "stdlib_summarize", "stdlib_dialogue"] = Field(
        "jsonl", description="jsonl: the files in train_paths; built in, mined from the .py files in train_paths "
        "(default: the Python standard library; data/stdlib_tasks.py): stdlib_code (signature + docstring -> "
        "body), stdlib_summarize (docstring body -> summary line), stdlib_dialogue (questions about a module "
        "answered from its docstrings)")
    train_paths: list[str] = Field(default_factory=list, description="JSONL files, directories or globs")
    val_paths: list[str] = Field(default_factory=list, description="validation JSONL; empty: val_fraction of train")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="examples sent to val by a seeded content hash")
    seq_len: int = Field(256, gt=0, description="rows hold seq_len + 1 tokens; at most the model's max_seq_len")
    packing: bool = Field(True, description="several whole examples per row; false: one padded example per row")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="an example longer than a row")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="bad lines skipped up to this fraction, else refused")
    max_examples: int | None = Field(None, gt=0, description="read at most this many examples (per input)")
    tokenizer: str | None = Field(None, description="tokenizer.model to use; None: the init checkpoint's")
    seed: int = 1234


class FinetuneJob(Section):
    """`mtnlg finetune`: task data prepared from `sft`, trained from `init_from` (full or LoRA)."""

    init_from: str = Field(description="native checkpoint, run directory, or Hugging Face GPT-2 directory")
    sft: SftDataConfig = Field(default_factory=SftDataConfig)
    output_dir: str = Field("data_out/sft", description="where the tokenized task dataset is written")
    lora: LoraConfig | None = Field(None, description="LoRA adapters; None: full fine-tuning")
    baseline_eval: bool = Field(True, description="evaluate the initial weights on the val set first (in the "
                                "driver process, on CPU: turn off for models too large for it)")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4))
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointingConfig = Field(default_factory=CheckpointingConfig)
    scaling: WorkerScalingConfig = Field(default_factory=lambda: WorkerScalingConfig(name="finetune"))
