"""Blended, seeded, resumable streams of packed token rows: what every training worker reads.

`open_datasets(TrainDataConfig, train_samples)` opens one or more dataset directories written by
`mtnlg preprocess` (or by fine-tuning, which adds a `labels` column) and returns a `BlendedRows`
for train and validation: the rows of the stream by position. Workers read them with
`train/stream.py` (torch tensors); this module imports neither torch nor Ray.

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

Reading in the worker, not through Ray Data
    Sample i of the stream is a pure function of (datasets, weights, seed, i), so a worker needs
    no one to hand it rows: it computes the index and gathers the rows it trains on itself, and a
    resumed or resized run starts at any sample. Ray Data remains what preprocessing runs on
    (data/readers.py, clean.py, shards.py). Streaming training rows through it instead cost, on a
    2-core machine, a streaming executor, a read task's worker process and Ray Data's actors waking
    beside the training threads, and seconds of start-up (docs/benchmarks.md), for reads that take
    microseconds from the page cache.

Datasets must share one tokenizer (manifest `tokenizer_sha256`), one `seq_len` and one set of
columns; a directory without `manifest.json` is an unfinished preprocess and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from mtnlg_ray.config import TrainDataConfig
from mtnlg_ray.data.row_cache import ensure_matrix, row_matrix
from mtnlg_ray.errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DatasetBundle(NamedTuple):
    train: BlendedRows               # blended, order deterministic for cfg.seed
    val: BlendedRows | None          # blended the same way (datasets without val rows left out)
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


class Split(NamedTuple):
    """One split of one dataset: its Parquet shards and where each one's rows start."""

    path: Path
    files: list[str]
    starts: np.ndarray        # (F + 1,) row number of each file's first row; starts[-1] = rows
    columns: tuple[str, ...]
    width: int                # ids per row: seq_len + 1

    @property
    def rows(self) -> int:
        return int(self.starts[-1])


def open_split(root: Path, manifest: dict, split: str) -> Split:
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
    out = Split(root, files, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]), columns or (),
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


class BlendedRows:
    """The first `num_samples` rows of the blend of `splits`, read by position: `len`, `read(lo, hi)`.

    Picklable and small: the trainer hands it to every worker, which builds the index (dataset and
    row of every sample: two int64 arrays of num_samples) on its first read and gathers rows from
    the shards' memory-mapped row matrices (data/row_cache.py), as Megatron-LM's workers read
    their indexed dataset. A read of n rows copies n x width ids; nothing runs beside the reader."""

    def __init__(self, splits: list[Split], weights: list[float], seed: int, num_samples: int):
        self.splits = splits
        self.weights = weights
        self.seed = seed
        self.num_samples = num_samples
        self.columns = splits[0].columns
        self.width = splits[0].width
        self._index: tuple[np.ndarray, np.ndarray] | None = None  # (owner (N,), row (N,)), built on first read
        self._maps: dict[tuple[int, int, str], np.ndarray] = {}  # (dataset, file, column) -> its open row matrix

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict:
        # each process builds its own index and opens its own maps (cheap next to shipping them)
        return {**self.__dict__, "_index": None, "_maps": {}}

    def _matrix(self, d: int, i: int, column: str) -> np.ndarray:
        key = (d, i, column)
        if key not in self._maps:
            self._maps[key] = row_matrix(self.splits[d].files[i], column, self.width)
        return self._maps[key]

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index (N,), row number within that dataset's split (N,)) of every sample."""
        if self._index is None:
            owner, sample = blend_index(self.weights, self.num_samples)
            row = np.empty(self.num_samples, np.int64)
            for d, split in enumerate(self.splits):
                sel = owner == d
                row[sel] = epoch_rows(split.rows, sample[sel], self.seed, d)
            self._index = owner, row
        return self._index

    def read(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Samples lo..hi-1 (clipped to the stream): {column: int32 (n, width)}."""
        owner, row = self.index()
        own, rows = owner[lo:hi], row[lo:hi]
        out = {}
        for c in self.columns:
            ids = np.empty((len(rows), self.width), np.int32)  # (rows, seq_len + 1)
            for d in np.unique(own):
                sel = np.flatnonzero(own == d)
                starts = self.splits[d].starts
                f = np.searchsorted(starts, rows[sel], side="right") - 1
                for i in np.unique(f):
                    at = sel[f == i]
                    ids[at] = self._matrix(int(d), int(i), c)[rows[at] - starts[i]]
            out[c] = ids
        return out


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
    splits = {s: [open_split(r, m, s) for r, m in zip(roots, manifests)] for s in SPLITS}
    for s in SPLITS:
        cols = {x.columns for x in splits[s] if x.rows}
        if len(cols) > 1:
            raise UserError(f"{first} and {roots[-1]}: {s} splits have different columns ({sorted(cols)}); "
                            "pretraining and fine-tuning data cannot be blended")
    for root, x in zip(roots, splits["train"]):
        if not x.rows:
            raise UserError(f"{root}: the train split is empty")

    train_rows = sum(x.rows for x in splits["train"])

    def blended(split: str, samples: int | None = None) -> BlendedRows | None:
        keep = [(x, w) for x, w in zip(splits[split], weights) if x.rows]
        if not keep:
            return None
        for x, _ in keep:  # convert once here, before any worker reads
            for f in x.files:
                for c in x.columns:
                    ensure_matrix(f, c, x.width)
        rows = sum(x.rows for x, _ in keep)
        return BlendedRows([x for x, _ in keep], [w for _, w in keep], cfg.seed, max(rows, samples or 0))

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
