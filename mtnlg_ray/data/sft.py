"""Fine-tuning (SFT) data: JSONL or a built-in task -> a dataset directory with loss masks.

Input (`task: jsonl`), one JSON object per line in any of these formats (blank lines ignored; other
keys, such as "id" or a message's "name", ignored):

    {"prompt": "Summarize: ...", "response": "..."}                                   one turn
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}     OpenAI chat
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}        ShareGPT
        ("human" -> user, "gpt" -> assistant; "user" and "assistant" are accepted too)
    {"instruction": "...", "input": "...", "output": "..."}                          Alpaca
        (prompt = instruction, + "\n\n" + input when input is given and not empty)

A line with fields of two formats, or of none, is a bad line (the report lists the formats).
Built-in tasks, mined from the .py files in train_paths (default: the Python standard library,
nothing downloaded), in `data/stdlib_tasks.py`: `stdlib_code` (signature + docstring -> body),
`stdlib_summarize` (docstring body -> summary line), `stdlib_dialogue` (multi-turn questions about
a module answered from its docstrings); their duplicates (same input) are dropped after the first,
and counted. Every example is rendered with THE chat template (`data/chat.py`, also used
by the server for /v1/chat/completions); labels are -100 on every system/user/role-marker token, so
only assistant content and its closing <|end|> are learned.

Pipeline (Ray Data, like preprocessing): read files -> one row per line / function -> tokenize
(Ray tasks) -> materialise; the driver then checks the bad-line budget, orders examples by a seeded
content hash (neighbouring rows unrelated), packs and writes Parquet row groups of ROW_GROUP rows.

Output: the same layout as `mtnlg preprocess` (see data/shards.py), with a second column:
    train/part-*.parquet, val/part-*.parquet   input_ids, labels: list<int32>, seq_len + 1 each
    manifest.json                              + "sft": counts (read, duplicates, bad, truncated, dropped)
The trainer reads it with `data/dataset.py` unchanged; targets are labels[1:].

Policies
  - Length: an example of more than seq_len + 1 tokens is cut to its first seq_len + 1
    (`overlong: truncate`; if no response token survives it is dropped) or dropped (`overlong: drop`).
    Both are counted in the manifest.
  - Packing (`packing: true`): examples are concatenated whole into rows, first come first served;
    one that does not fit in the rest of a row starts the next row; the tail of a row is padded
    (pad id, label -100). Examples in a row attend to earlier ones in that row (as in Megatron-LM
    and LitGPT packing); their losses stay separate since prompts are masked. `packing: false`:
    one example per row, padded.
  - Bad lines (not JSON, an unknown format, missing fields, unknown role, empty response, no assistant
    turn) are logged as `FILE:LINE: reason` and skipped; more than `max_bad_fraction` of the lines is
    an error.
  - Split: `val_paths` when given, else each example goes to val with probability `val_fraction`
    by a seeded hash of its text (stable when files are reordered).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.context import DataContext

from mtnlg_ray.config import SftDataConfig
from mtnlg_ray.data.chat import IGNORE, ROLES, encode_chat
from mtnlg_ray.data.code_task import python_files
from mtnlg_ray.data.stdlib_tasks import TASKS
from mtnlg_ray.data.shards import write_manifest
from mtnlg_ray.data.tokenizer import Tokenizer
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import atomic_dir

log = logging.getLogger(__name__)

ROW_GROUP = 64  # rows per Parquet row group: the unit the trainer's reader permutes per epoch
SHARD_ROWS = 4096  # rows per part-*.parquet file
SHOW_BAD = 20  # bad lines logged one by one (all are counted)
TOKEN_LIST = pa.list_(pa.int32())


# -------------------------------------------------------------------------------------- parsing
FORMATS = ('{"prompt", "response"}, OpenAI {"messages"}, ShareGPT {"conversations"}, '
           'Alpaca {"instruction", "input", "output"}')  # short: the report keeps a reason's first 200 characters
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SHAPES = {  # format -> the keys that mark it; a line with keys of two formats is ambiguous
    "prompt/response": {"prompt", "response"}, "messages": {"messages"}, "conversations": {"conversations"},
    "alpaca": {"instruction", "input", "output"},
}


def _string(obj: dict, key: str, fmt: str) -> str:
    if key not in obj:
        raise ValueError(f'missing field "{key}" (the {fmt} format)')
    if not isinstance(obj[key], str):
        raise ValueError(f'"{key}" must be a string')
    return obj[key]


def _turns(obj: dict, key: str, role_key: str, text_key: str) -> list[dict]:
    """The list under `key` as [{"role", "content"}] (extra keys such as "name" or "weight" ignored)."""
    turns = obj[key]
    if not isinstance(turns, list) or not turns or not all(isinstance(m, dict) for m in turns):
        raise ValueError(f'"{key}" must be a non-empty list of {{"{role_key}", "{text_key}"}} objects')
    roles = SHAREGPT_ROLES if key == "conversations" else {r: r for r in ROLES}
    out = []
    for i, m in enumerate(turns):
        if m.get(role_key) not in roles:
            raise ValueError(f"{key}[{i}].{role_key}: unknown role {m.get(role_key)!r} (expected one of {', '.join(roles)})")
        if not isinstance(m.get(text_key), str):
            raise ValueError(f'{key}[{i}].{text_key}: must be a string')
        out.append({"role": roles[m[role_key]], "content": m[text_key]})
    return out


def example_messages(obj) -> list[dict]:
    """The chat messages [{"role", "content"}] of one parsed JSONL object, in any accepted format
    (see FORMATS and the module docstring); ValueError names what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object (accepted: {FORMATS})")
    shapes = [name for name, keys in SHAPES.items() if keys & obj.keys()]
    if len(shapes) > 1:
        raise ValueError(f"has fields of two formats ({' and '.join(shapes)}): use one of {FORMATS}")
    if not shapes:
        fields = ", ".join(sorted(obj)[:4]) + (", ..." if len(obj) > 4 else "")
        raise ValueError(f"unknown format (fields: {fields or 'none'}); accepted: {FORMATS}")
    if shapes[0] == "messages":
        messages = _turns(obj, "messages", "role", "content")
    elif shapes[0] == "conversations":
        messages = _turns(obj, "conversations", "from", "value")
    elif shapes[0] == "alpaca":
        instruction, output = _string(obj, "instruction", "Alpaca"), _string(obj, "output", "Alpaca")
        extra = obj.get("input") or ""  # optional; often present and empty
        if not isinstance(extra, str):
            raise ValueError('"input" must be a string')
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        prompt, response = _string(obj, "prompt", '{"prompt", "response"}'), _string(obj, "response", '{"prompt", "response"}')
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    replies = [m for m in messages if m["role"] == "assistant"]
    if not replies:
        raise ValueError("no assistant message (nothing to learn)")
    if any(not m["content"].strip() for m in replies):
        raise ValueError("empty response")
    return messages


