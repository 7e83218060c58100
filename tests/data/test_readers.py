"""Corpus readers: every kind and document mode, paths / dirs / globs / URIs, and bad input."""

from __future__ import annotations

import gzip
import random
import shutil
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtnlg_ray.config import CorpusConfig
from mtnlg_ray.data.readers import Record, corpus_files, iter_records, read_corpus, resolve_paths, stdlib_files
from mtnlg_ray.errors import UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "corpus"


def texts(path, kind, **kw):
    return [r.text for r in iter_records(str(path), kind, **kw)]


def test_text_modes():
    para = ASSETS / "paragraphs.txt"
    whole = texts(para, "text", text_mode="file")
    assert whole == [para.read_text()]
    paragraphs = list(iter_records(str(para), "text", text_mode="paragraph"))
    assert [r.line for r in paragraphs] == [1, 4, 7]
    assert paragraphs[1].text.startswith("In winter") and paragraphs[1].text.endswith("wade across it.")
    lines = list(iter_records(str(ASSETS / "lines.txt"), "text", text_mode="line"))
    assert [(r.line, r.text) for r in lines] == [(1, "first line: a document on its own"),
                                                 (2, "second line: another document"),
                                                 (4, "third line after a blank line")]


def test_jsonl_field_and_bad_lines():
    recs = list(iter_records(str(ASSETS / "records.jsonl"), "jsonl", text_field="body"))
    assert [(r.line, r.status) for r in recs] == [(1, ""), (2, ""), (3, "malformed_json"), (4, "missing_field"),
                                                  (6, "missing_field"), (7, "")]
    assert recs[0].text.startswith("A record whose text lives in the body field")
    assert "not valid JSON" in recs[2].note and "'body' missing" in recs[3].note and "not a string" in recs[4].note


def test_parquet_column_and_missing_column(tmp_path):
    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["one document", None, "three"], "n": [1, 2, 3]}), f)
    recs = list(iter_records(str(f), "parquet", text_field="content"))
    assert [(r.text, r.status) for r in recs] == [("one document", ""), ("", "missing_field"), ("three", "")]
    with pytest.raises(UserError, match="no column 'text'"):
        read_corpus(CorpusConfig(kind="parquet", paths=[str(f)]))


def test_invalid_utf8_is_replaced_and_flagged(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"caf\xe9 au lait\nfine line\n")
    recs = list(iter_records(str(f), "text", text_mode="line"))
    assert recs[0].text == "caf\ufffd au lait" and recs[0].utf8_replaced
    assert recs[1].text == "fine line" and not recs[1].utf8_replaced


def test_paths_dirs_globs_uris_and_compression(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    shutil.copy(ASSETS / "records.jsonl", d / "a.jsonl")
    with gzip.open(d / "sub" / "b.jsonl.gz", "wb") as g:
        g.write((ASSETS / "records.jsonl").read_bytes())
    (d / "notes.txt").write_text("not jsonl")
    (d / ".hidden.jsonl").write_text("{}")
    assert resolve_paths([str(d)], "jsonl") == [str(d / "a.jsonl"), str(d / "sub" / "b.jsonl.gz")]
    assert resolve_paths([str(d / "**" / "*.gz")], "jsonl") == [str(d / "sub" / "b.jsonl.gz")]
    assert resolve_paths([f"file://{d / 'a.jsonl'}"], "jsonl") == [f"file://{d / 'a.jsonl'}"]
    # a gzip file and a file:// URI read like the plain file
    plain = texts(d / "a.jsonl", "jsonl", text_field="body")
    assert texts(d / "sub" / "b.jsonl.gz", "jsonl", text_field="body") == plain
    assert texts(f"file://{d / 'a.jsonl'}", "jsonl", text_field="body") == plain


def test_missing_paths_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"corpus.paths: .*nope.txt: no such file or directory"):
        resolve_paths([str(tmp_path / "nope.txt")], "text")
    with pytest.raises(UserError, match="matches no file"):
        resolve_paths([str(tmp_path / "*.jsonl")], "jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no jsonl file"):
        resolve_paths([str(tmp_path / "empty")], "jsonl")


def test_stdlib_corpus_sorted_without_tests():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [Path(f).relative_to(root) for f in files]
    assert len(files) > 300 and Path("textwrap.py") in rel and Path("json/decoder.py") in rel
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(p.parts) for p in rel)
    assert not any(p.name.startswith("test_") for p in rel)
    assert [p.as_posix() for p in rel] == sorted(p.as_posix() for p in rel)
    assert corpus_files(CorpusConfig(kind="stdlib", max_files=5)) == files[:5]


def test_read_corpus_on_ray(ray_session):
    rows = sorted(read_corpus(CorpusConfig(kind="jsonl", paths=[str(ASSETS / "records.jsonl")], text_field="body"))
                  .take_all(), key=lambda r: r["doc_id"])
    assert [r["status"] for r in rows] == ["", "", "malformed_json", "missing_field", "missing_field", ""]
    assert [r["source"] for r in rows][2] == f"{ASSETS / 'records.jsonl'}:3"
    assert len({r["doc_id"] for r in rows}) == 6
    both = read_corpus(CorpusConfig(kind="text", text_mode="line", paths=[str(ASSETS / "lines.txt"), str(ASSETS)]))
    rows = both.take_all()
    assert len({r["source"].rsplit(":", 1)[0] for r in rows}) == 3  # lines.txt, given twice, is read once
    assert len({r["doc_id"] for r in rows}) == len(rows) == 3 + 6 + 6


def test_binary_files_are_one_binary_record(tmp_path):
    rng = random.Random(0)
    (tmp_path / "random.txt").write_bytes(rng.randbytes(4096))
    (tmp_path / "utf16.txt").write_text("plain words " * 50, encoding="utf-16")
    (tmp_path / "noise.jsonl").write_bytes(bytes(rng.randrange(0x80, 0xC0) for _ in range(3000)))  # no NUL
    with gzip.open(tmp_path / "random.txt.gz", "wb") as g:
        g.write(rng.randbytes(4096))
    for name, kind, note in [("random.txt", "text", "binary content (NUL bytes)"),
                             ("utf16.txt", "text", "binary content (NUL bytes)"),
                             ("random.txt.gz", "text", "binary content (NUL bytes)"),
                             ("noise.jsonl", "jsonl", "binary content (100% of the characters are not valid UTF-8)")]:
        for mode in ("file", "line"):
            assert list(iter_records(str(tmp_path / name), kind, text_mode=mode)) == [
                Record("", 1, "binary", note)], (name, mode)
    # text with a few stray Latin-1 bytes stays a document (its bytes replaced and counted)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait, in a sentence of plain words\n".encode("latin-1") * 20)
    (rec,) = iter_records(str(tmp_path / "latin1.txt"), "text")
    assert rec.status == "" and rec.utf8_replaced and rec.text.count("\ufffd") == 20


def test_an_empty_file_is_one_empty_document(ray_session, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert list(iter_records(str(tmp_path / "empty.jsonl"), "jsonl")) == []
    rows = read_corpus(CorpusConfig(kind="jsonl", paths=[str(tmp_path)])).take_all()
    assert sorted((r["source"], r["text"], r["status"]) for r in rows) == [
        (f"{tmp_path / 'blank.jsonl'}:1", "", ""), (f"{tmp_path / 'empty.jsonl'}:1", "", "")]
