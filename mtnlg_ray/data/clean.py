"""Cleaning as Ray Data stages: normalise, filter, exact and MinHash/LSH near-duplicate removal.

Stages (each spreads over the cluster)
    1. mark      (map_batches) Unicode NFC; control characters removed (Cc except tab and
                 newline; \r\n becomes \n); documents shorter than `min_chars` or longer than
                 `max_chars` (after normalisation) marked; content hash (blake2b of the cleaned
                 text); MinHash signature (datasketch, `num_perm` permutations over the set of
                 `shingle_size`-word shingles). The marked set is materialised once.
    2. dedup     LSH banding as a Ray Data group-by: each kept document emits `bands` rows
                 (bucket = hash(band number, its num_perm/bands signature values)). In each
                 bucket a document whose content hash equals that of an EARLIER document (lower
                 doc_id) is an `exact_duplicate`; else one whose estimated Jaccard similarity
                 with an earlier document of the bucket is >= `threshold` is a `near_duplicate`
                 (so the first document of every cluster, in corpus order, is kept). With
                 `near_dedup: false` a document has one bucket, its content hash (exact dedup
                 only). Only duplicate ids come back to the driver.
                 Defaults: 5-word shingles, 128 permutations, 16 bands of 8 rows: pairs at
                 Jaccard 0.8 share a band with probability 1 - (1 - 0.8^8)^16 = 0.96, pairs at
                 0.5 become candidates with probability 0.06 and are then rejected by the
                 threshold. Cost: each shuffled row carries the signature (num_perm x 4 bytes).

Report (goes into manifest.json["cleaning"] and is printed)
    documents_read, documents_kept, dropped {reason: count} (malformed_json, missing_field,
    binary, empty, too_short, too_long, exact_duplicate, near_duplicate), utf8_replaced (documents
    whose invalid UTF-8 was replaced, kept), bad_records (malformed + missing + utf8_replaced),
    bad_examples (the first few "file:line: what" lines, binary files included). Binary files
    (data/readers.py) are dropped, not bad records: a folder may hold a stray image without the
    corpus being broken.
More than `max_bad_fraction` bad records is a one-line UserError; so is nothing left, naming each filter
that removed documents and its config key (a ConfigError, exit 2, when a filter's setting emptied the corpus).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from datasketch import MinHash

from mtnlg_ray.config import CleanConfig
from mtnlg_ray.errors import ConfigError, UserError

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Cc minus \t (09) and \n (0a)
REASONS = ("malformed_json", "missing_field", "binary", "empty", "too_short", "too_long", "exact_duplicate", "near_duplicate")
BAD_INPUT = ("malformed_json", "missing_field")
EXAMPLES = (*BAD_INPUT, "binary")  # records shown in bad_examples
BUCKET_SCHEMA = pa.schema([("bucket", pa.int64()), ("doc_id", pa.int64()), ("content_hash", pa.int64()),
                           ("minhash", pa.binary())])
MINHASH_SEED = 1  # fixed: signatures must agree across workers and runs
MAX_EXAMPLES = 5


def normalize(text: str) -> str:
    """NFC, Windows/Mac newlines -> \\n, control characters (except tab, newline) removed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n")
    return CONTROL.sub("", text)


