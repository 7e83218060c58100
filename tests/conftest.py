"""Shared test fixtures: one real local Ray instance per test session, tiny assets.

`address="local"` always starts a fresh instance for this session, never joining a cluster
that another process started with `ray start` (tests that need their own cluster start it
themselves, in a subprocess).
"""

from __future__ import annotations

import os
import shutil
import socket
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
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
    from mtnlg_ray.data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "heapq.py", "bisect.py", "shlex.py")]
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=512)


@pytest.fixture(scope="session")
def cluster_pretrain_data(tmp_path_factory, tiny_tokenizer):
    """A small pretraining dataset dir (64-token rows of a few stdlib sources) for the cluster and job tests."""
    import numpy as np

    from mtnlg_ray.data.shards import write_manifest

    seq_len, tok = 64, tiny_tokenizer
    root = tmp_path_factory.mktemp("cluster_data") / "stdlib"
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:6]
    ids = np.concatenate([np.array(tok.encode(f.read_text(encoding="utf-8")) + [tok.eod_id], np.int32) for f in files])
    rows = ids[: len(ids) // (seq_len + 1) * (seq_len + 1)].reshape(-1, seq_len + 1)
    for split, part in (("train", rows[16:]), ("val", rows[:16])):
        (root / split).mkdir(parents=True)
        pq.write_table(pa.table({"input_ids": pa.array(list(part), pa.list_(pa.int32()))}),
                       root / split / "part-00000.parquet")
    shutil.copy(tok.path, root / "tokenizer.model")
    write_manifest(root, tok.sha256, tok.vocab_size, tok.eod_id, seq_len)
    return root


def write_dataset(root: Path, tokenizer, marker: int, n_train: int, n_val: int = 0, seq_len: int = 8,
                  labels: bool = False, rows_per_file: int = 32, row_group_size: int = 8) -> Path:
    """A dataset dir whose row r of dataset `marker` is [marker, r, r+1, ...] (train) / [marker, -r-1, ...] (val)."""
    from mtnlg_ray.data.shards import write_manifest

    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for start in range(0, n, rows_per_file):
            rows = range(start, min(n, start + rows_per_file))
            ids = [[marker, r if split == "train" else -r - 1] + [r % 97] * (seq_len - 1) for r in rows]
            cols = {"input_ids": pa.array(ids, pa.list_(pa.int32()))}
            if labels:
                cols["labels"] = pa.array([[-100] + row[1:] for row in ids], pa.list_(pa.int32()))
            pq.write_table(pa.table(cols), root / split / f"part-{start // rows_per_file:05d}.parquet",
                           row_group_size=row_group_size)
    shutil.copy(tokenizer.path, root / "tokenizer.model")
    write_manifest(root, tokenizer.sha256, tokenizer.vocab_size, tokenizer.eod_id, seq_len)
    return root


@pytest.fixture
def make_dataset(tmp_path, tiny_tokenizer):
    """make_dataset(name, marker, n_train, n_val=0, **kw) -> a dataset dir under tmp_path."""
    return lambda name, marker, n_train, n_val=0, **kw: write_dataset(tmp_path / name, kw.pop("tokenizer", tiny_tokenizer),
                                                                      marker, n_train, n_val, **kw)
