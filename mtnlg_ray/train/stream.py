"""A worker's view of its Ray Data shards as torch tensors: `iter_batches` and the train `TokenStream`.

The datasets themselves (blending, per-epoch permutation, fixed 256-row blocks) are built in
data/dataset.py, which imports no torch so that Ray Data's read tasks start without it; the
conversion of their Arrow blocks into LongTensors happens here, in the training worker.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from mtnlg_ray.data.dataset import ROWS_PER_BLOCK


def iter_batches(shard, batch_size: int, skip_batches: int = 0,
                 drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {"input_ids": LongTensor (B, seq_len + 1)} (+ "labels", -100 = masked, when present).

    `shard`: a worker's `ray.train.get_dataset_shard(name)` (a DataIterator) or a ray.data.Dataset.
    The last incomplete batch is dropped unless `drop_last` is False. The first `skip_batches`
    batches are read and discarded (resume inside a pass). Batches arrive as Arrow tables;
    list<int32> columns are reshaped, not copied row by row.
    """
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0 (got {skip_batches})")
    batches = shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=drop_last,
                                 prefetch_batches=2)
    for i, table in enumerate(batches):
        if i < skip_batches:
            continue
        yield {name: _to_long(table[name]) for name in ("input_ids", "labels") if name in table.column_names}


def _to_long(column: pa.ChunkedArray) -> torch.Tensor:
    """A list<int32> column of equal-length rows -> LongTensor (rows, length)."""
    arr = column.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.astype(np.int64).reshape(len(arr), -1))


class TokenStream:
    """The train stream (every row of the run, epochs included: data/dataset.py); `take(n)` returns
    the next n rows. It is read in chunks of `read_rows` rows, whatever the batch sizes: each read
    from Ray Data costs the worker a few milliseconds of Python (iterator, format conversion) that
    small steps would feel, so a chunk of one Ray Data block (ROWS_PER_BLOCK) serves many steps.
    A run resumed after `consumed` rows skips consumed // read_rows chunks and the first
    consumed % read_rows rows of the next."""

    def __init__(self, shard, consumed: int, read_rows: int = ROWS_PER_BLOCK):
        skip, self._drop = divmod(consumed, read_rows)
        self._it = iter_batches(shard, read_rows, skip_batches=skip, drop_last=False)
        self._buf: dict[str, torch.Tensor] | None = None  # the chunk being taken from
        self._off = 0  # rows of _buf already taken
        self.pos = consumed
        self.wait_s = 0.0  # seconds spent waiting for data since the last reset

    def take(self, n: int, hasher) -> dict[str, torch.Tensor]:
        """The next n rows ({"input_ids": (n, T+1)} [+ "labels"]); their ids are fed to `hasher`."""
        t0 = time.perf_counter()
        pieces = []
        while n:
            if self._buf is None or self._off == len(self._buf["input_ids"]):
                try:
                    self._buf = next(self._it)
                except StopIteration:
                    raise RuntimeError(f"the train stream ended after {self.pos} rows (it holds the run's planned "
                                       "samples; the trainer sizes it from train.max_steps)") from None
                self._off, self._drop = self._drop, 0
            got = min(n, len(self._buf["input_ids"]) - self._off)
            pieces.append({k: v[self._off:self._off + got] for k, v in self._buf.items()})
            self._off += got
            self.pos += got
            n -= got
        rows = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        hasher.update(rows["input_ids"].numpy().tobytes())
        self.wait_s += time.perf_counter() - t0
        return rows