def content_hash(text: str) -> tuple[int, int]:
    """(hash for dedup and ordering, independent hash for the train/val split), as int64s."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:], "little", signed=True)


@lru_cache(maxsize=4)
def _permutations(num_perm: int):
    return MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme="affine32").permutations


def shingles(text: str, size: int) -> set[bytes]:
    words = text.split()
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def signature(text: str, shingle_size: int, num_perm: int) -> np.ndarray:
    """MinHash signature, uint32 (num_perm,) (datasketch affine32 scheme)."""
    m = MinHash(num_perm=num_perm, seed=MINHASH_SEED, permutations=_permutations(num_perm), scheme="affine32")
    m.update_batch(list(shingles(text, shingle_size)))
    return m.hashvalues.astype(np.uint32)


def band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """int64 (bands,): one key per LSH band, distinct across band numbers."""
    rows = sig.reshape(bands, -1)
    return np.array([int.from_bytes(hashlib.blake2b(b.to_bytes(2, "little") + rows[b].tobytes(), digest_size=8)
                                    .digest(), "little", signed=True) for b in range(bands)], np.int64)


# ----------------------------------------------------------------------------------------- stages
def _mark(batch: pa.Table, cfg: CleanConfig) -> pa.Table:
    """Stage 1: normalise; set status for empty / too short / too long; hashes and signatures."""
    texts, status = [], []
    hashes, split_keys, sigs = [], [], []
    for text, st in zip(batch["text"].to_pylist(), batch["status"].to_pylist()):
        text = normalize(text) if not st else ""
        if not st:
            n = len(text)
            st = "empty" if not text.strip() else "too_short" if n < cfg.min_chars else \
                "too_long" if n > cfg.max_chars else ""
        h, s = content_hash(text) if not st else (0, 0)
        sig = signature(text, cfg.shingle_size, cfg.num_perm).tobytes() if (not st and cfg.near_dedup) else b""
        texts.append(text if not st else "")
        status.append(st)
        hashes.append(h)
        split_keys.append(s)
        sigs.append(sig)
    return (batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
            .set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
            .append_column("content_hash", pa.array(hashes, pa.int64()))
            .append_column("split_key", pa.array(split_keys, pa.int64()))
            .append_column("minhash", pa.array(sigs, pa.binary())))


def _bucket_rows(batch: pa.Table, bands: int, near: bool) -> pa.Table:
    """Stage 2a: one (bucket, doc_id, content_hash, signature) row per LSH band of each kept document.

    Without near-dedup a document has one bucket, its content hash: exact dedup is LSH with one band.
    The filter to kept documents happens here, on blocks that always hold rows, and the result has
    BUCKET_SCHEMA even when no document of the block was kept: Ray Data turns a map task's empty
    output into a block without columns, and the shuffle cannot concatenate that with the others.
    """
    kept = batch.filter(pc.equal(batch["status"], ""))
    ids, hashes = kept["doc_id"].to_numpy(), kept["content_hash"].to_numpy()
    if not near:
        return pa.table({"bucket": hashes, "doc_id": ids, "content_hash": hashes,
                         "minhash": [b""] * len(ids)}, schema=BUCKET_SCHEMA)
    sigs = kept["minhash"].to_pylist()
    keys = [band_keys(np.frombuffer(sig, np.uint32), bands) for sig in sigs]
    return pa.table({"bucket": np.concatenate(keys) if keys else np.array([], np.int64),
                     "doc_id": np.repeat(ids, bands), "content_hash": np.repeat(hashes, bands),
                     "minhash": [sig for sig in sigs for _ in range(bands)]}, schema=BUCKET_SCHEMA)


def _bucket_dups(group: dict, threshold: float, near: bool) -> dict:
    """Stage 2b, one bucket: documents equal to (exact) or similar to (near) an EARLIER one of it."""
    order = np.argsort(group["doc_id"], kind="stable")
    ids, hashes = group["doc_id"][order], group["content_hash"][order]
    out_ids, out_reason = [], []
    if len(ids) > 1:
        sigs = np.stack([np.frombuffer(group["minhash"][i], np.uint32) for i in order]) if near else None
        for j in range(1, len(ids)):
            if (hashes[:j] == hashes[j]).any():
                out_ids.append(ids[j])
                out_reason.append("exact_duplicate")
            elif near and ((sigs[:j] == sigs[j]).mean(axis=1) >= threshold).any():  # (j, num_perm) -> (j,)
                out_ids.append(ids[j])
                out_reason.append("near_duplicate")
    return {"doc_id": np.array(out_ids, np.int64), "reason": np.array(out_reason, dtype=object)}


def _apply_drops(batch: pa.Table, exact: np.ndarray, near: np.ndarray) -> pa.Table:
    ids = batch["doc_id"].to_numpy()
    status = np.array(batch["status"].to_pylist(), dtype=object)
    status[np.isin(ids, near) & (status == "")] = "near_duplicate"
    status[np.isin(ids, exact)] = "exact_duplicate"
    return batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status.tolist(), pa.string()))


def _duplicates(marked: ray.data.Dataset, cfg: CleanConfig, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: (exact duplicate ids, near duplicate ids) by a group-by on LSH bucket keys."""
    rows = n_docs * (cfg.bands if cfg.near_dedup else 1)
    partitions = int(min(200, max(2, rows // 200_000)))
    dups = (marked.select_columns(["doc_id", "status", "content_hash", "minhash"])
            .map_batches(_bucket_rows, batch_format="pyarrow", fn_kwargs={"bands": cfg.bands, "near": cfg.near_dedup})
            .groupby("bucket", num_partitions=partitions)
            .map_groups(_bucket_dups, batch_format="numpy",
                        fn_kwargs={"threshold": cfg.threshold, "near": cfg.near_dedup}))
    ids, reasons = [], []
    for b in dups.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(np.asarray(b["doc_id"], np.int64))
        reasons.append(np.asarray(b["reason"], dtype=object))
    ids = np.concatenate(ids) if ids else np.array([], np.int64)
    reasons = np.concatenate(reasons) if reasons else np.array([], object)
    exact = np.unique(ids[reasons == "exact_duplicate"])
    return exact, np.setdiff1d(np.unique(ids[reasons == "near_duplicate"]), exact)


def clean_corpus(docs: ray.data.Dataset, cfg: CleanConfig, name: str = "corpus") -> tuple[ray.data.Dataset, dict]:
    """(kept documents: doc_id, text, source, content_hash, split_key; the cleaning report)."""
    marked = docs.map_batches(_mark, batch_format="pyarrow", fn_kwargs={"cfg": cfg}).materialize()
    stats = _block_stats(marked)
    exact = near = np.array([], np.int64)
    n_ok = stats["counts"].get("", 0)
    if n_ok and (cfg.exact_dedup or cfg.near_dedup):
        exact, near = _duplicates(marked, cfg, n_ok)
        if not cfg.exact_dedup:  # near-dedup alone still drops exact copies, counted as near duplicates
            near, exact = np.union1d(near, exact), np.array([], np.int64)
    report = _report(stats, len(exact), len(near))
    _check(report, cfg, name)
    kept = (marked.map_batches(_apply_drops, batch_format="pyarrow", fn_kwargs={"exact": exact, "near": near})
            .map_batches(_only_kept, batch_format="pyarrow")
            .select_columns(["doc_id", "text", "source", "content_hash", "split_key"]))
    return kept, report


def _only_kept(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["status"], ""))


def _stats_row(batch: pa.Table) -> pa.Table:
    """Per block: status counts, UTF-8 replacements and the first bad records (one small row)."""
    counts = {}
    for st in batch["status"].to_pylist():
        counts[st] = counts.get(st, 0) + 1
    bad = batch.filter(pc.or_(pc.is_in(batch["status"], pa.array(EXAMPLES)), batch["utf8_replaced"]))
    examples = [f"{src}: {note or 'invalid UTF-8 replaced by U+FFFD'}"
                for src, note in zip(bad["source"].to_pylist()[:MAX_EXAMPLES], bad["note"].to_pylist())]
    return pa.table({"first_doc": [batch["doc_id"][0].as_py() if batch.num_rows else 0],
                     "counts": [json.dumps(counts)], "utf8": [int(pc.sum(batch["utf8_replaced"]).as_py() or 0)],
                     "examples": [json.dumps(examples)]})


def _block_stats(marked: ray.data.Dataset) -> dict:
    rows = marked.map_batches(_stats_row, batch_format="pyarrow", batch_size=None).take_all()
    counts, utf8, examples = {}, 0, []
    for r in sorted(rows, key=lambda r: r["first_doc"]):  # examples in corpus order
        for k, v in json.loads(r["counts"]).items():
            counts[k] = counts.get(k, 0) + v
        utf8 += r["utf8"]
        examples += json.loads(r["examples"])
    return {"counts": counts, "utf8": utf8, "examples": examples[:MAX_EXAMPLES]}


def _report(stats: dict, n_exact: int, n_near: int) -> dict:
    counts = {**stats["counts"], "exact_duplicate": n_exact, "near_duplicate": n_near}
    read = sum(stats["counts"].values())
    bad = sum(counts.get(r, 0) for r in BAD_INPUT) + stats["utf8"]
    return {"documents_read": read, "documents_kept": stats["counts"].get("", 0) - n_exact - n_near,
            "dropped": {r: counts.get(r, 0) for r in REASONS}, "utf8_replaced": stats["utf8"], "bad_records": bad,
            "bad_examples": stats["examples"]}


def _check(report: dict, cfg: CleanConfig, name: str) -> None:
    read, bad = report["documents_read"], report["bad_records"]
    first = f"; first: {report['bad_examples'][0]}" if report["bad_examples"] else ""
    if read and bad / read > cfg.max_bad_fraction:
        raise UserError(f"{name}: {bad} of {read} records are bad ({bad / read:.1%} > clean.max_bad_fraction="
                        f"{cfg.max_bad_fraction:.1%}){first}")
    if not read:
        raise UserError(f"{name}: no documents read (the files hold no records)")
    if not report["documents_kept"]:
        causes = _empty_causes(report["dropped"], cfg, name)
        what = ", ".join(text for text, _ in causes)
        # a filter's setting emptied the corpus: a config mistake (exit 2); empty or broken records: the data's
        error = ConfigError if any(key for _, key in causes) else UserError
        raise error(f"{name}: cleaning removed all {read} documents: {what}{first}")


def _empty_causes(dropped: dict, cfg: CleanConfig, name: str) -> list[tuple[str, str | None]]:
    """(what removed them, the config key that did it or None) for every reason that dropped documents."""
    text_field = f"{name}.text_field" if name in ("corpus", "val_corpus") else "text_field"
    phrases = {
        "too_long": (f"longer than clean.max_chars={cfg.max_chars} (raise clean.max_chars)", "clean.max_chars"),
        "too_short": (f"shorter than clean.min_chars={cfg.min_chars} (lower clean.min_chars)", "clean.min_chars"),
        "missing_field": (f"lacking the string field that {text_field} names", text_field),
        "malformed_json": ("not valid JSON", None),
        "binary": ("binary files, not text", None),
        "empty": ("empty or blank", None),
        # the first document of every duplicate cluster is kept, so these never empty a corpus alone
        "exact_duplicate": ("exact duplicates (clean.exact_dedup)", "clean.exact_dedup"),
        "near_duplicate": (f"near duplicates (clean.threshold={cfg.threshold})", "clean.threshold"),
    }
    return [(f"{n} {phrases[r][0]}", phrases[r][1]) for r, n in dropped.items() if n]


def format_report(report: dict, name: str = "corpus") -> str:
    """A few human-readable lines of the cleaning report."""
    dropped = ", ".join(f"{k}={v}" for k, v in report["dropped"].items() if v) or "none"
    lines = [f"cleaning ({name}): read {report['documents_read']}, kept {report['documents_kept']}; "
             f"dropped: {dropped}; invalid UTF-8 replaced in {report['utf8_replaced']}"]
    lines += [f"  bad: {e}" for e in report["bad_examples"]]
    return "\n".join(lines)
