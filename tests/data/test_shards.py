"""Tokenize + pack and the preprocess job end to end on local Ray: no token lost, stable split, refusals."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from mtnlg_ray.config import DatasetConfig, PreprocessJob, TrainDataConfig, load_job, shipped
from mtnlg_ray.data.dataset import open_datasets
from mtnlg_ray.train.stream import iter_batches
from mtnlg_ray.data.readers import stdlib_files
from mtnlg_ray.data.shards import TokenizePack, pack, run_preprocess
from mtnlg_ray.data.tokenizer import Tokenizer
from mtnlg_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = shipped.ROOT / "preprocess"


def _docs(n: int) -> list[str]:
    """`n` stdlib sources of 2-20 kB."""
    texts = (Path(f).read_text() for f in stdlib_files()[100:])
    return [t for t in texts if 2000 < len(t) < 20000][:n]


def _shard_ids(directory: Path) -> list[list[int]]:
    return [row for f in sorted(directory.glob("*.parquet")) for row in pq.read_table(f)["input_ids"].to_pylist()]


def test_tokenize_pack_keeps_every_token(tiny_tokenizer):
    """A tokenizer call's output: Parquet shards of full rows (at most rows_per_shard each), then the tail."""
    docs = ["x = 1\n", "def f():\n    return 2\n", "", "class A:\n    pass\n" * 7, "y = 2\n"]
    splits = ["train", "train", "train", "train", "val"]
    pack_batch = TokenizePack(tiny_tokenizer.path.read_bytes(), seq_len=8, rows_per_shard=2)
    out = pack_batch(pa.table({"text": docs, "split": splits}))
    train = out.filter(pa.compute.equal(out["split"], "train")).to_pylist()
    shards = [pq.read_table(pa.BufferReader(r["shard"]))["input_ids"].to_pylist() for r in train if r["rows"]]
    assert [len(s) for s in shards] == [r["rows"] for r in train if r["rows"]] and max(map(len, shards)) == 2
    assert all(len(row) == 9 for s in shards for row in s)
    assert [r["docs"] for r in train] == [0] * (len(train) - 1) + [4]  # counts and tail on the last row only
    stream = [i for d in docs[:4] for i in tiny_tokenizer.encode(d) + [tiny_tokenizer.eod_id]]
    tail = train[-1]["tail"]
    assert [i for s in shards for row in s for i in row] + tail == stream and len(tail) < 9
    assert train[-1]["doc_tokens"] == len(stream)
    val = out.filter(pa.compute.equal(out["split"], "val")).to_pylist()
    assert len(val) == 1 and val[0]["rows"] == 0 and val[0]["shard"] == b"" and val[0]["docs"] == 1
    assert val[0]["tail"] == tiny_tokenizer.encode(docs[4]) + [tiny_tokenizer.eod_id]


def test_pack_token_count(ray_session, tiny_tokenizer, tmp_path):
    docs = _docs(12)
    ds = ray.data.from_items([{"text": d} for d in docs], override_num_blocks=1)  # one block, cut into 4 batches
    stats = pack(ds, tiny_tokenizer.path, seq_len=32, out_root=tmp_path, rows_per_shard=50, num_workers=2,
                 batch_docs=3)["train"]
    rows = _shard_ids(tmp_path / "train")
    assert max(pq.read_metadata(f).num_rows for f in (tmp_path / "train").glob("*.parquet")) == 50
    # with room for every row in one shard: a shard per batch of 3 documents, + the packed tails
    again = pack(ds, tiny_tokenizer.path, seq_len=32, out_root=tmp_path / "big", rows_per_shard=10**6,
                 num_workers=2, batch_docs=3)["train"]
    assert again == stats and _shard_ids(tmp_path / "big" / "train") == rows
    names = [f.name for f in sorted((tmp_path / "big" / "train").glob("*"))]
    assert names == [f"part-{i:05d}.parquet" for i in range(5)]
    expected = sum(len(tiny_tokenizer.encode(d)) + 1 for d in docs)  # + EOD per document
    assert stats["documents"] == 12 and stats["doc_tokens"] == expected
    assert all(len(r) == 33 for r in rows)
    assert len(rows) * 33 + stats["dropped_tail_tokens"] == expected and stats["dropped_tail_tokens"] < 33
    # the rows hold exactly the stream's tokens (EODs included) minus the dropped tail
    stream = Counter(i for d in docs for i in tiny_tokenizer.encode(d) + [tiny_tokenizer.eod_id])
    stored = Counter(i for r in rows for i in r)
    assert not stored - stream and sum((stream - stored).values()) == stats["dropped_tail_tokens"]


