"""Blended, seeded, resumable streams of packed token rows: what the trainer hands to Ray Train.

`open_datasets(TrainDataConfig, train_samples)` opens one or more dataset directories written by
`mtnlg preprocess` (or by fine-tuning, which adds a `labels` column) and returns `ray.data.Dataset`s
for train and validation. Workers read their shard with `train/stream.py` (torch tensors); this
module imports no torch, so the Ray Data tasks that read blocks start without it.

Blending (Megatron-LM's `BlendedDataset` semantics)
    Weights are normalised: w_d = weight_d / sum(weight). The train stream is the first
    `train_samples` samples (default: one pass, N = the train rows of all datasets together,
    `DatasetBundle.train_rows`) of an endless blend in which dataset d draws w_d of the samples:
    a dataset is repeated as often as its share needs (a new epoch of it starts when it runs out).
    Samples are interleaved, not concatenated: the k-th sample of dataset d sits at time
    (k + 1/2) / w_d and the blend is every sample merged by time (the Webster / Sainte-Lague
    sequence, ties to the lower dataset index), so at every prefix of length n each dataset has
    been drawn about w_d * n times (within about one sample), as with Megatron's greedy
    error-minimising index. The stream of a longer run begins with the stream of a shorter one,
    so a run resumed with more steps reads the same rows up to where it stopped.

Order within a dataset (deterministic for `TrainDataConfig.seed`)
    Epoch e of dataset d visits all of its rows in a permutation drawn from
    `numpy.random.default_rng([seed, d, e])` (Megatron's shuffle index over sample indices): the
    rows of a batch come from all over the corpus, and every epoch has a new order. Rows are read
    by random access into memory-mapped row matrices derived from the shards (data/row_cache.py).

Determinism and resume
    The blended set is produced by a custom Ray Data datasource in fixed blocks of
    `ROWS_PER_BLOCK` rows, independent of the cluster size, and `open_datasets` sets
    `DataContext.execution_options.preserve_order = True` in the driver (Ray Train captures the
    driver's DataContext when the trainer is built, and `streaming_split(n, equal=True)` then
    hands the same rows to the same rank in every run with the same worker count). A worker
    resumes by skipping the rows it has consumed (train/stream.py).

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
from ray.data.block import BlockMetadata
from ray.data.context import DataContext
from ray.data.datasource import Datasource, ReadTask

from mtnlg_ray.config import TrainDataConfig
from mtnlg_ray.data.row_cache import ensure_matrix, row_matrix
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
    train_rows: int                  # N: rows of all train splits together (one pass)
    train_samples: int               # rows in the train stream (>= N: whole run, epochs repeat)
    manifests: list[dict]
    config: TrainDataConfig          # what was opened (the trainer reopens it for a longer stream)


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
    """One split of one dataset: its Parquet shards and where each one's rows start."""

    path: Path
    files: list[str]
    starts: np.ndarray        # (F + 1,) row number of each file's first row; starts[-1] = rows
    columns: tuple[str, ...]
    width: int                # ids per row: seq_len + 1

    @property
    def rows(self) -> int:
        return int(self.starts[-1])


def _open_split(root: Path, manifest: dict, split: str) -> _Split:
    files = sorted(str(p) for p in (root / split).glob("*.parquet"))
    counts, columns = [], None
    for f in files:
        meta = pq.ParquetFile(f).metadata
        names = tuple(meta.schema.to_arrow_schema().names)
        if columns is None:
            columns = names
        elif names != columns:
            raise UserError(f"{f}: columns {list(names)} differ from {list(columns)} in the same split")
        counts.append(meta.num_rows)
    out = _Split(root, files, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]), columns or (),
                 int(manifest["seq_len"]) + 1)
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
    The result for n samples is the first n of the result for any m > n (a longer run extends
    the stream of a shorter one).
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, owner, rank = [], [], []
    for d, wd in enumerate(w):
        k = np.arange(int(np.ceil(wd * num_samples)) + 2, dtype=np.int64)  # enough for any prefix of n
        times.append((k + 0.5) / wd)
        owner.append(np.full(len(k), d, np.int64))
        rank.append(k)
    times, owner, rank = np.concatenate(times), np.concatenate(owner), np.concatenate(rank)
    order = np.lexsort((owner, times))[:num_samples]  # by time, ties to the lower dataset index
    return owner[order], rank[order]


