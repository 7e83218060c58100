"""One loader for every consumer: generate, serve, fine-tune init and export.

`load_model(path)` accepts
  - a native consolidated checkpoint (config.json + model.safetensors + manifest.json),
  - a Ray Train run directory (its latest valid sharded checkpoint, consolidated in memory),
  - a Hugging Face GPT-2 directory (config.json with model_type "gpt2" + model.safetensors).
`from_pretrained(path)` is the short form: `tokenizer, model = mtnlg_ray.from_pretrained(path)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.data.tokenizer import copy_tokenizer, find_tokenizer, load_tokenizer
from mtnlg_ray.errors import PathError, UserError
from mtnlg_ray.model.checkpoint import build_model, is_native_checkpoint, load_state
from mtnlg_ray.model.convert import is_hf_gpt2_dir, load_hf_gpt2
from mtnlg_ray.model.gpt import GPT


class Loaded(NamedTuple):
    model: GPT
    tokenizer: object | None  # Tokenizer (SentencePiece) or GPT2BPETokenizer; None when the source has none
    config: ModelConfig
    meta: dict  # the checkpoint's config.json (native), or {"source": "hf_gpt2"|"run", ...}


def load_state_any(path: str | Path, step: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None, dict]:
    """(model config, full tensors, tokenizer source or None, metadata) from any supported source.

    The tokenizer source is a tokenizer.model file or a directory with GPT-2's vocab.json + merges.txt.

    `step` picks a checkpoint of a run directory (default: its latest valid one)."""
    from mtnlg_ray.train.remote import local_source

    p = local_source(path, step)  # a run on s3:// / gs://: its checkpoint, fetched to this node
    if not p.exists():
        raise PathError(f"{p}: no such checkpoint, run directory or GPT-2 directory")
    if is_native_checkpoint(p):
        cfg, tensors, meta = load_state(p)
        return cfg, tensors, find_tokenizer(p), meta
    if is_hf_gpt2_dir(p):
        cfg, tensors = load_hf_gpt2(p)
        return cfg, tensors, find_tokenizer(p), {"source": "hf_gpt2"}
    from mtnlg_ray.train.checkpoint import load_run_state  # Ray Train run directory

    return load_run_state(p, step=step)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Loaded:
    cfg, tensors, tok_path, meta = load_state_any(path)
    model = build_model(cfg, tensors, str(path), device, dtype)
    tokenizer = None
    if tok_path is not None:
        tokenizer = load_tokenizer(tok_path)
        if tokenizer.vocab_size != cfg.vocab_size:
            raise UserError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {cfg.vocab_size}")
    return Loaded(model, tokenizer, cfg, meta)


def from_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """`tokenizer, model = from_pretrained(path)`: the model in eval mode on `device`."""
    loaded = load_model(path, device)
    return loaded.tokenizer, loaded.model


def export(source: str | Path, out: str | Path, fmt: str = "native", step: int | None = None,
           tokenizer: str | Path | None = None) -> Path:
    """Consolidate `source` (any loadable kind) into a native checkpoint or a GPT-2 directory.

    LoRA runs are merged into plain weights by the run loader, so the output needs nothing special.
    """
    from mtnlg_ray.model.checkpoint import save_checkpoint
    from mtnlg_ray.model.convert import save_hf_gpt2

    cfg, tensors, tok_path, meta = load_state_any(source, step=step)
    tok_path = Path(tokenizer) if tokenizer is not None else tok_path
    if tok_path is not None:
        n = load_tokenizer(tok_path).vocab_size
        if n != cfg.vocab_size:
            raise UserError(f"{tok_path}: tokenizer has {n} tokens but the model's vocab_size is {cfg.vocab_size}")
    if fmt == "hf":
        out_path = save_hf_gpt2(cfg, tensors, out)
        if tok_path is not None:
            copy_tokenizer(tok_path, out_path)
        return out_path
    extra = {k: v for k, v in meta.items() if k not in ("format_version", "model")}
    return save_checkpoint(tensors, cfg, out, tokenizer_path=tok_path, extra={"exported_from": str(source), **extra})


def generate_text(path: str | Path, prompt: str, max_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
    """Prompt text in, prompt + continuation out (stops at end-of-document)."""
    loaded = load_model(path)
    if loaded.tokenizer is None:
        raise UserError(f"{path}: has no tokenizer.model, so text prompts cannot be encoded")
    tok = loaded.tokenizer
    ids = tok.encode(prompt, return_tensors="pt")
    if ids.shape[1] == 0:
        raise UserError("--prompt: encodes to no tokens")
    out = loaded.model.generate(ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                eos_id=tok.eod_id, seed=seed)
    return tok.decode(out[0])
