"""Serving fixtures: a tiny native checkpoint (SentencePiece on stdlib sources + a seeded debug GPT)."""

from __future__ import annotations

import shutil
import socket
import sysconfig
from pathlib import Path

import pytest
import torch

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.data.tokenizer import train_tokenizer
from mtnlg_ray.api import from_pretrained
from mtnlg_ray.checkpoint import native
from mtnlg_ray.model.gpt import GPT

STDLIB_FILES = ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py")
CONTEXT = 256  # the tiny model's max_seq_len (longer than the debug preset's 128, for long streams)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A native checkpoint: 512-token tokenizer, debug-preset GPT (2 layers, d=64), seed 0."""
    root = tmp_path_factory.mktemp("serve_ckpt")
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(lib / name).read_text() for name in STDLIB_FILES]
    tok = train_tokenizer(docs, root / "tokenizer.model", vocab_size=512)
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", vocab_size=tok.vocab_size, max_seq_len=CONTEXT)
    model = GPT(cfg)
    return native.save(model.state_dict(), cfg, root / "ckpt", tokenizer_path=root / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """(model in eval mode, tokenizer) loaded with the one loader."""
    tokenizer, model = from_pretrained(tiny_checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def serve_port() -> int:
    """A free TCP port for one module's Serve HTTP proxy (other Ray instances share this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LORAS = {"sql": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
         "chat": {"rank": 2, "alpha": 4.0, "target_modules": ["k_proj", "out_proj", "up_proj"]},
         "poem": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "down_proj"]}}


@pytest.fixture(scope="session")
def tiny_loras(tiny_checkpoint, tmp_path_factory) -> dict:
    """LoRA fine-tune runs over the tiny model, as `mtnlg finetune` with `lora` writes them (random nonzero
    A and B instead of trained ones): {name: (run dir, the merged model's state dict)}."""
    from mtnlg_ray.checkpoint import sharded
    from mtnlg_ray.checkpoint.manifest import read_config
    from mtnlg_ray.checkpoint.remote import checkpoint_dir_name
    from mtnlg_ray.config import LoraConfig
    from mtnlg_ray.model.lora import apply_lora, merge_lora_state

    base = native.load_tensors(tiny_checkpoint)
    cfg, _ = read_config(tiny_checkpoint)
    out = {}
    for seed, (name, lora) in enumerate(LORAS.items()):
        model = GPT(cfg)
        model.load_state_dict(base, strict=False)  # a tied lm_head is not stored
        apply_lora(model, LoraConfig(**lora))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # the adapters
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        local = sharded.save([model], [], {"step": 1, "consumed_samples": 1, "tokens": 1},
                             {"model": cfg.model_dump(mode="json"), "kind": "finetune", "job": {"lora": lora}}, None)
        run = tmp_path_factory.mktemp(f"lora_{name}")
        shutil.move(local, run / checkpoint_dir_name(1))
        out[name] = (run, merge_lora_state(model.state_dict(), LoraConfig(**lora)))
    return out
