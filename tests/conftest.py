"""Shared test fixtures: one real local Ray instance per test session, tiny assets.

`address="local"` always starts a fresh instance for this session, never joining a cluster
that another process started with `ray start` (tests that need their own cluster start it
themselves, in a subprocess).
"""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 4 logical CPUs (2 real cores): Train workers take 0.5 each, Data the rest."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-piece SentencePiece model trained on a few stdlib sources (seconds)."""
    import sysconfig
    from pathlib import Path

    from mtnlg_ray.data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "heapq.py", "bisect.py", "shlex.py")]
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=512)
