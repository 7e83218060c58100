"""Prefix cache: the KV blocks of prompt prefixes computed before, reused by later requests.

vLLM's automatic prefix caching, fitted to the engine's slot cache (model/kv_cache.py: one row per
running request). A separate, preallocated pool holds fixed-size blocks of keys and values:

    k, v:  (n_layers, n_heads, n_blocks, BLOCK, head_dim)

(a row of the slot cache is (n_layers, n_heads, max_len, head_dim): the same order, so a run of
blocks goes in and out of a row by one gather or scatter along the block axis, no transpose).

Block i of a prompt holds its tokens i*BLOCK .. (i+1)*BLOCK - 1, whose keys and values depend on
every token before them, so a block is named by a hash chain over the prompt:
h_i = sha256(h_{i-1} || token ids of block i), h_{-1} = the request's LoRA adapter identity (b"" for the
base model: an adapter changes every key and value, as vLLM puts the LoRA id in its block hashes). Equal
names mean equal prefixes under the same weights.

    match(hashes, limit)         the longest run of cached blocks from the start (block ids)
    load(cache, row, blocks)     copy them into a row: the row then starts len(blocks) * BLOCK long
    store(cache, row, hashes)    copy a prefilled row's full prompt blocks that are not cached yet

The engine asks for at most (prompt length - 1) // BLOCK blocks: the last prompt token is always
computed, its logits give the first output token.

Nothing is ever held: a hit is copied into the request's own row at admission, and a running
request reads only its row, so every pool block can be evicted at any time. Eviction is LRU: a
hit or a store refreshes its chain deepest block first, so a prefix outlives the blocks after it
(a block whose parent is gone can no longer be matched). The copies cost memory bandwidth only:
a block is n_layers x 2 x BLOCK x d_model values (16 tokens of a 6 x 384 model: 295 KB), against a
prefill's ~2 x params FLOPs per token.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from mtnlg_ray.model.kv_cache import KVCache

BLOCK = 16  # tokens per block (vLLM's default block size)


def block_hashes(tokens: list[int], n_blocks: int | None = None, salt: bytes = b"") -> list[bytes]:
    """Names of the first `n_blocks` (default: every full) blocks of `tokens`: the hash chain from `salt`."""
    n = len(tokens) // BLOCK if n_blocks is None else n_blocks
    out, prev = [], salt
    for i in range(n):
        prev = hashlib.sha256(prev + array("q", tokens[i * BLOCK:(i + 1) * BLOCK]).tobytes()).digest()
        out.append(prev)
    return out


def default_blocks(slots: int, context: int) -> int:
    """The pool's default size: half the tokens the cache's rows hold."""
    return max(1, slots * context // (2 * BLOCK))


class PrefixCache:
    """A pool of `n_blocks` KV blocks shaped for `cache` (same layers, heads, dtype and device)."""

    def __init__(self, cache: KVCache, n_blocks: int):
        L, _, H, _, D = cache.k.shape
        shape = (L, H, n_blocks, BLOCK, D)
        # empty, not zeros: pages of blocks never written stay untouched (no resident memory).
        self.k = torch.empty(shape, dtype=cache.k.dtype, device=cache.k.device)
        self.v = torch.empty(shape, dtype=cache.v.dtype, device=cache.v.device)
        self.n_blocks = n_blocks
        self.blocks: OrderedDict[bytes, int] = OrderedDict()  # name -> block id; least recently used first
        self.free = list(range(n_blocks - 1, -1, -1))
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def match(self, hashes: list[bytes], limit: int) -> list[int]:
        """Block ids of the longest cached run of `hashes[:limit]` from the first (refreshed in the LRU)."""
        ids = []
        for h in hashes[:limit]:
            b = self.blocks.get(h)
            if b is None:
                break
            ids.append(b)
        self._touch(hashes[:len(ids)])
        return ids

    def load(self, cache: KVCache, row: int, ids: list[int]) -> None:
        """Copy blocks `ids` (a prefix, in order) into `row`'s first len(ids) * BLOCK positions."""
        if not ids:
            return
        idx = torch.tensor(ids, device=self.k.device)
        # (L, H, n, BLOCK, D) -> (L, H, n * BLOCK, D): the row's layout
        cache.load(row, self.k[:, :, idx].flatten(2, 3), self.v[:, :, idx].flatten(2, 3))

    def store(self, cache: KVCache, row: int, hashes: list[bytes]) -> int:
        """Copy the blocks of `hashes` not cached yet from `row` (prefilled through them) into the pool,
        evicting least recently used blocks; returns the number stored. A chain longer than the pool
        keeps its first n_blocks blocks (a block is useless without its parents)."""
        hashes = hashes[:self.n_blocks]
        keep = set(hashes)
        new = [(i, h) for i, h in enumerate(hashes) if h not in self.blocks]
        if new:
            ids = [self._allocate(keep) for _ in new]
            for (_, h), b in zip(new, ids):
                self.blocks[h] = b
            src = torch.tensor([i for i, _ in new], device=self.k.device)
            dst = torch.tensor(ids, device=self.k.device)
            rk, rv = cache.read(row, len(hashes) * BLOCK)  # (L, H, n * BLOCK, D) -> blocks (L, H, n, BLOCK, D)
            self.k[:, :, dst] = rk.unflatten(2, (-1, BLOCK))[:, :, src]
            self.v[:, :, dst] = rv.unflatten(2, (-1, BLOCK))[:, :, src]
        self._touch(hashes)
        return len(new)

    def _allocate(self, keep: set[bytes]) -> int:
        """A free block, or the least recently used one outside the chain being stored."""
        if self.free:
            return self.free.pop()
        victim = next(h for h in self.blocks if h not in keep)
        self.evictions += 1
        return self.blocks.pop(victim)

    def _touch(self, hashes: list[bytes]) -> None:
        for h in reversed(hashes):  # the first block ends most recent: parents outlive their children
            self.blocks.move_to_end(h)
