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
from pathlib import Path

import pyarrow.parquet as pq

FORMAT_VERSION = 1


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
