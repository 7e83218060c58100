"""Blended, seeded, resumable streams of packed token rows: what the trainer hands to Ray Train.

`open_datasets(DataConfig)` opens one or more dataset directories written by `mtnlg preprocess`
(or by fine-tuning, which adds a `labels` column) and returns `ray.data.Dataset`s for train and
validation. Workers read their shard with `iter_batches(get_dataset_shard("train"), B, skip)`.

Blending (Megatron-LM's `BlendedDataset` semantics)
    Weights are normalised: w_d = weight_d / sum(weight). One pass over the blended train set
    has N = sum of the train rows of all datasets (`DatasetBundle.train_rows`). Dataset d
    contributes its share of those N samples, s_d ~= w_d * N: a dataset smaller than its share
    is repeated (a new epoch of it starts when it runs out), a larger one is cut short. Samples
    are interleaved, not concatenated: the k-th sample of dataset d sits at time (k + 1/2) / w_d
    and the blend is every sample merged by time (the Webster / Sainte-Lague sequence, ties to the
    lower dataset index), so at every prefix of length n each dataset has been drawn about
    w_d * n times (within about one sample), as with Megatron's greedy error-minimising index.
    With equal weights proportional to the sizes, one pass is exactly one epoch of each.

Order within a dataset (deterministic for `DataConfig.seed`)
    Each epoch of dataset d visits the Parquet row groups of its split in an order drawn from
    `numpy.random.default_rng([seed, d, epoch])`, rows within a row group in stored order
    (preprocess already orders documents by content hash, so neighbouring rows are unrelated).
    Permuting row groups rather than rows keeps every read a contiguous Parquet row group.

Determinism and resume
    The blended set is produced by a custom Ray Data datasource in fixed blocks of
    `ROWS_PER_BLOCK` rows, independent of the cluster size, and `open_datasets` sets
    `DataContext.execution_options.preserve_order = True` in the driver (Ray Train captures the
    driver's DataContext when the trainer is built, and `streaming_split(n, equal=True)` then
    hands the same rows to the same rank in every run with the same worker count). A worker
    resumes a pass by `iter_batches(shard, B, skip_batches=k)`: the first k batches of its shard
    are read and dropped, never yielded.

Datasets must share one tokenizer (manifest `tokenizer_sha256`), one `seq_len` and one set of
columns; a directory without `manifest.json` is an unfinished preprocess and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data.block import BlockMetadata
from ray.data.context import DataContext
from ray.data.datasource import Datasource, ReadTask

from mtnlg_ray.config import DataConfig
from mtnlg_ray.errors import UserError

FORMAT_VERSION = 1
ROWS_PER_BLOCK = 256  # fixed block size: the rows each rank gets do not depend on the cluster
SPLITS = ("train", "val")


class DatasetBundle(NamedTuple):
    train: ray.data.Dataset          # blended, order deterministic for cfg.seed
    val: ray.data.Dataset | None     # blended the same way (datasets without val rows left out)
    tokenizer_path: Path             # the (single, shared) tokenizer.model
    seq_len: int                     # rows hold seq_len + 1 token ids
    vocab_size: int                  # tokenizer vocabulary size
    train_rows: int                  # rows in one pass over the blended train set
    manifests: list[dict]


# ------------------------------------------------------------------------------------- manifests
def load_manifest(path: str | Path) -> dict:
    """Read and check `path/manifest.json`; one-line UserError for anything unfinished or foreign."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: dataset directory not found")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{root}: no manifest.json (an unfinished preprocess, or not a dataset directory)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{mpath}: not valid JSON ({err})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{mpath}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("tokenizer_sha256", "seq_len", "vocab_size", "splits"):
        if key not in manifest:
            raise UserError(f"{mpath}: missing key {key!r}")
    if not (root / "tokenizer.model").is_file():
        raise UserError(f"{root}: tokenizer.model is missing")
    return manifest


class _Split(NamedTuple):
    """One split of one dataset: its Parquet row groups, as (file, row group index, rows) per group."""

    path: Path
    files: list[str]
    group_file: np.ndarray    # (G,) index into files
    group_index: np.ndarray   # (G,) row-group number inside its file
    group_rows: np.ndarray    # (G,) rows per group
    columns: tuple[str, ...]

    @property
    def rows(self) -> int:
        return int(self.group_rows.sum())


