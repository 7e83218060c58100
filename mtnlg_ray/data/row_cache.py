"""Random access to the packed rows of a Parquet shard: a memory-mapped (rows, width) int32 matrix.

Training visits rows in a fresh global permutation every epoch (data/dataset.py), so a block of
256 consecutive training rows touches up to 256 places spread over every shard. Parquet decodes
whole row groups (128 rows of 8 KiB each), which would read ~128x the data. Megatron-LM keeps
its samples in an indexed binary file read through `np.memmap`; we do the same, derived from the
shards: each column of each shard is converted once into an `.npy` file of shape (rows, width)
(width = seq_len + 1 ids, the same for every row of a packed dataset) and then read with numpy
fancy indexing on a memory map, so a row costs one 4 * width-byte read from the page cache.

Where the matrices live
    `<split dir>/.rows/<shard stem>.<column>.<size>-<mtime_ns>.npy` beside the shard when that
    directory is writable (on a cluster the dataset lives on shared storage, so every node sees
    the same files), else under the system temp directory. The name carries the shard's size and
    modification time: a rewritten shard gets a new matrix and the stale one is removed.
    Conversion streams one row group at a time (bounded memory) into a temporary file that is
    renamed into place, so concurrent readers never see half a matrix.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtnlg_ray.errors import UserError


def cache_path(shard: str | Path, column: str) -> Path:
    """Where the row matrix of `column` of `shard` is kept (see the module docstring)."""
    shard = Path(shard)
    st = shard.stat()
    name = f"{shard.stem}.{column}.{st.st_size}-{st.st_mtime_ns}.npy"
    if os.access(shard.parent, os.W_OK):
        return shard.parent / ".rows" / name
    key = hashlib.sha1(str(shard.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "mtnlg_ray_rows" / f"{key}-{name}"


def ensure_matrix(shard: str | Path, column: str, width: int) -> Path:
    """Convert `column` of `shard` to its row matrix unless that exists already; returns its path."""
    dst = cache_path(shard, column)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    pf = pq.ParquetFile(shard)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(pf.metadata.num_rows, width))
    at = 0
    try:
        for g in range(pf.num_row_groups):
            col = pf.read_row_group(g, columns=[column]).column(0).combine_chunks()
            lengths = pc.list_value_length(col)
            if len(col) and (pc.min(lengths).as_py() != width or pc.max(lengths).as_py() != width):
                raise UserError(f"{shard}: rows of column {column!r} are not all {width} ids long "
                                f"(row group {g}); not a packed dataset shard")
            out[at:at + len(col)] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            at += len(col)
        out.flush()
        del out
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in dst.parent.glob(f"{Path(shard).stem}.{column}.*.npy"):  # matrices of earlier versions
        if stale != dst:
            stale.unlink(missing_ok=True)
    return dst


def row_matrix(shard: str | Path, column: str, width: int) -> np.ndarray:
    """(rows, width) int32, read-only memory map of `column` of `shard` (converted on first use).
    Finding the matrix costs a `stat` of the shard: a reader keeps the map (BlendedRows does)."""
    return np.load(ensure_matrix(shard, column, width), mmap_mode="r")