def test_actor_pool_writes_the_same_shards_as_tasks(ray_session, tiny_tokenizer, tmp_path):
    """pack.compute: actors (a Ray Data actor pool, the tokenizer loaded once per actor) = tasks, byte for byte."""
    ds = ray.data.from_items([{"text": d} for d in _docs(6)], override_num_blocks=2)
    stats = {compute: pack(ds, tiny_tokenizer.path, seq_len=32, out_root=tmp_path / compute, num_workers=1,
                           batch_docs=2, compute=compute) for compute in ("tasks", "actors")}
    assert stats["tasks"] == stats["actors"] and stats["tasks"]["train"]["documents"] == 6
    files = {c: sorted((tmp_path / c / "train").glob("*.parquet")) for c in stats}
    assert [f.name for f in files["tasks"]] == [f.name for f in files["actors"]] and len(files["tasks"]) >= 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files["tasks"], files["actors"]))
    with pytest.raises(UserError, match="pack.compute: 'threads'"):
        pack(ds, tiny_tokenizer.path, seq_len=32, out_root=tmp_path / "bad", compute="threads")


def _job(tmp_path, name, *sets):
    return load_job(CONFIGS / "stdlib.yaml", PreprocessJob,
                    [f"output_dir={tmp_path / name}", "corpus.max_files=30", "tokenizer.vocab_size=600",
                     "pack.seq_len=64", "pack.val_fraction=0.2", "pack.rows_per_shard=300", *sets])


def test_preprocess_end_to_end_and_stable(ray_session, tmp_path):
    out = run_preprocess(_job(tmp_path, "a"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["seq_len"] == 64 and m["vocab_size"] == 600 and m["eod_id"] == 2
    c = m["cleaning"]
    assert c["documents_read"] == 30 and c["documents_kept"] == m["splits"]["train"]["documents"] + \
        m["splits"]["val"]["documents"] and m["splits"]["val"]["documents"] > 0
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["rows"] == sum(x["rows"] for x in s["shards"]) == len(_shard_ids(out / split))
        assert s["tokens"] + s["dropped_tail_tokens"] == s["doc_tokens"]
        assert all(pq.read_schema(out / x["path"]).field("input_ids").type == pa.list_(pa.int32()) for x in s["shards"])
    assert not list(tmp_path.glob(".a.tmp-*"))
    # the trainer's view of it
    bundle = open_datasets(TrainDataConfig(datasets=[DatasetConfig(path=str(out))]))
    assert bundle.vocab_size == 600 and bundle.train_rows == m["splits"]["train"]["rows"]
    assert next(iter_batches(bundle.train, 4))["input_ids"].shape == (4, 65)
    # a second run (loading the first run's tokenizer) makes the same split and the same shards
    again = run_preprocess(_job(tmp_path, "b", f"tokenizer.path={out / 'tokenizer.model'}"))
    m2 = json.loads((again / "manifest.json").read_text())
    assert m2["tokenizer_sha256"] == m["tokenizer_sha256"]
    for split in ("train", "val"):
        assert m2["splits"][split]["documents"] == m["splits"][split]["documents"]
        assert _shard_ids(again / split) == _shard_ids(out / split)


def test_tokenizer_vocab_mismatch_leaves_nothing(ray_session, tiny_tokenizer, tmp_path):
    job = _job(tmp_path, "bad", f"tokenizer.path={tiny_tokenizer.path}", "tokenizer.vocab_size=4096")
    with pytest.raises(UserError, match=r"tokenizer.vocab_size=4096 but .* has 512 pieces"):
        run_preprocess(job)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())


def test_char_tokenizer_reports_its_real_vocabulary(ray_session, tmp_path, caplog):
    """A char model ignores tokenizer.vocab_size (600 here): the log, a warning and the manifest say its size."""
    caplog.set_level(logging.INFO, logger="mtnlg_ray")
    out = run_preprocess(_job(tmp_path, "c", "tokenizer.model_type=char", "corpus.max_files=8"))
    n = json.loads((out / "manifest.json").read_text())["vocab_size"]
    assert n == Tokenizer(out / "tokenizer.model").vocab_size != 600
    assert "training a char tokenizer (one piece per character)" in caplog.text
    assert f"trained a char tokenizer of {n} pieces" in caplog.text
    assert "tokenizer.vocab_size=600 ignored: a char model has one piece per character" in caplog.text
    assert f"{n} pieces" in caplog.text


def test_corpus_emptied_by_a_filter_one_line_exit_2(ray_session, tmp_path):
    """`mtnlg preprocess` on one file over clean.max_chars names the filter and its key."""
    (tmp_path / "big.txt").write_text("word " * 40_001)  # 200,005 characters
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "mtnlg_ray.cli", "preprocess", str(CONFIGS / "stdlib.yaml"),
                           "--set", "corpus.kind=text", "--set", f"corpus.paths=[{tmp_path / 'big.txt'}]",
                           "--set", f"output_dir={tmp_path / 'o'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: corpus: cleaning removed all 1 documents: 1 longer than clean.max_chars=200000 "
                      "(raise clean.max_chars)"] and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]  # Ray's progress log comes before it
    assert not (tmp_path / "o").exists()


