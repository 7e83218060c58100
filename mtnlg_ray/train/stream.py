"""A worker's reads of a blended stream (data/dataset.py) as torch tensors: `iter_batches` and the train `TokenStream`.

The stream itself (blending, per-epoch permutation, rows gathered from memory-mapped matrices) is
data/dataset.py, which imports no torch; the conversion of its int32 rows into LongTensors
happens here, in the training worker.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from mtnlg_ray.data.dataset import BlendedRows


def _tensors(rows: dict) -> dict[str, torch.Tensor]:
    """{column: int32 (n, width)} -> {"input_ids": LongTensor (n, width)} (+ "labels", -100 = masked)."""
    return {name: torch.from_numpy(rows[name]).long() for name in ("input_ids", "labels") if name in rows}


def iter_batches(rows: BlendedRows, batch_size: int, skip_batches: int = 0,
                 drop_last: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {"input_ids": LongTensor (B, seq_len + 1)} (+ "labels") for consecutive batches of `rows`.

    The last incomplete batch is dropped unless `drop_last` is False. Reading starts at batch
    `skip_batches` (resume inside a pass)."""
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0 (got {skip_batches})")
    end = len(rows) - (len(rows) % batch_size if drop_last else 0)
    for lo in range(skip_batches * batch_size, end, batch_size):
        yield _tensors(rows.read(lo, min(lo + batch_size, end)))


class TokenStream:
    """The train stream (every row of the run, epochs included: data/dataset.py) from row
    `consumed` on; `take(n)` returns the next n rows. The position is counted in rows, so a run
    resumes at any row, whatever its batch sizes were."""

    def __init__(self, rows: BlendedRows, consumed: int):
        self.rows = rows
        self.pos = consumed
        self.wait_s = 0.0  # seconds spent reading since the last reset

    def take(self, n: int, hasher) -> dict[str, torch.Tensor]:
        """The next n rows ({"input_ids": (n, T+1)} [+ "labels"]); their ids are fed to `hasher`."""
        t0 = time.perf_counter()
        if self.pos + n > len(self.rows):
            raise RuntimeError(f"the train stream ended after {len(self.rows)} rows (it holds the run's planned "
                               "samples; the trainer sizes it from train.max_steps)")
        rows = _tensors(self.rows.read(self.pos, self.pos + n))
        self.pos += n
        hasher.update(rows["input_ids"].numpy().tobytes())
        self.wait_s += time.perf_counter() - t0
        return rows