def _hash(text: str, seed: int) -> tuple[float, int]:
    """(split draw in [0, 1), order key): two independent seeded hashes of the text."""
    d = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2**64, int.from_bytes(d[8:16], "big") >> 1


# ---------------------------------------------------------------------------------- Ray Data steps
def _jsonl_rows(row: dict, split: str) -> list[dict]:
    """One file (read_binary_files row) -> one row per non-blank line: source FILE:LINE, text."""
    path = row["path"]
    out = []
    for i, raw in enumerate(row["bytes"].split(b"\n"), start=1):
        if raw.strip():
            try:
                text, error = raw.decode("utf-8"), ""
            except UnicodeDecodeError as err:
                text, error = "", f"not valid UTF-8 ({err.reason} at byte {err.start})"
            # key "": a user's repeated lines are kept (repeating an example is a way to weight it)
            out.append({"source": f"{path}:{i}", "text": text, "split": split, "error": error, "key": ""})
    return out


def _task_rows(row: dict, split: str, task: str) -> list[dict]:
    """One Python file -> one row per example of a built-in task, with its duplicate key."""
    source = row["bytes"].decode("utf-8", errors="replace")
    return [{"source": f"{row['path']}:{line}", "text": json.dumps(example), "split": split, "error": "", "key": key}
            for line, key, example in TASKS[task](row["path"], source)]


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str) -> Tokenizer:
    return Tokenizer(path)  # loaded once per Ray worker process


