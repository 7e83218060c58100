"""Tiny fine-tuning assets for the tests: a random debug-preset checkpoint, a toy task, a small job."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from mtnlg_ray.config import FinetuneJob, ModelConfig, validate
from mtnlg_ray.checkpoint import native
from mtnlg_ray.model.gpt import GPT

SEQ_LEN = 64
WORDS = "open read write close seek flush lines bytes text path name mode".split()


def tiny_checkpoint(out: Path, tokenizer) -> Path:
    """A native checkpoint of a randomly initialised debug GPT (64-token context) with `tokenizer`."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", vocab_size=tokenizer.vocab_size, max_seq_len=SEQ_LEN)
    return native.save(GPT(cfg).state_dict(), cfg, out, tokenizer_path=tokenizer.path)


def toy_task(path: Path, n: int, seed: int) -> Path:
    """A copy task, {"prompt": "copy: w1 w2 w3", "response": "w1 w2 w3"}: easy to learn in a few steps."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        lines.append(json.dumps({"prompt": f"copy: {words}", "response": words}))
    path.write_text("\n".join(lines) + "\n")
    return path


def finetune_job(init_from: Path, task_dir: Path, storage: Path, name: str, **sections) -> FinetuneJob:
    """Six steps of 8 x 64 tokens on the toy task, evaluated and checkpointed every 3 steps."""
    base = {
        "init_from": str(init_from),
        "output_dir": str(task_dir / "sft_data"),
        "baseline_eval": False,
        "sft": {"train_paths": [str(task_dir / "train.jsonl")], "val_paths": [str(task_dir / "val.jsonl")],
                "seq_len": SEQ_LEN},
        "optim": {"lr": 3e-3, "warmup_tokens": 512, "decay_tokens": 6 * 8 * SEQ_LEN, "weight_decay": 0.0},
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 6, "log_interval": 3,
                  "eval_interval": 3, "eval_batches": 2, "peak_flops": 1e11},
        "checkpoint": {"interval": 3, "num_to_keep": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(storage), "name": name},
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(base.get(key), dict) else value
    return validate(FinetuneJob, base, "test finetune job")


def write_task(task_dir: Path) -> Path:
    task_dir.mkdir(parents=True, exist_ok=True)
    toy_task(task_dir / "train.jsonl", 160, seed=0)
    toy_task(task_dir / "val.jsonl", 24, seed=1)
    return task_dir
