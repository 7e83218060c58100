"""The public Python API: load, export and generate from any checkpoint (checkpoint/source.py says
which kinds: a native export, a Ray Train run directory or one of its checkpoints, a Hugging Face
GPT-2 directory, or a run on s3:// / gs://).

    tokenizer, model = mtnlg_ray.from_pretrained("runs/pretrain")    # GPT in eval mode
    export("runs/pretrain", "ckpt/")                                  # consolidated native checkpoint
    generate_text("ckpt/", "def fib(n):", max_tokens=32)
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtnlg_ray.checkpoint import hf_gpt2, hf_tokenizer, model_card, native
from mtnlg_ray.checkpoint.source import load_checked_tokenizer, open_source
from mtnlg_ray.data.chat import load_chat_template
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.gpt import GPT


def from_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    step: int | None = None) -> tuple[object | None, GPT]:
    """(tokenizer, model): the tokenizer (SentencePiece, a Hugging Face tokenizer.json or GPT-2 BPE;
    None when the checkpoint has none) and the GPT in eval mode on `device`. `step`: a run's
    checkpoint (default: the newest valid)."""
    source = open_source(path, step)
    return source.tokenizer(), source.model(device, dtype)


def export(source: str | Path, out: str | Path, fmt: str = "native", step: int | None = None,
           tokenizer: str | Path | None = None) -> Path:
    """Consolidate `source` (any kind) into a native checkpoint (`fmt="native"`) or a transformers
    GPT-2 directory (`fmt="hf"`: tokenizer.json, tokenizer_config.json with the chat template and
    generation_config.json beside the weights, so AutoTokenizer gives our ids), with its tokenizer
    (or `tokenizer`, one to bundle) and a model card (README.md). A LoRA run's adapters are merged
    into plain weights. Returns `out`."""
    src = open_source(source, step)
    cfg = src.config()
    tok_path = Path(tokenizer) if tokenizer is not None else src.tokenizer_path
    tok = None if tok_path is None else load_checked_tokenizer(tok_path, cfg, tok_path)
    files = {}
    if fmt == "hf" and tok is not None:  # before the weights are read: a tokenizer it cannot convert fails fast
        template = load_chat_template(checkpoint_dir=src.path)
        files = hf_tokenizer.export_files(tok, tok_path, cfg.max_seq_len, template)
    tensors = src.state_dict()
    facts = model_card.training_facts(src)
    files["README.md"] = model_card.render(out, cfg, model_card.parameter_count(cfg, tensors), tok, facts, fmt).encode()
    if fmt == "hf":
        return hf_gpt2.save(cfg, tensors, out, token_ids=hf_tokenizer.token_ids(tok), files=files)
    extra = {**src.meta(), "exported_from": str(source), "training": facts}
    return native.save(tensors, cfg, out, tokenizer_path=tok_path, extra=extra, files=files)


def generate_text(path: str | Path, prompt: str, max_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
    """Prompt text in, prompt + continuation out (stops at end-of-document)."""
    tok, model = from_pretrained(path)
    if tok is None:
        raise UserError(f"{path}: has no tokenizer.model, so text prompts cannot be encoded")
    ids = tok.encode(prompt, return_tensors="pt")
    if ids.shape[1] == 0:
        raise UserError("--prompt: encodes to no tokens")
    out = model.generate(ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tok.eod_id, seed=seed)
    return tok.decode(out[0])
