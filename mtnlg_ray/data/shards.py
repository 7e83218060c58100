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

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.context import DataContext
from tqdm import tqdm

from mtnlg_ray.config import PreprocessJob
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import atomic_dir

FORMAT_VERSION = 1
ROW_GROUP = 128  # rows per Parquet row group: the unit data/dataset.py shuffles and reads
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])


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
    """Ray Data actor (tokenizer loaded once per actor): a batch of documents -> packed rows.

    Each document is encoded and followed by EOD; the batch's ids are concatenated and cut into
    full rows of seq_len + 1 ids. The remainder (< seq_len + 1 ids) leaves as one extra row with
    full=False, carrying the batch's counts (docs, doc_tokens); the driver packs those tails.
    """

    def __init__(self, tokenizer_path: str, seq_len: int):
        from mtnlg_ray.data.tokenizer import Tokenizer

        self.tok = Tokenizer(tokenizer_path)
        self.row = seq_len + 1

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = self.tok.encode_batch(batch["text"].to_pylist())
        lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
        flat = np.empty(int(lengths.sum()), np.int32)
        ends = np.cumsum(lengths)
        for doc, end, n in zip(ids, ends, lengths):
            flat[end - n:end - 1] = doc
        flat[ends - 1] = self.tok.eod_id  # EOD after every document
        n_full = len(flat) // self.row
        offsets = np.append(np.arange(n_full + 1, dtype=np.int32) * self.row, len(flat)).astype(np.int32)
        return pa.table({
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            "full": pa.array([True] * n_full + [False]),
            "docs": pa.array([0] * n_full + [len(ids)], pa.int64()),
            "doc_tokens": pa.array([0] * n_full + [int(lengths.sum())], pa.int64()),
        })


class ShardWriter:
    """Streams rows into `dir/part-NNNNN.parquet`, `rows_per_shard` rows each, in row groups of ROW_GROUP."""

    def __init__(self, directory: Path, rows_per_shard: int):
        self.dir, self.rows_per_shard = directory, rows_per_shard
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer, self.in_shard, self.shards, self.rows = None, 0, 0, 0

    def write(self, rows: pa.ListArray) -> None:
        while len(rows):
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.dir / f"part-{self.shards:05d}.parquet", SCHEMA)
                self.shards += 1
            take = min(len(rows), self.rows_per_shard - self.in_shard)
            self.writer.write_table(pa.table({"input_ids": rows.slice(0, take)}, schema=SCHEMA), ROW_GROUP)
            rows, self.in_shard, self.rows = rows.slice(take), self.in_shard + take, self.rows + take
            if self.in_shard == self.rows_per_shard:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer, self.in_shard = None, 0


def pack_split(docs: ray.data.Dataset, tokenizer_path: str | Path, seq_len: int, out_dir: Path,
               rows_per_shard: int = 4096, num_actors: int = 2, batch_docs: int = 64, desc: str = "pack") -> dict:
    """Tokenize (actor pool) and pack `docs` (column text) into shards under `out_dir`; counts.

    Rows arrive at the driver in dataset order (preserve_order) and are written as they come, so
    memory stays flat however large the corpus. Batch tails are packed together as they arrive;
    the last < seq_len + 1 ids of the split fill no row and are dropped (`dropped_tail_tokens`).
    """
    packed = docs.select_columns(["text"]).map_batches(
        TokenizePack, fn_constructor_args=(str(tokenizer_path), seq_len), batch_size=batch_docs,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=1)
    writer, row = ShardWriter(out_dir, rows_per_shard), seq_len + 1
    carry, n_docs, doc_tokens = np.array([], np.int32), 0, 0  # carry: batch tails not yet a full row
    with tqdm(desc=desc, unit=" rows", mininterval=2, disable=None) as bar:
        for table in packed.iter_batches(batch_format="pyarrow", batch_size=None):
            full = table["full"].to_numpy(zero_copy_only=False)
            writer.write(table["input_ids"].combine_chunks().filter(pa.array(full)))
            rest = table.filter(pa.array(~full))
            carry = np.concatenate([carry, rest["input_ids"].combine_chunks().flatten().to_numpy()])
            n = len(carry) // row
            writer.write(_rows(carry[: n * row], row))
            carry = carry[n * row:]
            n_docs += int(pc.sum(rest["docs"]).as_py() or 0)
            doc_tokens += int(pc.sum(rest["doc_tokens"]).as_py() or 0)
            bar.update(int(full.sum()) + n)
    writer.close()
    return {"documents": n_docs, "doc_tokens": doc_tokens, "dropped_tail_tokens": len(carry)}


