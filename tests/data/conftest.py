"""Fixtures for the data tests: a writer of small dataset directories.

Uses the session `tiny_tokenizer` of tests/conftest.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtnlg_ray.data.shards import write_manifest
from mtnlg_ray.data.tokenizer import Tokenizer

def write_dataset(root: Path, tokenizer: Tokenizer, marker: int, n_train: int, n_val: int = 0, seq_len: int = 8,
                 labels: bool = False, rows_per_file: int = 32, row_group_size: int = 8) -> Path:
    """A dataset dir whose row r of dataset `marker` is [marker, r, r+1, ...] (train) / [marker, -r-1, ...] (val)."""
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