def _tokenize(batch: pa.Table, tokenizer_path: str, seq_len: int, overlong: str, val_fraction: float,
              seed: int) -> pa.Table:
    """Parse and encode a batch of lines. Adds: input_ids, labels (variable length), status
    (ok | truncated | overlong_dropped | bad), error, order, n_labels."""
    tok = _tokenizer(tokenizer_path)
    width = seq_len + 1
    cols = {k: [] for k in ("source", "split", "key", "status", "error", "order", "n_labels", "input_ids", "labels")}
    for source, text, split, error, key in zip(*(batch[c].to_pylist()
                                                 for c in ("source", "text", "split", "error", "key"))):
        ids, labels, status = [], [], "bad" if error else "ok"
        try:
            if not error:
                ids, labels = encode_chat(tok, example_messages(json.loads(text)))
        except (ValueError, RecursionError) as err:  # json.JSONDecodeError is a ValueError
            status, error = "bad", str(err).splitlines()[0][:200]
        if status == "ok" and len(ids) > width:
            status = "truncated" if overlong == "truncate" else "overlong_dropped"
            ids, labels = ids[:width], labels[:width]
            if status == "truncated" and all(x == IGNORE for x in labels[1:]):
                status = "overlong_dropped"  # the prompt alone fills the row: nothing left to learn
        draw, order = _hash(text, seed)
        if split == "auto":
            split = "val" if draw < val_fraction else "train"
        keep = status in ("ok", "truncated")
        for k, v in (("source", source), ("split", split), ("key", key), ("status", status), ("error", error), ("order", order),
                     ("n_labels", sum(x != IGNORE for x in labels[1:]) if keep else 0),
                     ("input_ids", ids if keep else []), ("labels", labels if keep else [])):
            cols[k].append(v)
    types = {"order": pa.int64(), "n_labels": pa.int64(), "input_ids": TOKEN_LIST, "labels": TOKEN_LIST}
    return pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})


# ---------------------------------------------------------------------------------------- packing
def pack_rows(examples, width: int, pad_id: int, packing: bool):
    """Yield (input_ids, labels) rows of exactly `width` tokens from (ids, labels) examples of <= width."""
    ids, labels = [], []
    for ex_ids, ex_labels in examples:
        if ids and (not packing or len(ids) + len(ex_ids) > width):
            pad = width - len(ids)
            yield ids + [pad_id] * pad, labels + [IGNORE] * pad
            ids, labels = [], []
        ids, labels = ids + list(ex_ids), labels + list(ex_labels)
    if ids:
        pad = width - len(ids)
        yield ids + [pad_id] * pad, labels + [IGNORE] * pad


def _write_split(rows, out: Path) -> None:
    """Write (input_ids, labels) rows as part-*.parquet files of SHARD_ROWS rows, ROW_GROUP-row groups."""
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("input_ids", TOKEN_LIST), ("labels", TOKEN_LIST)])
    writer, buf, written, part = None, [], 0, 0

    def flush():
        nonlocal writer, written, part
        if writer is None:
            writer = pq.ParquetWriter(out / f"part-{part:05d}.parquet", schema)
        writer.write_table(pa.table({"input_ids": pa.array([r[0] for r in buf], TOKEN_LIST),
                                     "labels": pa.array([r[1] for r in buf], TOKEN_LIST)}, schema=schema))
        written += len(buf)
        buf.clear()
        if written % SHARD_ROWS == 0:
            writer.close()
            writer, part = None, part + 1

    for row in rows:
        buf.append(row)
        if len(buf) == ROW_GROUP:
            flush()
    if buf:
        flush()
    if writer is not None:
        writer.close()


# ---------------------------------------------------------------------------------------- driver
def _expand(paths: list[str], key: str) -> list[str]:
    files: list[str] = []
    for p in paths:
        if any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p, recursive=True))
        elif Path(p).is_dir():
            hits = sorted(str(f) for f in Path(p).rglob("*.jsonl"))
        else:
            hits = [p] if Path(p).is_file() else []
        if not hits:
            raise UserError(f"sft.{key}: {p}: no such file (or no .jsonl files there)")
        files += hits
    return [str(Path(f).resolve()) for f in files]  # Ray tasks may run in another working directory