def test_jsonl_example_config_via_job_script(ray_session, tmp_path):
    """jobs/preprocess.py as `ray job submit` runs it (RAY_ADDRESS = this session's Ray)."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "jobs/preprocess.py", "--config", "jsonl_example",  # a shipped name
                           "--set", f"output_dir={tmp_path / 'j'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "j")
    assert "malformed_json=1, missing_field=1, exact_duplicate=1" in proc.stdout
    assert "example.jsonl:7: not valid JSON" in proc.stdout
    m = json.loads((tmp_path / "j" / "manifest.json").read_text())
    assert m["cleaning"]["documents_read"] == 26 and m["splits"]["train"]["rows"] > 0


def test_job_script_bad_input_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/preprocess.py", "--config", str(CONFIGS / "jsonl_example.yaml"),
                           "--set", f"corpus.paths=[{tmp_path / 'missing.jsonl'}]", "--set", f"output_dir={tmp_path}/o"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # checked before Ray is joined
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: corpus.paths: {tmp_path / 'missing.jsonl'}: no such file or directory"


def _decoded_rows(out: Path) -> str:
    tok = Tokenizer(out / "tokenizer.model")
    return "".join(tok.decode(row) for split in ("train", "val") for row in _shard_ids(out / split))


def test_an_empty_file_in_a_jsonl_corpus_counts_as_empty(ray_session, tmp_path):
    """20 good records plus an empty .jsonl: preprocessed, the empty file counted under `empty`."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(20)))
    (corpus / "empty.jsonl").write_bytes(b"")
    out = run_preprocess(_job(tmp_path, "o", "corpus.kind=jsonl", f"corpus.paths=[{corpus}]"))
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["documents_read"], c["documents_kept"], c["dropped"]["empty"], c["bad_records"]) == (21, 20, 1, 0)


def test_a_binary_file_is_dropped_not_tokenized(ray_session, tmp_path):
    """4 KB of random bytes named .txt among text files: dropped as `binary`, nowhere in the shards."""
    import random

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(_docs(12)):
        (corpus / f"doc{i:02d}.txt").write_text(text)
    (corpus / "random.txt").write_bytes(random.Random(0).randbytes(4096))
    out = run_preprocess(_job(tmp_path, "o", "corpus.kind=text", f"corpus.paths=[{corpus}]"))
    c = json.loads((out / "manifest.json").read_text())["cleaning"]
    assert (c["documents_read"], c["documents_kept"], c["dropped"]["binary"]) == (13, 12, 1)
    assert c["utf8_replaced"] == 0 and c["bad_examples"] == [f"{corpus / 'random.txt'}:1: binary content (NUL bytes)"]
    assert "\ufffd" not in _decoded_rows(out)  # no replacement character reached the tokenizer or the rows
