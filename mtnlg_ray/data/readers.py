"""Corpus readers: files -> a Ray Data dataset with one row per document.

Kinds (`CorpusConfig.kind`)
    stdlib    the running interpreter's standard library `.py` sources (no download): test
              suites (`test/`, `tests/`, `idle_test/` directories, `test_*.py`) and
              site-packages excluded, sorted by path relative to the stdlib root
    text      `text_mode`: file (a document per file), line (per non-blank line), paragraph
              (per blank-line-separated block)
    jsonl     one JSON object per line, the document in the string field `text_field`
    parquet   the string column `text_field`

Paths are files, directories (every file beneath, recursively; jsonl/parquet keep matching
suffixes) and globs (`*`, `?`, `**`), local or any URI `pyarrow.fs` opens (s3://, gs://,
hdfs://, file://). Compressed files (.gz, .bz2, .zst) are decompressed by suffix. Files are
read in sorted order; `max_files` keeps the first N.

Rows: doc_id int64 (file index << 32 | record number: unique and stable), text, source
("path:line" where the record starts), status ("" or why the record is not a document:
malformed_json, missing_field, binary), note (what was wrong, for the report), utf8_replaced
(invalid UTF-8 bytes were replaced by U+FFFD; the document is kept and counted).

Binary files: the first SNIFF_BYTES of every text / JSONL file are checked (as git and grep do):
a NUL byte, or more than BINARY_SHARE of the characters invalid UTF-8, makes the whole file one
`binary` record (an image or archive in a corpus folder is not text with a few bad bytes; left
in, its replacement characters would reach the tokenizer sample and the shards). A file with no
records at all (empty, or only blank lines) is one empty document, so the cleaning report counts
it under `empty` and every file yields at least one row.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from mtnlg_ray.config import CorpusConfig
from mtnlg_ray.errors import UserError

SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",)}
COMPRESSED = (".gz", ".bz2", ".zst")
TEST_DIRS = {"test", "tests", "idle_test"}
SCHEMA = pa.schema([("doc_id", pa.int64()), ("text", pa.string()), ("source", pa.string()),
                    ("status", pa.string()), ("note", pa.string()), ("utf8_replaced", pa.bool_())])
BATCH_DOCS = 512  # documents per emitted block: a huge line-mode file streams out in pieces
SNIFF_BYTES = 8192  # the start of a file that decides binary or text
# Latin-1 text read as UTF-8 loses a few percent of its characters; random bytes about half
BINARY_SHARE = 0.1


class Record(NamedTuple):
    text: str
    line: int            # 1-based line where the record starts (1 for file mode)
    status: str = ""     # "" or malformed_json / missing_field / binary
    note: str = ""
    utf8_replaced: bool = False


# ----------------------------------------------------------------------------------- file lists
def stdlib_files() -> list[str]:
    """The interpreter's stdlib `.py` files, tests and site-packages excluded, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if TEST_DIRS & set(parts[:-1]) or "site-packages" in parts or "dist-packages" in parts:
            continue
        if parts[-1].startswith("test_"):
            continue
        out.append(p)
    return [str(p) for p in sorted(out, key=lambda p: p.relative_to(root).as_posix())]


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise UserError(f"corpus.paths: {path}: cannot open ({err})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _uncompressed_name(path: str) -> str:
    """The file name without its compression suffix (data.jsonl.gz -> data.jsonl)."""
    base = Path(path).name
    for c in COMPRESSED:
        base = base.removesuffix(c)
    return base


def kind_of(path: str) -> str:
    """text / jsonl / parquet from a file's suffix (compression suffixes ignored)."""
    base = _uncompressed_name(path)
    return next((kind for kind, sufs in SUFFIXES.items() if base.endswith(sufs)), "text")


def _keep(name: str, kind: str) -> bool:
    if Path(name).name.startswith((".", "_")):  # hidden files, _SUCCESS markers
        return False
    return kind not in SUFFIXES or _uncompressed_name(name).endswith(SUFFIXES[kind])


def resolve_paths(paths: list[str], kind: str) -> list[str]:
    """Expand files, directories and globs into a sorted list of files (URIs kept as URIs)."""
    found: set[str] = set()
    for entry in paths:
        fs, path = _filesystem(entry)
        prefix = entry.split("://", 1)[0] + "://" if "://" in entry else ""
        if any(ch in path for ch in "*?["):
            if isinstance(fs, pafs.LocalFileSystem):
                matches = [m for m in glob.glob(path, recursive=True) if os.path.isfile(m)]
            else:
                base = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                matches = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
            if not matches:
                raise UserError(f"corpus.paths: {entry}: the pattern matches no file")
            found.update(prefix + m for m in matches)  # a pattern says exactly which files it means
            continue
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"corpus.paths: {entry}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and _keep(i.path, kind)]
            if not files:
                raise UserError(f"corpus.paths: {entry}: the directory holds no {kind} file")
            found.update(prefix + f for f in files)
        else:
            found.add(prefix + path if prefix else path)
    return sorted(found)


def corpus_files(cfg: CorpusConfig) -> list[str]:
    files = stdlib_files() if cfg.kind == "stdlib" else resolve_paths(cfg.paths, cfg.kind)
    if not files:
        raise UserError(f"corpus: no files found for kind={cfg.kind}")
    return files[: cfg.max_files] if cfg.max_files else files


# ------------------------------------------------------------------------------------- records
def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def binary_reason(head: bytes) -> str:
    """Why bytes from the start of a file are binary content, or "" when they read as text."""
    if b"\x00" in head:
        return "binary content (NUL bytes)"
    text = head.decode("utf-8", errors="replace")
    share = text.count("\ufffd") / max(1, len(text))
    if share > BINARY_SHARE:
        return f"binary content ({share:.0%} of the characters are not valid UTF-8)"
    return ""


def _lines(stream) -> Iterator[tuple[int, bytes]]:
    for n, raw in enumerate(stream, start=1):
        yield n, raw.rstrip(b"\r\n")


def iter_records(path: str, kind: str, text_mode: str = "file", text_field: str = "text") -> Iterator[Record]:
    """The documents of one file (bad records included, marked), in file order."""
    fs, p = _filesystem(path)
    if kind == "parquet":
        with fs.open_input_file(p) as f:
            yield from _parquet_records(pq.ParquetFile(f), path, text_field)
        return
    with fs.open_input_stream(p, compression="detect") as raw_stream:
        stream = _LineReader(raw_stream)
        why = binary_reason(stream.peek(SNIFF_BYTES))
        if why:
            yield Record("", 1, "binary", why)
            return
        if kind == "stdlib" or (kind == "text" and text_mode == "file"):
            text, bad = _decode(stream.read_all())
            yield Record(text, 1, utf8_replaced=bad)
        elif kind == "text" and text_mode == "line":
            for n, raw in _lines(stream):
                if raw.strip():
                    text, bad = _decode(raw)
                    yield Record(text, n, utf8_replaced=bad)
        elif kind == "text":  # paragraph
            block, start = [], 0
            for n, raw in _lines(stream):
                if raw.strip():
                    block.append(raw)
                    start = start or n
                    continue
                if block:
                    text, bad = _decode(b"\n".join(block))
                    yield Record(text, start, utf8_replaced=bad)
                block, start = [], 0
            if block:
                text, bad = _decode(b"\n".join(block))
                yield Record(text, start, utf8_replaced=bad)
        else:  # jsonl
            for n, raw in _lines(stream):
                if raw.strip():
                    yield _json_record(raw, n, text_field)


def _json_record(raw: bytes, n: int, field: str) -> Record:
    line, bad = _decode(raw)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return Record("", n, "malformed_json", f"not valid JSON: {err.msg}, column {err.colno}", bad)
    if not isinstance(obj, dict):
        return Record("", n, "malformed_json", f"not a JSON object (got {type(obj).__name__})", bad)
    text = obj.get(field)
    if not isinstance(text, str):
        what = "missing" if text is None else f"not a string (got {type(text).__name__})"
        return Record("", n, "missing_field", f"field {field!r} {what}", bad)
    return Record(text, n, utf8_replaced=bad)


def _parquet_records(pf: pq.ParquetFile, path: str, field: str) -> Iterator[Record]:
    n = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            n += 1
            if isinstance(value, str) and "\x00" in value:
                yield Record("", n, "binary", "binary content (NUL characters)")
            elif isinstance(value, str):
                yield Record(value, n)
            else:
                yield Record("", n, "missing_field", f"column {field!r} is null", False)


class _LineReader:
    """Binary line iteration (and read-all) over a pyarrow input stream, after an optional peek."""

    def __init__(self, stream, chunk: int = 1 << 20):
        self.stream, self.chunk, self.head = stream, chunk, b""

    def peek(self, n: int) -> bytes:
        """The first n bytes (fewer at the end of the stream), still to be read after."""
        while len(self.head) < n and (more := self.stream.read(n - len(self.head))):
            self.head += more
        return self.head

    def read_all(self) -> bytes:
        head, self.head = self.head, b""
        return head + self.stream.read()

    def _chunks(self) -> Iterator[bytes]:
        head, self.head = self.head, b""
        if head:
            yield head
        while chunk := self.stream.read(self.chunk):
            yield chunk

    def __iter__(self) -> Iterator[bytes]:
        rest = b""
        for chunk in self._chunks():
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line + b"\n"
        if rest:
            yield rest


def check_parquet_columns(files: list[str], field: str) -> None:
    """Refuse, before any work starts, Parquet files that lack the text column or hold non-strings."""
    for f in files:
        fs, p = _filesystem(f)
        with fs.open_input_file(p) as fh:
            schema = pq.ParquetFile(fh).schema_arrow
        if field not in schema.names:
            raise UserError(f"{f}: no column {field!r} (columns: {', '.join(schema.names)}); set corpus.text_field")
        if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
            raise UserError(f"{f}: column {field!r} is {schema.field(field).type}, not a string column")


# ---------------------------------------------------------------------------------------- Ray Data
def _read_files(batch: dict, kind: str, text_mode: str, text_field: str) -> Iterator[pa.Table]:
    """map_batches UDF: a batch of (file_index, path) rows -> blocks of document rows."""
    for file_index, path in zip(batch["file_index"].tolist(), batch["path"].tolist()):
        rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        records = iter_records(path, kind, text_mode, text_field)
        first = next(records, None)
        # a file without records is one empty document, counted under `empty` in the report
        records = [Record("", 1)] if first is None else itertools.chain([first], records)
        for i, rec in enumerate(records):
            rows["doc_id"].append((file_index << 32) | i)
            rows["text"].append(rec.text)
            rows["source"].append(f"{path}:{rec.line}")
            rows["status"].append(rec.status)
            rows["note"].append(rec.note)
            rows["utf8_replaced"].append(rec.utf8_replaced)
            if len(rows["doc_id"]) >= BATCH_DOCS:
                yield pa.table(rows, schema=SCHEMA)
                rows = {name: [] for name in SCHEMA.names}
        if rows["doc_id"]:
            yield pa.table(rows, schema=SCHEMA)


def read_corpus(cfg: CorpusConfig) -> ray.data.Dataset:
    """A lazy dataset of the corpus' documents (columns: see the module docstring)."""
    files = corpus_files(cfg)
    if cfg.kind == "parquet":
        check_parquet_columns(files, cfg.text_field)
    # two blocks per CPU: enough to keep the cluster busy, few enough that the later shuffles
    # (dedup group-by, sort), whose cost grows with blocks^2, stay cheap on a small machine
    cpus = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else 2
    listing = ray.data.from_items([{"file_index": i, "path": f} for i, f in enumerate(files)],
                                  override_num_blocks=max(1, min(len(files), 2 * cpus)))
    return listing.map_batches(_read_files, batch_size=1, batch_format="numpy",
                               fn_kwargs={"kind": cfg.kind, "text_mode": cfg.text_mode, "text_field": cfg.text_field})