def epoch_rows(rows: int, samples: np.ndarray, seed: int, d: int) -> np.ndarray:
    """Sample numbers of dataset d (any count: epochs repeat) -> its row numbers (same shape).

    Epoch e = samples // rows visits every row once, in the permutation drawn from
    `default_rng([seed, d, e])` (Megatron's shuffle index): a fresh order every epoch."""
    epoch, j = np.divmod(samples, rows)
    out = np.empty(len(samples), np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = np.random.default_rng([seed, d, int(e)]).permutation(rows)[j[sel]]
    return out


class BlendedDatasource(Datasource):
    """Ray Data source of the first `num_samples` blended rows, in fixed blocks of ROWS_PER_BLOCK."""

    def __init__(self, splits: list[_Split], weights: list[float], seed: int, num_samples: int):
        super().__init__()
        self.splits = splits
        self.columns = splits[0].columns
        self.width = splits[0].width
        self.num_rows = num_samples
        self.owner, sample = blend_index(weights, num_samples)
        self.row = np.empty(num_samples, np.int64)
        for d, split in enumerate(splits):
            sel = self.owner == d
            self.row[sel] = epoch_rows(split.rows, sample[sel], seed, d)
        for split in splits:  # convert once here, not in every read task at once
            for f in split.files:
                for c in self.columns:
                    ensure_matrix(f, c, self.width)
        self.schema = pa.schema([(c, pa.list_(pa.int32())) for c in self.columns])

    def estimate_inmemory_data_size(self) -> int:
        return self.num_rows * 4 * self.width * len(self.columns)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        blocks = [(lo, min(lo + ROWS_PER_BLOCK, self.num_rows)) for lo in range(0, self.num_rows, ROWS_PER_BLOCK)]
        per_task = max(1, -(-len(blocks) // max(1, parallelism)))
        sources = [(s.files, s.starts) for s in self.splits]
        tasks = []
        for t in range(0, len(blocks), per_task):
            mine = blocks[t:t + per_task]
            lo, hi = mine[0][0], mine[-1][1]
            # each task carries only its own slice of the index
            args = (sources, self.columns, self.width, mine, lo, self.owner[lo:hi], self.row[lo:hi])
            meta = BlockMetadata(num_rows=hi - lo, size_bytes=(hi - lo) * 4 * self.width * len(self.columns),
                                 input_files=None, exec_stats=None)
            tasks.append(ReadTask(lambda a=args: _read_blocks(*a), meta, schema=self.schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _read_blocks(sources, columns, width, blocks, base, owner, row) -> Iterator[pa.Table]:
    """Runs in a Ray task: gather each block's rows from the shards' memory-mapped row matrices."""
    for lo, hi in blocks:
        own, rows = owner[lo - base:hi - base], row[lo - base:hi - base]
        out = {}
        for c in columns:
            ids = np.empty((hi - lo, width), np.int32)  # (rows of the block, seq_len + 1)
            for d in np.unique(own):
                sel = np.flatnonzero(own == d)
                files, starts = sources[d]
                f = np.searchsorted(starts, rows[sel], side="right") - 1
                for i in np.unique(f):
                    at = sel[f == i]
                    ids[at] = row_matrix(files[i], c, width)[rows[at] - starts[i]]
            offsets = pa.array(np.arange(0, (hi - lo + 1) * width, width, dtype=np.int32))
            out[c] = pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1)))
        yield pa.table(out)


# ------------------------------------------------------------------------------------------ public
def open_datasets(cfg: TrainDataConfig, train_samples: int | None = None) -> DatasetBundle:
    """Open and blend the dataset directories of `cfg` (see the module docstring for the semantics).
    `train_samples`: rows the train stream must hold (a run's planned samples); default one pass."""
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

    train_rows = sum(x.rows for x in splits["train"])

    def blended(split: str, samples: int | None = None) -> ray.data.Dataset | None:
        keep = [(x, w) for x, w in zip(splits[split], weights) if x.rows]
        if not keep:
            return None
        rows = sum(x.rows for x, _ in keep)
        source = BlendedDatasource([x for x, _ in keep], [w for _, w in keep], cfg.seed, max(rows, samples or 0))
        ds = ray.data.read_datasource(source)
        ds.context.execution_options.preserve_order = True
        # Read by the training loop, whose step lines are the progress: a bar per worker would
        # redraw over them, and its updates cost the worker CPU time every step.
        ds.context.enable_progress_bars = False
        return ds

    return DatasetBundle(
        train=blended("train", train_samples),
        val=blended("val"),
        tokenizer_path=first / "tokenizer.model",
        seq_len=int(m0["seq_len"]),
        vocab_size=int(m0["vocab_size"]),
        train_rows=train_rows,
        train_samples=max(train_rows, train_samples or 0),
        manifests=manifests,
        config=cfg,
    )
