"""Serving fixtures: a tiny native checkpoint (SentencePiece on stdlib sources + a seeded debug GPT)."""

from __future__ import annotations

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
