"""Blending, deterministic order, resume and refusals of data/dataset.py, on real shards and memory maps."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from mtnlg_ray.config import TrainDataConfig, DatasetConfig
from mtnlg_ray.data.dataset import blend_index, open_datasets
from mtnlg_ray.train.stream import iter_batches
from mtnlg_ray.data.tokenizer import train_tokenizer
from mtnlg_ray.errors import UserError


def _cfg(*specs, seed=1234):
    return TrainDataConfig(datasets=[DatasetConfig(path=str(p), weight=w) for p, w in specs], seed=seed)


def _rows(ds) -> list[tuple[int, int]]:
    """(marker, row number) of every row, in order."""
    return [(int(r[0]), int(r[1])) for b in iter_batches(ds, 1) for r in b["input_ids"].tolist()]


@pytest.mark.parametrize("weights", [[3, 1], [0.5, 0.3, 0.2], [1, 1, 1, 5]])
def test_blend_index_shares_every_prefix(weights):
    n = 2000
    owner, sample = blend_index(weights, n)
    w = np.asarray(weights) / sum(weights)
    counts = np.stack([np.cumsum(owner == d) for d in range(len(w))], axis=1)  # (n, D) draws after each prefix
    ideal = np.arange(1, n + 1)[:, None] * w[None, :]
    assert np.abs(counts - ideal).max() < 1.5
    for d in range(len(w)):  # samples of each dataset are numbered 0, 1, 2, ... in order
        assert (sample[owner == d] == np.arange((owner == d).sum())).all()


def test_blend_proportions_and_repeats(make_dataset):
    small = make_dataset("small", 1, n_train=40)
    big = make_dataset("big", 2, n_train=200, n_val=16)
    bundle = open_datasets(_cfg((small, 1.0), (big, 1.0)))
    assert bundle.train_rows == 240 and bundle.seq_len == 8
    rows = _rows(bundle.train)
    assert len(rows) == 240
    by_marker = Counter(m for m, _ in rows)
    assert abs(by_marker[1] - 120) <= 1 and abs(by_marker[2] - 120) <= 1
    # the small dataset is repeated: 3 full epochs, every row exactly 3 times
    assert set(Counter(r for m, r in rows if m == 1).values()) == {3}
    # the big one is cut short: 120 distinct rows
    assert len({r for m, r in rows if m == 2}) == by_marker[2]
    # val: only the dataset that has val rows, each once
    assert sorted(_rows(bundle.val)) == sorted((2, -r - 1) for r in range(16))
    assert bundle.tokenizer_path == small / "tokenizer.model"


def test_order_deterministic_for_seed_and_split(make_dataset):
    a = make_dataset("a", 1, n_train=300)
    b = make_dataset("b", 2, n_train=300)
    first = _rows(open_datasets(_cfg((a, 2.0), (b, 1.0), seed=7)).train)
    assert first == _rows(open_datasets(_cfg((a, 2.0), (b, 1.0), seed=7)).train)
    assert first != _rows(open_datasets(_cfg((a, 2.0), (b, 1.0), seed=8)).train)

    # what a worker reads: the stream travels pickled (without its index) and gives the same rows
    ds = open_datasets(_cfg((a, 2.0), (b, 1.0), seed=7)).train
    ds.read(0, 5)
    shipped = pickle.loads(pickle.dumps(ds))
    assert shipped._index is None and shipped._maps == {} and len(pickle.dumps(ds)) < 4096
    assert _rows(shipped) == first
    # any window of the stream is the same rows as the whole read (resume at any sample)
    assert [tuple(r[:2]) for r in shipped.read(17, 53)["input_ids"].tolist()] == first[17:53]


def test_iter_batches_resume_and_drop_last(make_dataset):
    ds = open_datasets(_cfg((make_dataset("a", 1, n_train=100), 1.0))).train
    full = list(iter_batches(ds, 16))
    assert len(full) == 100 // 16  # last 4 rows dropped
    b0 = full[0]["input_ids"]
    assert b0.dtype == torch.long and b0.shape == (16, 9) and set(full[0]) == {"input_ids"}
    resumed = list(iter_batches(ds, 16, skip_batches=3))
    assert len(resumed) == len(full) - 3
    for x, y in zip(resumed, full[3:]):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_labels_column_carried_through(make_dataset):
    ds = open_datasets(_cfg((make_dataset("sft", 1, n_train=32, labels=True), 1.0))).train
    batch = next(iter_batches(ds, 8))
    assert set(batch) == {"input_ids", "labels"}
    assert batch["labels"].shape == batch["input_ids"].shape == (8, 9)
    assert (batch["labels"][:, 0] == -100).all() and torch.equal(batch["labels"][:, 1:], batch["input_ids"][:, 1:])


def test_refuses_other_tokenizer_naming_both_paths(make_dataset, tmp_path):
    other = train_tokenizer(["zzz yyy xxx www " * 20 + str(i) for i in range(50)], tmp_path / "o.model", vocab_size=290)
    a = make_dataset("a", 1, n_train=8)
    b = make_dataset("b", 2, n_train=8, tokenizer=other)
    with pytest.raises(UserError, match="different tokenizers") as err:
        open_datasets(_cfg((a, 1.0), (b, 1.0)))
    assert str(a) in str(err.value) and str(b) in str(err.value) and "\n" not in str(err.value)


def test_refuses_unfinished_and_inconsistent_dirs(make_dataset, tmp_path):
    a = make_dataset("a", 1, n_train=8)
    (a / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        open_datasets(_cfg((a, 1.0)))
    with pytest.raises(UserError, match="not found"):
        open_datasets(_cfg((tmp_path / "nope", 1.0)))
    b = make_dataset("b", 1, n_train=8)
    m = json.loads((b / "manifest.json").read_text())
    m["splits"]["train"]["rows"] = 9
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="manifest.json says 9"):
        open_datasets(_cfg((b, 1.0)))
    c, d = make_dataset("c", 1, n_train=8), make_dataset("d", 1, n_train=8, seq_len=4)
    with pytest.raises(UserError, match="different seq_len"):
        open_datasets(_cfg((c, 1.0), (d, 1.0)))
    e, f = make_dataset("e", 1, n_train=8), make_dataset("f", 1, n_train=8, labels=True)
    with pytest.raises(UserError, match="different columns"):
        open_datasets(_cfg((e, 1.0), (f, 1.0)))


def test_many_small_row_groups_in_one_read(make_dataset):
    """A read touching more than 64 row groups (here 1-row groups, two datasets) reads every row."""
    a = make_dataset("a", 1, n_train=150, rows_per_file=50, row_group_size=1)
    b = make_dataset("b", 2, n_train=90, rows_per_file=30, row_group_size=2)
    rows = _rows(open_datasets(_cfg((a, 1.0), (b, 1.0))).train)
    assert len(rows) == 240
    assert Counter(m for m, _ in rows) == {1: 120, 2: 120}
    assert len({r for m, r in rows if m == 1}) == 120  # a is cut short: 120 distinct rows
    b_counts = Counter(r for m, r in rows if m == 2)  # b is repeated: every row once, 30 of them twice
    assert set(b_counts) == set(range(90)) and sorted(Counter(b_counts.values()).items()) == [(1, 60), (2, 30)]


# ------------------------------------------------------------------------------ order of the rows
def test_blend_index_is_prefix_stable():
    """A longer run's stream begins with a shorter one's: resuming with more steps reads the same rows."""
    for weights in ([3, 1], [0.5, 0.3, 0.2]):
        short, long = blend_index(weights, 777), blend_index(weights, 5000)
        assert (short[0] == long[0][:777]).all() and (short[1] == long[1][:777]).all()


def test_every_epoch_is_a_fresh_global_permutation(make_dataset):
    """Each epoch visits all rows in the seeded permutation of all of them (Megatron's shuffle index),
    across files and row groups, and the next epoch's order is another one."""
    n = 200
    ds = make_dataset("a", 1, n_train=n, rows_per_file=48, row_group_size=16)
    bundle = open_datasets(_cfg((ds, 1.0), seed=5), train_samples=3 * n)
    assert bundle.train_samples == 3 * n and bundle.train_rows == n
    rows = [r for _, r in _rows(bundle.train)]
    epochs = [rows[e * n:(e + 1) * n] for e in range(3)]
    for e, got in enumerate(epochs):
        assert got == np.random.default_rng([5, 0, e]).permutation(n).tolist()
    assert epochs[0] != epochs[1] != epochs[2]
    # a one-pass stream is the first epoch of the longer one
    assert [r for _, r in _rows(open_datasets(_cfg((ds, 1.0), seed=5)).train)] == epochs[0]


def test_a_batch_draws_from_many_documents_as_a_uniform_permutation(make_dataset):
    """Long documents are stored as runs of consecutive rows; a batch must still mix the corpus.

    Rows 10k..10k+9 stand for one 10-row document (20 documents). For a uniform permutation the
    expected number of distinct documents among B rows is D (1 - C(N - L, B) / C(N, B))."""
    from math import comb

    n, length, batch = 200, 10, 16
    docs = n // length
    bundle = open_datasets(_cfg((make_dataset("docs", 1, n_train=n), 1.0), seed=11), train_samples=10 * n)
    seen = [len({int(r[1]) // length for r in b["input_ids"].tolist()}) for b in iter_batches(bundle.train, batch)]
    expected = docs * (1 - comb(n - length, batch) / comb(n, batch))  # 11.0 of 16 rows
    assert abs(np.mean(seen) - expected) < 0.5, (np.mean(seen), expected)
    assert min(seen) >= 6  # a stored-order read would give 2 or 3


def test_row_matrices_follow_their_shards(make_dataset):
    """The memory-mapped row matrix is rebuilt when its shard is rewritten (the stale one removed),
    and a shard with rows of another width is refused naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtnlg_ray.data.row_cache import ensure_matrix, row_matrix

    root = make_dataset("m", 3, n_train=20)
    shard = root / "train" / "part-00000.parquet"
    first = ensure_matrix(shard, "input_ids", 9)
    assert row_matrix(shard, "input_ids", 9)[4].tolist() == [3, 4] + [4] * 7
    pq.write_table(pa.table({"input_ids": pa.array([[7] * 9] * 5, pa.list_(pa.int32()))}), shard)
    second = ensure_matrix(shard, "input_ids", 9)
    assert second != first and not first.exists() and second.exists()
    assert row_matrix(shard, "input_ids", 9).shape == (5, 9)
    pq.write_table(pa.table({"input_ids": pa.array([[7] * 9, [7] * 8], pa.list_(pa.int32()))}), shard)
    with pytest.raises(UserError, match=f"{shard}: rows of column 'input_ids' are not all 9"):
        ensure_matrix(shard, "input_ids", 9)
