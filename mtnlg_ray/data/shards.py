"""Dataset directories: tokenize and pack a cleaned corpus into Parquet shards (+ manifest.json).

Layout (written through `fileio.atomic_dir`: a failed run leaves nothing that looks finished)
    tokenizer.model          the SentencePiece model every row was encoded with
    manifest.json            see below
    train/part-*.parquet     column input_ids: list<int32>, every row seq_len + 1 ids
    val/part-*.parquet       (fine-tuning directories add labels: list<int32>, -100 = masked)

manifest.json
    format_version     1
    tokenizer_sha256   sha256 of tokenizer.model (datasets are blended only when these match)
    vocab_size         tokenizer vocabulary size
    eod_id             end-of-document id appended after every document
    seq_len            rows hold seq_len + 1 token ids (inputs = row[:-1], targets = row[1:])
    columns            column names of the shards
    splits             {"train": {...}, "val": {...}}, each:
                         shards     [{"path": "train/part-00000.parquet", "rows": R}, ...]
                         rows       rows in the split
                         tokens     token ids stored (rows * (seq_len + 1))
                         (preprocess adds: documents, doc_tokens (ids incl. EOD fed to the packer),
                          dropped_tail_tokens (the last < seq_len + 1 ids that fill no row))
    cleaning           the cleaning report (preprocess only): documents read / kept / dropped per reason
    config             the job that wrote it (model_dump), for provenance
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import sentencepiece as spm
from ray.data.context import DataContext, ShuffleStrategy
from ray.data.expressions import col
from tqdm import tqdm

from mtnlg_ray import console
from mtnlg_ray.config import PreprocessJob
from mtnlg_ray.data.clean import clean_corpus, format_report
from mtnlg_ray.data.readers import corpus_files, read_corpus
from mtnlg_ray.data.tokenizer import Tokenizer, cuts_are_exact, encode_documents, train_tokenizer
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import atomic_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_GROUP = 128  # rows per Parquet row group: the unit data/dataset.py shuffles and reads
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
OUT_SCHEMA = pa.schema([("split", pa.string()), ("shard", pa.binary()), ("rows", pa.int64()),
                        ("tail", pa.list_(pa.int32())), ("docs", pa.int64()), ("doc_tokens", pa.int64())])


def write_manifest(root: str | Path, tokenizer_sha256: str, vocab_size: int, eod_id: int, seq_len: int,
                   extra_splits: dict | None = None, **fields) -> dict:
    """Describe the shards under `root/{train,val}` in `root/manifest.json` and return the manifest.

    `extra_splits` adds keys per split (e.g. documents); other keyword `fields` (cleaning, config)
    go to the top level. Write it last: its presence marks the directory as finished.
    """
    root = Path(root)
    splits, columns = {}, None
    for split in ("train", "val"):
        shards = []
        for f in sorted((root / split).glob("*.parquet")):
            meta = pq.ParquetFile(f).metadata
            columns = columns or meta.schema.to_arrow_schema().names
            shards.append({"path": f"{split}/{f.name}", "rows": meta.num_rows})
        rows = sum(s["rows"] for s in shards)
        splits[split] = {"shards": shards, "rows": rows, "tokens": rows * (seq_len + 1),
                         **(extra_splits or {}).get(split, {})}
    manifest = {"format_version": FORMAT_VERSION, "tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size,
                "eod_id": eod_id, "seq_len": seq_len, "columns": list(columns or ["input_ids"]), "splits": splits,
                **fields}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


# -------------------------------------------------------------------------------- tokenize + pack
class TokenizePack:
    """A batch of documents -> finished shard files (the tokenizer is loaded once, at construction).

    `model`: the SentencePiece model's bytes (workers need no filesystem shared with the driver).
    Per split present in the batch: each document is encoded and followed by EOD, the ids are
    concatenated and cut into full rows of seq_len + 1, and the rows are encoded here as Parquet
    files (at most `rows_per_shard` rows each, row groups of ROW_GROUP): the driver only writes
    the bytes to disk. Output (OUT_SCHEMA), one row per file:
        split       train / val
        shard       Parquet file bytes (empty when the batch filled no row)
        rows        rows in `shard`
        tail        the batch's last < seq_len + 1 ids (last row of the split only; the driver packs tails)
        docs, doc_tokens   documents and ids incl. EOD of the batch (last row of the split only)
    `num_workers`: how many TokenizePacks run at a time; each encodes on `encode_threads(num_workers)`.
    """

    def __init__(self, model: bytes, seq_len: int, rows_per_shard: int = 4096, num_workers: int = 1):
        self.sp, self.exact_cuts = spm.SentencePieceProcessor(model_proto=model), cuts_are_exact(model)
        self.row, self.rows_per_shard, self.num_threads = seq_len + 1, rows_per_shard, encode_threads(num_workers)

    def __call__(self, batch: pa.Table) -> pa.Table:
        splits = batch["split"].to_pylist() if "split" in batch.column_names else ["train"] * batch.num_rows
        # int32 arrays, EOD appended: no Python int per token; long documents in exact segments
        ids = encode_documents(self.sp, batch["text"].to_pylist(), self.exact_cuts, self.num_threads)
        if not ids:
            return OUT_SCHEMA.empty_table()
        return pa.concat_tables([self._pack([x for x, s in zip(ids, splits) if s == name], name)
                                 for name in sorted(set(splits))])

    def _pack(self, ids: list[np.ndarray], split: str) -> pa.Table:
        flat = np.concatenate(ids).astype(np.int32, copy=False)
        n_full = len(flat) // self.row
        shards, rows = [], []
        for lo in range(0, n_full, self.rows_per_shard):
            hi = min(n_full, lo + self.rows_per_shard)
            offsets = pa.array(np.arange(hi - lo + 1, dtype=np.int32) * self.row)
            table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, flat[lo * self.row:hi * self.row])},
                             schema=SCHEMA)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, row_group_size=ROW_GROUP)
            shards.append(sink.getvalue().to_pybytes())
            rows.append(hi - lo)
        shards, rows = shards or [b""], rows or [0]
        last = [0] * (len(rows) - 1)  # the batch's counts and tail go on its last row
        return pa.table({"split": [split] * len(rows), "shard": shards, "rows": rows,
                         "tail": [[]] * (len(rows) - 1) + [flat[n_full * self.row:]],
                         "docs": last + [len(ids)], "doc_tokens": last + [len(flat)]}, schema=OUT_SCHEMA)


def encode_threads(num_workers: int) -> int:
    """SentencePiece threads per tokenizer worker: twice its share of this node's cores (2 with 2
    workers on 2 cores), so a worker running alone keeps every core busy (Ray Data runs one task at
    a time for the first second of every execution: its resource limits are zero until the
    autoscaling coordinator's first answer, polled once a second; and the last batch runs alone);
    when all run, the OS shares the cores (measured: faster than 1 thread each)."""
    cores = len(os.sched_getaffinity(0))
    return min(cores, max(1, -(-2 * cores // num_workers)))


_PACKER: dict[tuple, TokenizePack] = {}  # per worker process: the TokenizePack of the latest job


def tokenize_pack(batch: pa.Table, model: bytes, model_sha256: str, seq_len: int, rows_per_shard: int,
                  num_workers: int) -> pa.Table:
    """Ray Data task UDF: TokenizePack, built (tokenizer loaded) once per worker process and job."""
    key = (model_sha256, seq_len, rows_per_shard, num_workers)
    if key not in _PACKER:
        _PACKER.clear()
        _PACKER[key] = TokenizePack(model, seq_len, rows_per_shard, num_workers)
    return _PACKER[key](batch)


class ShardWriter:
    """One split's `dir/part-NNNNN.parquet` files, numbered in the order they arrive.

    `write` streams rows into shards of `rows_per_shard` rows (row groups of ROW_GROUP); `put_file`
    stores a finished shard (TokenizePack's bytes) under the next number; `add_tail` packs batch
    tails (ids that fill no row of their own) as they arrive.
    """

    def __init__(self, directory: Path, rows_per_shard: int, row_len: int):
        self.dir, self.rows_per_shard, self.row_len = directory, rows_per_shard, row_len
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer, self.in_shard, self.shards = None, 0, 0
        self.carry = np.array([], np.int32)  # tail ids not yet a full row
        self.docs = self.doc_tokens = 0

    def _next_path(self) -> Path:
        self.shards += 1
        return self.dir / f"part-{self.shards - 1:05d}.parquet"

    def write(self, rows: pa.ListArray) -> int:
        """Write full rows; returns how many."""
        n = len(rows)
        while len(rows):
            if self.writer is None:
                self.writer = pq.ParquetWriter(self._next_path(), SCHEMA)
            take = min(len(rows), self.rows_per_shard - self.in_shard)
            self.writer.write_table(pa.table({"input_ids": rows.slice(0, take)}, schema=SCHEMA), ROW_GROUP)
            rows, self.in_shard = rows.slice(take), self.in_shard + take
            if self.in_shard == self.rows_per_shard:
                self.close()
        return n

    def put_file(self, data: pa.Buffer) -> None:
        """Store a finished Parquet file (bytes) as the next shard."""
        with open(self._next_path(), "wb") as f:
            f.write(memoryview(data))

    def add_tail(self, ids: np.ndarray) -> int:
        """Append batch-tail ids; their full rows are written a whole shard at a time (the rest by
        `finish`), so tails never make small shards. Returns rows written."""
        self.carry = np.concatenate([self.carry, ids.astype(np.int32)])
        return self._write_carry(whole_shards=True)

    def _write_carry(self, whole_shards: bool) -> int:
        n = len(self.carry) // self.row_len
        if whole_shards:
            n -= n % self.rows_per_shard
        if not n:
            return 0
        rows = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * self.row_len),
                                        pa.array(self.carry[: n * self.row_len]))
        self.carry = self.carry[n * self.row_len:]
        return self.write(rows)

    def finish(self) -> int:
        """Write the full rows still carried, close the last shard; returns rows written."""
        n = self._write_carry(whole_shards=False)
        self.close()
        return n

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer, self.in_shard = None, 0


def pack(docs: ray.data.Dataset, tokenizer_path: str | Path, seq_len: int, out_root: Path,
         rows_per_shard: int = 4096, num_workers: int = 2, batch_docs: int = 256,
         splits: tuple[str, ...] = ("train", "val"), compute: str = "tasks") -> dict[str, dict]:
    """Tokenize and pack `docs` into `out_root/<split>/part-*.parquet`; counts per split.

    `docs` has a `text` column and a `split` column (absent: all "train"), in blocks of any size:
    it is cut into blocks of `batch_docs` documents, each one TokenizePack call, at most
    `num_workers` at a time. `compute`:
        tasks    Ray Data tasks (`tokenize_pack`); the tokenizer is loaded once per worker process
                 (`_PACKER`), and Ray keeps those processes between stages and jobs (the default)
        actors   an actor pool of `num_workers` TokenizePack actors, the tokenizer loaded once per
                 actor; every actor is a fresh process that imports Ray Data again before its first
                 token (measured on 2 cores: 12 MB in 4.1 s against 2.0 s with tasks), so this
                 pays off only when that start-up is small next to the corpus
    The workers encode, pack and write Parquet into memory; the files reach the driver in dataset
    order (preserve_order) and are written as they come, so memory stays flat however large the
    corpus, and the shards (names included) are the same in every run. A shard holds the rows of
    one batch (at most `rows_per_shard`); the driver packs the batch tails into shards of their
    own (`rows_per_shard` rows, the last one fewer). The last < seq_len + 1 ids of a split fill no
    row and are dropped (`dropped_tail_tokens`): `rows * (seq_len + 1) + dropped_tail_tokens = doc_tokens`.
    """
    # The tokenizer workers must leave one CPU to the tasks that feed them: on a 2-CPU Ray, two 1-CPU
    # tokenizer workers starve those tasks and the pipeline stalls with no error.
    task_cpus = max(0.25, min(1.0, (ray.cluster_resources().get("CPU", 1.0) - 1.0) / num_workers))
    model = Path(tokenizer_path).read_bytes()
    # (no select_columns: it needs the schema, which costs a lazy dataset an extra execution)
    batches = docs.repartition(target_num_rows_per_block=batch_docs, strict=True)
    if compute == "actors":
        udf = dict(fn=TokenizePack, fn_constructor_args=(model, seq_len, rows_per_shard, num_workers),
                   compute=ray.data.ActorPoolStrategy(size=num_workers))
    elif compute == "tasks":
        udf = dict(fn=tokenize_pack, compute=ray.data.TaskPoolStrategy(size=num_workers),
                   fn_args=(model, hashlib.sha256(model).hexdigest(), seq_len, rows_per_shard, num_workers))
    else:
        raise UserError(f"pack.compute: {compute!r} is neither 'tasks' nor 'actors'")
    packed = batches.map_batches(**udf, batch_size=batch_docs, batch_format="pyarrow", num_cpus=task_cpus)
    packed.context.execution_options.preserve_order = True  # shards in document order, the same every run
    writers = {name: ShardWriter(out_root / name, rows_per_shard, seq_len + 1) for name in splits}
    # a bar while a terminal is attached (disable=None), none with -q
    quiet = not log.isEnabledFor(logging.INFO)
    with tqdm(desc="tokenize + pack", unit=" rows", mininterval=2, disable=True if quiet else None) as bar:
        for table in packed.iter_batches(batch_format="pyarrow", batch_size=None):
            for split, shard, rows, tail, n_docs, n_tokens in zip(*(table[c] for c in OUT_SCHEMA.names)):
                w = writers[split.as_py()]
                if rows.as_py():
                    w.put_file(shard.as_buffer())
                n = rows.as_py() + w.add_tail(tail.values.to_numpy(zero_copy_only=False))
                w.docs += n_docs.as_py()
                w.doc_tokens += n_tokens.as_py()
                bar.update(n)
        for w in writers.values():
            bar.update(w.finish())
    return {name: {"documents": w.docs, "doc_tokens": w.doc_tokens, "dropped_tail_tokens": len(w.carry)}
            for name, w in writers.items()}


# ------------------------------------------------------------------------------------------- job
def _ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS", "local")
        ray.init(address=address, log_to_driver=False, **console.ray_init_args(address))
    console.quiet_ray_data()


def _tokenizer(job: PreprocessJob, docs: ray.data.Dataset, out: Path):
    """Load `tokenizer.path` (checked against tokenizer.vocab_size when set) or train on a sample."""
    cfg = job.tokenizer
    if cfg.path:
        tok = Tokenizer(cfg.path)
        if "vocab_size" in cfg.model_fields_set and tok.vocab_size != cfg.vocab_size:
            raise UserError(f"tokenizer.vocab_size={cfg.vocab_size} but {cfg.path} has {tok.vocab_size} pieces")
        if tok.eod_id < 0:
            raise UserError(f"{cfg.path}: tokenizer has no end-of-document (eos) piece")
        (out / "tokenizer.model").write_bytes(Path(cfg.path).read_bytes())
        return Tokenizer(out / "tokenizer.model")
    # train documents come first, in content-hash order: the first sample_docs are a uniform, stable sample
    sample = [r["text"] for r in docs.filter(expr=col("split") == "train").select_columns(["text"])
              .limit(cfg.sample_docs).take_all()]
    size = "one piece per character" if cfg.model_type == "char" else f"vocab {cfg.vocab_size}"
    log.info("[preprocess] training a %s tokenizer (%s) on %d documents", cfg.model_type, size, len(sample))
    tok = train_tokenizer(sample, out / "tokenizer.model", cfg.vocab_size, cfg.model_type, cfg.byte_fallback,
                          cfg.max_sentence_length, cfg.character_coverage)
    log.info("[preprocess] trained a %s tokenizer of %d pieces", cfg.model_type, tok.vocab_size)
    if "vocab_size" in cfg.model_fields_set and tok.vocab_size != cfg.vocab_size:  # only a char model differs
        log.warning("tokenizer.vocab_size=%d ignored: a %s model has one piece per character kept by "
                    "tokenizer.character_coverage, plus specials and byte pieces: %d pieces",
                    cfg.vocab_size, cfg.model_type, tok.vocab_size)
    return tok


def _label_split(batch: pa.Table, cut: int | None = None, name: str | None = None) -> pa.Table:
    """Add the `split` column: `name`, or val when split_key < cut (stable across runs) else train."""
    if name is None:
        below = pc.less(batch["split_key"], pa.scalar(cut, pa.int64())).to_numpy(zero_copy_only=False)
        labels = np.where(below, "val", "train").tolist()
    else:
        labels = [name] * batch.num_rows
    return batch.append_column("split", pa.array(labels, pa.string()))


def run_preprocess(job: PreprocessJob) -> Path:
    """read -> clean -> tokenizer -> tokenize + pack (Ray Data) -> Parquet shards + manifest.json."""
    for corpus in (job.corpus, job.val_corpus):  # bad paths fail before any work starts
        if corpus is not None:
            corpus_files(corpus)
    if job.tokenizer.path and not Path(job.tokenizer.path).is_file():
        raise UserError(f"tokenizer.path: {job.tokenizer.path}: no such file")
    _ensure_ray()
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic shards
    if "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY" not in os.environ:
        # The dedup group-by and the hash-order sort as plain tasks. Ray's default shuffle first
        # starts aggregator actors, a process each: about 15 s per shuffle on a 2-core machine before
        # a row moves, most of a small corpus' preprocessing. For corpora of thousands of blocks on
        # a cluster, RAY_DATA_DEFAULT_SHUFFLE_STRATEGY=shuffle_v2 brings Ray's default back.
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    out = Path(job.output_dir)
    log.info("[preprocess] reading and cleaning the %s corpus", job.corpus.kind)
    kept, report = clean_corpus(read_corpus(job.corpus), job.clean, "corpus")
    log.info("[preprocess] %s", format_report(report, "corpus"))
    if job.val_corpus is None:  # a document goes to val when its split hash falls below val_fraction
        cut = int(job.pack.val_fraction * 2**64) - 2**63  # split_key is a uniform int64
        docs = kept.map_batches(_label_split, batch_format="pyarrow", fn_kwargs={"cut": cut})
    else:
        val_docs, val_report = clean_corpus(read_corpus(job.val_corpus), job.clean, "val_corpus")
        log.info("[preprocess] %s", format_report(val_report, "val_corpus"))
        report = {"corpus": report, "val_corpus": val_report}
        docs = kept.map_batches(_label_split, batch_format="pyarrow", fn_kwargs={"name": "train"}).union(
            val_docs.map_batches(_label_split, batch_format="pyarrow", fn_kwargs={"name": "val"}))
    # hash order (neighbours unrelated, stable), materialized: no upstream stage left to compete with
    # the tokenizer tasks for CPUs (pack cuts it into the tokenizer's work items)
    docs = docs.sort(["split", "content_hash"]).materialize()
    with atomic_dir(out) as tmp:
        tok = _tokenizer(job, docs, tmp)
        log.info("[preprocess] tokenizing and packing, %d tokenizer %s at a time", job.pack.num_actors,
                 job.pack.compute)
        stats = pack(docs, tok.path, job.pack.seq_len, tmp, job.pack.rows_per_shard, job.pack.num_actors,
                     compute=job.pack.compute)
        if not stats["train"]["documents"]:
            raise UserError("corpus: no training documents (all went to val; lower pack.val_fraction)")
        manifest = write_manifest(tmp, tok.sha256, tok.vocab_size, tok.eod_id, job.pack.seq_len, extra_splits=stats,
                                  cleaning=report, config=job.model_dump(mode="json"))
    for name in ("train", "val"):
        s = manifest["splits"][name]
        log.info("[preprocess] %s: %d documents, %d tokens -> %d rows of %d in %d shards (%d tail tokens dropped)",
                 name, s["documents"], s["doc_tokens"], s["rows"], job.pack.seq_len + 1, len(s["shards"]),
                 s["dropped_tail_tokens"])
    log.info("[preprocess] wrote %s (tokenizer.model vocab %d, manifest.json, train/, val/)", out, tok.vocab_size)
    return out