def _open_split(root: Path, manifest: dict, split: str) -> _Split:
    files = sorted(str(p) for p in (root / split).glob("*.parquet"))
    g_file, g_index, g_rows, columns = [], [], [], None
    for i, f in enumerate(files):
        meta = pq.ParquetFile(f).metadata
        names = tuple(meta.schema.to_arrow_schema().names)
        if columns is None:
            columns = names
        elif names != columns:
            raise UserError(f"{f}: columns {list(names)} differ from {list(columns)} in the same split")
        for g in range(meta.num_row_groups):
            g_file.append(i)
            g_index.append(g)
            g_rows.append(meta.row_group(g).num_rows)
    out = _Split(root, files, np.array(g_file, np.int64), np.array(g_index, np.int64),
                 np.array(g_rows, np.int64), columns or ())
    expected = manifest["splits"].get(split, {}).get("rows", 0)
    if out.rows != expected:
        raise UserError(f"{root / split}: shards hold {out.rows} rows but manifest.json says {expected}")
    if out.rows and "input_ids" not in out.columns:
        raise UserError(f"{root / split}: shards have no input_ids column (columns: {list(out.columns)})")
    return out


# --------------------------------------------------------------------------------------- blending
def blend_index(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-style blend of `num_samples`: (dataset index (N,), sample index within it (N,)).

    The k-th sample of dataset d is placed at time (k + 1/2) / w_d; all samples merged by time.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, owner, rank = [], [], []
    for d, wd in enumerate(w):
        k = np.arange(int(np.ceil(wd * num_samples)) + 1, dtype=np.int64)
        times.append((k + 0.5) / wd)
        owner.append(np.full(len(k), d, np.int64))
        rank.append(k)
    times, owner, rank = np.concatenate(times), np.concatenate(owner), np.concatenate(rank)
    order = np.lexsort((owner, times))[:num_samples]  # by time, ties to the lower dataset index
    return owner[order], rank[order]


def _sample_rows(split: _Split, samples: np.ndarray, seed: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample numbers (any, repeating epochs) -> (row group id, row offset inside the group)."""
    n = split.rows
    epoch, j = samples // n, samples % n
    group = np.empty(len(samples), np.int64)
    offset = np.empty(len(samples), np.int64)
    for e in np.unique(epoch):
        order = np.random.default_rng([seed, d, int(e)]).permutation(len(split.group_rows))
        starts = np.concatenate([[0], np.cumsum(split.group_rows[order])])
        sel = epoch == e
        pos = np.searchsorted(starts, j[sel], side="right") - 1
        group[sel] = order[pos]
        offset[sel] = j[sel] - starts[pos]
    return group, offset


class BlendedDatasource(Datasource):
    """Ray Data source of the blended rows, in fixed blocks of ROWS_PER_BLOCK, in blend order."""

    def __init__(self, splits: list[_Split], weights: list[float], seed: int):
        super().__init__()
        self.splits = splits
        self.columns = splits[0].columns
        self.num_rows = sum(s.rows for s in splits)
        owner, sample = blend_index(weights, self.num_rows)
        self.owner = owner
        self.group = np.empty(self.num_rows, np.int64)
        self.offset = np.empty(self.num_rows, np.int64)
        for d, split in enumerate(splits):
            sel = owner == d
            self.group[sel], self.offset[sel] = _sample_rows(split, sample[sel], seed, d)
        self.row_bytes = 4 * _row_width(splits[0])  # int32 ids per row, all columns
        self.schema = pq.read_schema(splits[0].files[0])

    def estimate_inmemory_data_size(self) -> int:
        return self.num_rows * self.row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        blocks = [(lo, min(lo + ROWS_PER_BLOCK, self.num_rows)) for lo in range(0, self.num_rows, ROWS_PER_BLOCK)]
        per_task = max(1, -(-len(blocks) // max(1, parallelism)))
        tasks = []
        for t in range(0, len(blocks), per_task):
            mine = blocks[t:t + per_task]
            lo, hi = mine[0][0], mine[-1][1]
            # each task carries only its own slice of the index
            sources = [(str(s.path), s.files, s.group_file, s.group_index) for s in self.splits]
            args = (sources, self.columns, mine, lo, self.owner[lo:hi], self.group[lo:hi], self.offset[lo:hi])
            meta = BlockMetadata(num_rows=hi - lo, size_bytes=(hi - lo) * self.row_bytes, input_files=None,
                                 exec_stats=None)
            tasks.append(ReadTask(lambda a=args: _read_blocks(*a), meta, schema=self.schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _row_width(split: _Split) -> int:
    """Token ids per row (all columns), from the first row of the split."""
    table = pq.ParquetFile(split.files[0]).read_row_group(0, columns=list(split.columns)).slice(0, 1)
    return sum(len(table[c][0]) for c in split.columns)


def _read_blocks(sources, columns, blocks, base, owner, group, offset) -> Iterator[pa.Table]:
    """Runs in a Ray task: gather the rows of each block from their Parquet row groups.

    A block's row groups are held together until the block is built (a block of ROWS_PER_BLOCK
    rows touches at most that many groups, however small they are); only the previous block's
    groups are kept for the next one (consecutive blocks share the groups at their boundary).
    """
    previous: dict[tuple[int, int], pa.Table] = {}
    for lo, hi in blocks:
        tables: dict[tuple[int, int], pa.Table] = {}  # this block's groups, in first-use order
        parts = []
        for i in range(lo - base, hi - base):
            key = (int(owner[i]), int(group[i]))
            if key not in tables:
                tables[key] = previous[key] if key in previous else _read_group(sources, columns, *key)
            parts.append((key, int(offset[i])))
        keys = list(tables)
        stacked = pa.concat_tables([tables[k] for k in keys]).combine_chunks()
        starts = np.cumsum([0] + [tables[k].num_rows for k in keys])
        where = {k: starts[j] for j, k in enumerate(keys)}
        previous = tables
        yield stacked.take(pa.array([where[k] + off for k, off in parts], pa.int64()))


def _read_group(sources, columns, d: int, g: int) -> pa.Table:
    """Row group `g` (numbered over the split's files) of dataset `d`."""
    _, files, g_file, g_index = sources[d]
    return pq.ParquetFile(files[g_file[g]]).read_row_group(int(g_index[g]), columns=list(columns))


# ------------------------------------------------------------------------------------------ public
def open_datasets(cfg: DataConfig) -> DatasetBundle:
    """Open and blend the dataset directories of `cfg` (see the module docstring for the semantics)."""
    if not cfg.datasets:
        raise UserError("data.datasets: no dataset directories given")
    roots = [Path(spec.path) for spec in cfg.datasets]
    manifests = [load_manifest(r) for r in roots]
    first, m0 = roots[0], manifests[0]
    for root, m in zip(roots[1:], manifests[1:]):
        if m["tokenizer_sha256"] != m0["tokenizer_sha256"]:
            raise UserError(f"{first} and {root} use different tokenizers (sha256 {m0['tokenizer_sha256'][:12]} vs "
                            f"{m['tokenizer_sha256'][:12]}); blend only datasets made with one tokenizer.model")
        if m["seq_len"] != m0["seq_len"]:
            raise UserError(f"{first} and {root} have different seq_len ({m0['seq_len']} vs {m['seq_len']})")
    weights = [spec.weight for spec in cfg.datasets]
    splits = {s: [_open_split(r, m, s) for r, m in zip(roots, manifests)] for s in SPLITS}
    for s in SPLITS:
        cols = {x.columns for x in splits[s] if x.rows}
        if len(cols) > 1:
            raise UserError(f"{first} and {roots[-1]}: {s} splits have different columns ({sorted(cols)}); "
                            "pretraining and fine-tuning data cannot be blended")
    for root, x in zip(roots, splits["train"]):
        if not x.rows:
            raise UserError(f"{root}: the train split is empty")

    DataContext.get_current().execution_options.preserve_order = True

    def blended(split: str) -> ray.data.Dataset | None:
        keep = [(x, w) for x, w in zip(splits[split], weights) if x.rows]
        if not keep:
            return None
        source = BlendedDatasource([x for x, _ in keep], [w for _, w in keep], cfg.seed)
        ds = ray.data.read_datasource(source)
        ds.context.execution_options.preserve_order = True
        return ds

    return DatasetBundle(
        train=blended("train"),
        val=blended("val"),
        tokenizer_path=first / "tokenizer.model",
        seq_len=int(m0["seq_len"]),
        vocab_size=int(m0["vocab_size"]),
        train_rows=sum(x.rows for x in splits["train"]),
        manifests=manifests,
    )


def iter_batches(shard, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {"input_ids": LongTensor (B, seq_len + 1)} (+ "labels", -100 = masked, when present).

    `shard`: a worker's `ray.train.get_dataset_shard(name)` (a DataIterator) or a ray.data.Dataset.
    The last incomplete batch is dropped. The first `skip_batches` batches are read and discarded
    (resume inside a pass). Batches arrive as Arrow tables; list<int32> columns are reshaped, not
    copied row by row.
    """
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0 (got {skip_batches})")
    batches = shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True, prefetch_batches=2)
    for i, table in enumerate(batches):
        if i < skip_batches:
            continue
        yield {name: _to_long(table[name]) for name in ("input_ids", "labels") if name in table.column_names}


def _to_long(column: pa.ChunkedArray) -> torch.Tensor:
    """A list<int32> column of equal-length rows -> LongTensor (rows, length)."""
    arr = column.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.astype(np.int64).reshape(len(arr), -1))
