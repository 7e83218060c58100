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
from ray.data.expressions import col
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

    Per split present in the batch: each document is encoded and followed by EOD, the ids are
    concatenated and cut into full rows of seq_len + 1. The remainder (< seq_len + 1 ids) leaves
    as one extra row with full=False carrying the counts (docs, doc_tokens); the driver packs tails.
    """

    def __init__(self, tokenizer_path: str, seq_len: int):
        from mtnlg_ray.data.tokenizer import Tokenizer

        self.tok = Tokenizer(tokenizer_path)
        self.row = seq_len + 1

    def __call__(self, batch: pa.Table) -> pa.Table:
        splits = batch["split"].to_pylist() if "split" in batch.column_names else ["train"] * batch.num_rows
        ids = self.tok.encode_batch(batch["text"].to_pylist())
        return pa.concat_tables([self._pack([x for x, s in zip(ids, splits) if s == name], name)
                                 for name in sorted(set(splits))])

    def _pack(self, ids: list[list[int]], split: str) -> pa.Table:
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
            "split": pa.array([split] * (n_full + 1)),
            "full": pa.array([True] * n_full + [False]),
            "docs": pa.array([0] * n_full + [len(ids)], pa.int64()),
            "doc_tokens": pa.array([0] * n_full + [int(lengths.sum())], pa.int64()),
        })


class ShardWriter:
    """Streams rows into `dir/part-NNNNN.parquet`, `rows_per_shard` rows each, in row groups of ROW_GROUP.

    Rows that do not fill a row of their own (batch tails) are carried and packed as they arrive.
    """

    def __init__(self, directory: Path, rows_per_shard: int, row_len: int):
        self.dir, self.rows_per_shard, self.row_len = directory, rows_per_shard, row_len
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer, self.in_shard, self.shards = None, 0, 0
        self.carry = np.array([], np.int32)  # tail ids not yet a full row
        self.docs = self.doc_tokens = 0

    def write(self, rows: pa.ListArray) -> int:
        """Write full rows; returns how many."""
        n = len(rows)
        while len(rows):
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.dir / f"part-{self.shards:05d}.parquet", SCHEMA)
                self.shards += 1
            take = min(len(rows), self.rows_per_shard - self.in_shard)
            self.writer.write_table(pa.table({"input_ids": rows.slice(0, take)}, schema=SCHEMA), ROW_GROUP)
            rows, self.in_shard = rows.slice(take), self.in_shard + take
            if self.in_shard == self.rows_per_shard:
                self.close()
        return n

    def add_tail(self, ids: np.ndarray) -> int:
        """Append tail ids to the carry and write the full rows it now holds; returns how many."""
        self.carry = np.concatenate([self.carry, ids.astype(np.int32)])
        n = len(self.carry) // self.row_len
        rows = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * self.row_len),
                                        pa.array(self.carry[: n * self.row_len]))
        self.carry = self.carry[n * self.row_len:]
        return self.write(rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer, self.in_shard = None, 0


def pack(docs: ray.data.Dataset, tokenizer_path: str | Path, seq_len: int, out_root: Path,
         rows_per_shard: int = 4096, num_actors: int = 2, batch_docs: int = 64,
         splits: tuple[str, ...] = ("train", "val")) -> dict[str, dict]:
    """Tokenize (actor pool) and pack `docs` into `out_root/<split>/part-*.parquet`; counts per split.

    `docs` has a `text` column and a `split` column (absent: all "train"), in several blocks (each
    block is one actor's work item). Give it a materialized dataset, or make sure the cluster has
    CPUs beyond the `num_actors` the actors hold: upstream tasks need one. Rows arrive at the driver
    in dataset order (preserve_order) and are written as they come, so memory stays flat however
    large the corpus. The last < seq_len + 1 ids of a split fill no row and are dropped
    (`dropped_tail_tokens`): `rows * (seq_len + 1) + dropped_tail_tokens = doc_tokens`.
    """
    columns = [c for c in ("text", "split") if c in docs.columns()]
    # The actors must leave one CPU to the read / repartition tasks that feed them: on a 2-CPU Ray,
    # two 1-CPU actors starve those tasks and the pipeline stalls with no error.
    actor_cpus = max(0.25, min(1.0, (ray.cluster_resources().get("CPU", 1.0) - 1.0) / num_actors))
    packed = docs.select_columns(columns).map_batches(
        TokenizePack, fn_constructor_args=(str(tokenizer_path), seq_len), batch_size=batch_docs,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=actor_cpus)
    writers = {name: ShardWriter(out_root / name, rows_per_shard, seq_len + 1) for name in splits}
    with tqdm(desc="tokenize + pack", unit=" rows", mininterval=2, disable=None) as bar:
        for table in packed.iter_batches(batch_format="pyarrow", batch_size=None):
            for name, w in writers.items():
                part = table.filter(pc.equal(table["split"], name))
                full = part["full"].to_numpy(zero_copy_only=False)
                n = w.write(part["input_ids"].combine_chunks().filter(pa.array(full)))
                tails = part.filter(pa.array(~full))
                n += w.add_tail(tails["input_ids"].combine_chunks().flatten().to_numpy())
                w.docs += int(pc.sum(tails["docs"]).as_py() or 0)
                w.doc_tokens += int(pc.sum(tails["doc_tokens"]).as_py() or 0)
                bar.update(n)
    for w in writers.values():
        w.close()
    return {name: {"documents": w.docs, "doc_tokens": w.doc_tokens, "dropped_tail_tokens": len(w.carry)}
            for name, w in writers.items()}


# ------------------------------------------------------------------------------------------- job
def _ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), log_to_driver=False)


def _tokenizer(job: PreprocessJob, docs: ray.data.Dataset, out: Path):
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
    # train documents come first, in content-hash order: the first sample_docs are a uniform, stable sample
    sample = [r["text"] for r in docs.filter(expr=col("split") == "train").select_columns(["text"])
              .limit(cfg.sample_docs).take_all()]
    print(f"[preprocess] training a {cfg.model_type} tokenizer (vocab {cfg.vocab_size}) on {len(sample)} documents",
          flush=True)
    return train_tokenizer(sample, out / "tokenizer.model", cfg.vocab_size, cfg.model_type, cfg.byte_fallback,
                           cfg.max_sentence_length)


def _label_split(batch: pa.Table, cut: int | None = None, name: str | None = None) -> pa.Table:
    """Add the `split` column: `name`, or val when split_key < cut (stable across runs) else train."""
    if name is None:
        below = pc.less(batch["split_key"], pa.scalar(cut, pa.int64())).to_numpy(zero_copy_only=False)
        labels = np.where(below, "val", "train").tolist()
    else:
        labels = [name] * batch.num_rows
    return batch.append_column("split", pa.array(labels, pa.string()))


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
    if job.val_corpus is None:  # a document goes to val when its split hash falls below val_fraction
        cut = int(job.pack.val_fraction * 2**64) - 2**63  # split_key is a uniform int64
        docs = kept.map_batches(_label_split, batch_format="pyarrow", fn_kwargs={"cut": cut})
    else:
        val_docs, val_report = clean_corpus(read_corpus(job.val_corpus), job.clean, "val_corpus")
        print(f"[preprocess] {format_report(val_report, 'val_corpus')}", flush=True)
        report = {"corpus": report, "val_corpus": val_report}
        docs = kept.map_batches(_label_split, batch_format="pyarrow", fn_kwargs={"name": "train"}).union(
            val_docs.map_batches(_label_split, batch_format="pyarrow", fn_kwargs={"name": "val"}))
    # hash order (neighbours unrelated, stable), materialized in blocks of 64 documents: the actor
    # pool's work items, with no upstream task left to compete with the actors for CPUs
    docs = docs.sort(["split", "content_hash"]).repartition(target_num_rows_per_block=64).materialize()
    with atomic_dir(out) as tmp:
        tok = _tokenizer(job, docs, tmp)
        print(f"[preprocess] tokenizing and packing on {job.pack.num_actors} tokenizer actors", flush=True)
        stats = pack(docs, tok.path, job.pack.seq_len, tmp, job.pack.rows_per_shard, job.pack.num_actors)
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