def _read(cfg: SftDataConfig) -> ray.data.Dataset:
    """One row per example line: source (FILE:LINE), text (JSON), split (train | val | auto)."""
    if cfg.task in TASKS:
        files = python_files(cfg.train_paths)
        if not files:
            raise UserError(f"sft.train_paths: no .py files found in {cfg.train_paths or 'the standard library'}")
        inputs = [(files, "auto", functools.partial(_task_rows, task=cfg.task))]
    else:
        if not cfg.train_paths:
            raise UserError("sft.train_paths: no JSONL files given")
        inputs = [(_expand(cfg.train_paths, "train_paths"), "train" if cfg.val_paths else "auto", _jsonl_rows)]
        if cfg.val_paths:
            inputs.append((_expand(cfg.val_paths, "val_paths"), "val", _jsonl_rows))
    parts = []
    for files, split, fn in inputs:
        ds = ray.data.read_binary_files(files, include_paths=True).flat_map(fn, fn_kwargs={"split": split})
        parts.append(ds.limit(cfg.max_examples) if cfg.max_examples else ds)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _drop_duplicates(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first row of each non-empty key (rows are in file and source order); return the count dropped."""
    seen: set[str] = set()
    keep = []
    for key in table["key"].to_pylist():
        keep.append(not key or key not in seen)
        seen.add(key)
    return table.filter(pa.array(keep)), keep.count(False)


def _check_bad(report: list[dict], cfg: SftDataConfig) -> int:
    """Log bad lines with FILE:LINE; raise when more than max_bad_fraction are bad. Returns the count."""
    bad = [r for r in report if r["status"] == "bad"]
    for r in bad[:SHOW_BAD]:
        log.warning("sft: skipped %s: %s", r["source"], r["error"])
    if len(bad) > SHOW_BAD:
        log.warning("sft: ... and %d more bad lines", len(bad) - SHOW_BAD)
    if not report:
        raise UserError("sft: the input holds no examples")
    if len(bad) > cfg.max_bad_fraction * len(report):
        first = bad[0]
        raise UserError(f"{first['source']}: {first['error']} ({len(bad)} of {len(report)} lines bad, more than "
                        f"sft.max_bad_fraction={cfg.max_bad_fraction})")
    return len(bad)


def prepare_sft(cfg: SftDataConfig, tokenizer_path: str | Path, out_dir: str | Path) -> dict:
    """Tokenize, mask, pack and write the fine-tuning dataset directory; return its manifest."""
    tok = Tokenizer(tokenizer_path)
    for piece in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        tok.token_id(piece)  # a tokenizer without role tokens cannot render the chat template
    DataContext.get_current().execution_options.preserve_order = True  # same files -> same dataset
    examples = _read(cfg).map_batches(
        _tokenize, batch_format="pyarrow", batch_size=256,
        fn_kwargs=dict(tokenizer_path=str(tok.path), seq_len=cfg.seq_len, overlong=cfg.overlong,
                       val_fraction=cfg.val_fraction, seed=cfg.seed))
    refs = examples.to_arrow_refs()  # runs the pipeline; fine-tuning sets fit in the driver from here on
    tables = [t for t in ray.get(refs) if t.num_rows]
    table = pa.concat_tables(tables) if tables else None
    n_duplicates = 0
    if table is not None:
        table, n_duplicates = _drop_duplicates(table)
    report = table.select(["source", "split", "status", "error"]).to_pylist() if table is not None else []
    n_bad = _check_bad(report, cfg)
    kept = pc.is_in(table["status"], pa.array(["ok", "truncated"]))
    sft_report = {
        "task": cfg.task, "lines": len(report) + n_duplicates, "duplicates": n_duplicates, "bad": n_bad,
        "truncated": sum(r["status"] == "truncated" for r in report),
        "overlong_dropped": sum(r["status"] == "overlong_dropped" for r in report),
        "packing": cfg.packing, "overlong": cfg.overlong,
        "bad_lines": [f"{r['source']}: {r['error']}" for r in report if r["status"] == "bad"][:SHOW_BAD],
    }
    splits = {s: table.filter(pc.and_(kept, pc.equal(table["split"], s))) for s in ("train", "val")}
    if splits["train"].num_rows == 0:
        raise UserError("sft: no usable training example (all bad or over-long; see the warnings above)")
    width = cfg.seq_len + 1
    with atomic_dir(out_dir) as tmp:
        extra = {}
        for name, part in splits.items():
            part = part.take(pa.array(np.argsort(part["order"].to_numpy(), kind="stable")))  # seeded shuffle
            pairs = zip(part["input_ids"].to_pylist(), part["labels"].to_pylist())
            _write_split(pack_rows(pairs, width, tok.pad_id, cfg.packing), tmp / name)
            extra[name] = {"examples": part.num_rows, "label_tokens": int(pc.sum(part["n_labels"]).as_py() or 0)}
        (tmp / "tokenizer.model").write_bytes(tok.path.read_bytes())
        manifest = write_manifest(tmp, tok.sha256, tok.vocab_size, tok.eod_id, cfg.seq_len, extra_splits=extra,
                                  sft=sft_report, config=cfg.model_dump(mode="json"))
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    log.info("sft: %d lines, %d duplicates, %d bad, %d truncated, %d over-long dropped; train %d examples -> %d "
             "rows, val %d -> %d", len(report) + n_duplicates, n_duplicates, n_bad, sft_report["truncated"], sft_report["overlong_dropped"], train["examples"],
             train["rows"], val["examples"], val["rows"])
    return manifest
