"""Tiny training checkpoints for the checkpoint tests: a debug GPT trained a step or two, saved by sharded.save."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mtnlg_ray.checkpoint import sharded
from mtnlg_ray.checkpoint.remote import checkpoint_dir_name
from mtnlg_ray.config import ModelConfig, OptimConfig
from mtnlg_ray.model.gpt import GPT, lm_loss
from mtnlg_ray.train.optim import Optimizers

CFG = ModelConfig(preset="debug", vocab_size=300, max_seq_len=16)


def trained(seed: int = 0, steps: int = 2, cfg: ModelConfig = CFG) -> tuple[GPT, Optimizers]:
    """A GPT and its AdamW after `steps` steps on random tokens."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    opts = Optimizers([model], OptimConfig(lr=1e-2))
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 9))
        lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        opts.step()
    return model, opts


def save_into(run_dir: Path, step: int, model: GPT, opts: Optimizers, tokenizer: Path | None = None,
              cfg: ModelConfig = CFG) -> Path:
    """A checkpoint_* directory of `run_dir`, as Ray Train leaves it after a report at `step`."""
    local = sharded.save([model], opts.pairs, {"step": step, "consumed_samples": 4 * step, "tokens": 32 * step},
                         {"model": cfg.model_dump(mode="json"), "kind": "pretrain", "job": {}}, tokenizer)
    out = Path(run_dir) / checkpoint_dir_name(step)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(local, out)
    return out


def save_lora_into(run_dir: Path, step: int, model: GPT, lora: dict, cfg: ModelConfig = CFG,
                   tokenizer: Path | None = None) -> Path:
    """A checkpoint_* directory of a LoRA fine-tune run: `model` has `apply_lora(lora)` applied (base weights
    and lora_A / lora_B), config.json names the job's lora section, as the training loop writes them."""
    local = sharded.save([model], [], {"step": step, "consumed_samples": 4 * step, "tokens": 32 * step},
                         {"model": cfg.model_dump(mode="json"), "kind": "finetune", "job": {"lora": lora}}, tokenizer)
    out = Path(run_dir) / checkpoint_dir_name(step)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(local, out)
    return out