def _rows(ids: np.ndarray, row: int) -> pa.ListArray:
    """A flat int32 array of k * row ids -> k list rows."""
    return pa.ListArray.from_arrays(pa.array(np.arange(len(ids) // row + 1, dtype=np.int32) * row), pa.array(ids))


# ------------------------------------------------------------------------------------------- job
def _ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), log_to_driver=False)


def _tokenizer(job: PreprocessJob, train_docs: ray.data.Dataset, out: Path):
    """Load `tokenizer.path` (checked against tokenizer.vocab_size when set) or train on a sample."""
    from mtnlg_ray.data.tokenizer import Tokenizer, train_tokenizer

    cfg = job.tokenizer
    if cfg.path:
        tok = Tokenizer(cfg.path)
        if "vocab_size" in cfg.model_fields_set and tok.vocab_size != cfg.vocab_size:
            raise UserError(f"tokenizer.vocab_size={cfg.vocab_size} but {cfg.path} has {tok.vocab_size} pieces")
        if tok.eod_id < 0:
            raise UserError(f"{cfg.path}: tokenizer has no end-of-document (eos) piece")
        (out / "tokenizer.model").write_bytes(Path(cfg.path).read_bytes())
        return Tokenizer(out / "tokenizer.model")
    # documents are in content-hash order, so the first sample_docs are a uniform, stable sample
    sample = [r["text"] for r in train_docs.select_columns(["text"]).limit(cfg.sample_docs).take_all()]
    print(f"[preprocess] training a {cfg.model_type} tokenizer (vocab {cfg.vocab_size}) on {len(sample)} documents",
          flush=True)
    return train_tokenizer(sample, out / "tokenizer.model", cfg.vocab_size, cfg.model_type, cfg.byte_fallback,
                           cfg.max_sentence_length)


def _split(kept: ray.data.Dataset, fraction: float, val: bool) -> ray.data.Dataset:
    """Documents whose split hash falls below `fraction` (val) or not (train): stable across runs."""
    cut = int(fraction * 2**64) - 2**63  # split_key is a uniform int64

    def pick(batch: pa.Table) -> pa.Table:
        below = pc.less(batch["split_key"], pa.scalar(cut, pa.int64()))
        return batch.filter(below if val else pc.invert(below))

    return kept.map_batches(pick, batch_format="pyarrow")


def run_preprocess(job: PreprocessJob) -> Path:
    """read -> clean -> tokenizer -> tokenize + pack (actor pool) -> Parquet shards + manifest.json."""
    from mtnlg_ray.data.clean import clean_corpus, format_report
    from mtnlg_ray.data.readers import corpus_files, read_corpus

    for corpus in (job.corpus, job.val_corpus):  # bad paths fail before any work starts
        if corpus is not None:
            corpus_files(corpus)
    if job.tokenizer.path and not Path(job.tokenizer.path).is_file():
        raise UserError(f"tokenizer.path: {job.tokenizer.path}: no such file")
    _ensure_ray()
    DataContext.get_current().execution_options.preserve_order = True  # deterministic shards
    out = Path(job.output_dir)
    print(f"[preprocess] reading and cleaning the {job.corpus.kind} corpus", flush=True)
    kept, report = clean_corpus(read_corpus(job.corpus), job.clean, "corpus")
    print(f"[preprocess] {format_report(report, 'corpus')}", flush=True)
    kept = kept.sort("content_hash").materialize()  # hash order: neighbours unrelated, order stable
    if job.val_corpus is not None:
        val_docs, val_report = clean_corpus(read_corpus(job.val_corpus), job.clean, "val_corpus")
        print(f"[preprocess] {format_report(val_report, 'val_corpus')}", flush=True)
        report = {"corpus": report, "val_corpus": val_report}
        splits = {"train": kept, "val": val_docs.sort("content_hash").materialize()}
    else:
        splits = {"train": _split(kept, job.pack.val_fraction, val=False),
                  "val": _split(kept, job.pack.val_fraction, val=True)}
    with atomic_dir(out) as tmp:
        tok = _tokenizer(job, splits["train"], tmp)
        stats = {}
        for name, docs in splits.items():
            print(f"[preprocess] tokenizing and packing {name} ({job.pack.num_actors} tokenizer actors)", flush=True)
            stats[name] = pack_split(docs, tok.path, job.pack.seq_len, tmp / name, job.pack.rows_per_shard,
                                     job.pack.num_actors, desc=name)
        if not stats["train"]["documents"]:
            raise UserError("corpus: no training documents (all went to val; lower pack.val_fraction)")
        manifest = write_manifest(tmp, tok.sha256, tok.vocab_size, tok.eod_id, job.pack.seq_len, extra_splits=stats,
                                  cleaning=report, config=job.model_dump(mode="json"))
    for name in ("train", "val"):
        s = manifest["splits"][name]
        print(f"[preprocess] {name}: {s['documents']} documents, {s['doc_tokens']} tokens -> {s['rows']} rows of "
              f"{job.pack.seq_len + 1} in {len(s['shards'])} shards ({s['dropped_tail_tokens']} tail tokens dropped)")
    print(f"[preprocess] wrote {out} (tokenizer.model vocab {tok.vocab_size}, manifest.json, train/, val/)", flush=True)
    return out
