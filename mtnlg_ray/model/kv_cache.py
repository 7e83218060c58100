"""A preallocated key/value cache whose rows advance independently.

Layout (nanochat-style, one tensor each for keys and values):

    k, v:     (n_layers, batch_slots, n_heads, max_len, head_dim)
    lengths:  (batch_slots,) int64, tokens already cached in each row

A row is a sequence slot. `GPT.forward(ids, kv_cache=cache, rows=r)` writes the new tokens of
row r[i] at positions lengths[r[i]] .. lengths[r[i]] + T - 1 in every layer, attends over the
row's cached prefix, then advances those rows by T. Prefill (T = prompt length) and one-token
decode steps both take that path, so a serving engine can add a request to a free row, decode
all busy rows together, and free a finished row (`reset`) without touching the others.
A row can also start from keys and values computed elsewhere (`load`: a cached prompt prefix,
serve/prefix_cache.py) and drop its last tokens (`truncate`: rejected speculative tokens).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_slots: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layers, batch_slots, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_slots, dtype=torch.long, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_slots: int, max_len: int | None = None) -> "KVCache":
        """A cache shaped for `model` (a GPT), on its device and in its dtype."""
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layers, batch_slots, cfg.n_heads, max_len or cfg.max_seq_len, cfg.head_dim, p.device, p.dtype)

    @property
    def batch_slots(self) -> int:
        return self.k.shape[1]

    def reset(self, rows: torch.Tensor | list[int] | int | None = None) -> None:
        """Free rows (all when None): their length drops to 0; stale entries are never read."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, device=self.lengths.device)] = 0

    def load(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make k, v (n_layers, H, n, D) the row's first n tokens: its length becomes n."""
        n = k.shape[2]
        self.k[:, row, :, :n] = k
        self.v[:, row, :, :n] = v
        self.lengths[row] = n

    def read(self, row: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views k, v (n_layers, H, end, D) of the row's first `end` positions."""
        return self.k[:, row, :, :end], self.v[:, row, :, :end]

    def truncate(self, rows: list[int], lengths: list[int]) -> None:
        """Cut rows back to `lengths` tokens (entries past a row's length are never read)."""
        self.lengths[torch.tensor(rows, device=self.lengths.device)] = torch.tensor(lengths, device=self.lengths.device)

    def positions(self, rows: torch.Tensor | None, batch: int, n_new: int) -> torch.Tensor:
        """Absolute positions (B, n_new) of the next n_new tokens of `rows` (None: rows 0..B-1)."""
        start = self.lengths[:batch] if rows is None else self.lengths[rows]
        pos = start[:, None] + torch.arange(n_new, device=start.device)
        if int(pos[:, -1].max()) >= self.max_len:
            raise ValueError(f"KV cache overflow: position {int(pos.max())} >= max_len {self.max_len}")
        return pos

    def update(self, layer: int, rows, positions: torch.Tensor, length: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at `positions` (B, T); return this layer's k, v (B, H, length, D).

        `length` is the longest row after the write, so attention cost follows the real context.
        """
        kl, vl = self.k[layer], self.v[layer]  # (slots, H, max_len, D)
        b = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        # Advanced indices (B, 1) and (B, T) around a slice: one (H, D) slot per token, (B, T, H, D).
        kl[b[:, None], :, positions] = k.transpose(1, 2)
        vl[b[:, None], :, positions] = v.transpose(1, 2)
        if rows is None:  # a view, no copy
            return kl[: k.shape[0], :, :length], vl[: k.shape[0], :, :length]
        return kl[rows, :, :length], vl[rows, :, :length]

    def write_column(self, layer: int, batch: int, length: int, k: torch.Tensor, v: torch.Tensor):
        """`update` for rows 0..B-1 that all write one token at position length - 1: k, v (B, H, 1, D)
        in, views k, v (B, H, length, D) out, through slices (no index tensors: a decode step's case)."""
        kl, vl = self.k[layer, :batch], self.v[layer, :batch]  # (B, H, max_len, D)
        kl[:, :, length - 1] = k[:, :, 0]
        vl[:, :, length - 1] = v[:, :, 0]
        return kl[:, :, :length], vl[:, :, :length]

    def advance(self, rows: torch.Tensor | None, batch: int, n_new: int) -> None:
        if rows is None:
            self.lengths[:batch] += n_new
        else:
            self.lengths[rows] += n_new
