"""Cleaning: normalisation, length filter, exact and near-duplicate removal, report, bad-input budget."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from mtnlg_ray.config import CleanConfig, CorpusConfig
from mtnlg_ray.data.clean import clean_corpus, normalize, shingles, signature
from mtnlg_ray.data.readers import read_corpus
from mtnlg_ray.errors import ConfigError, UserError

VOCAB = [f"w{i}" for i in range(3000)]


def doc(rng: random.Random, n: int = 300) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def edit(words: list[str], rng: random.Random, k: int) -> list[str]:
    """`k` words replaced at random positions (a near duplicate)."""
    out = list(words)
    for i in rng.sample(range(len(out)), k):
        out[i] = "changed"
    return out


def jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / len(sa | sb)


def test_normalize_nfc_and_control_chars():
    assert normalize("cafe\u0301") == "caf\u00e9"  # NFC composes the accent
    assert normalize("a\x00b\x1bc\x7fd\r\ne\tf\x0cg") == "abcd\ne\tfg"


def test_signature_estimates_jaccard():
    rng = random.Random(0)
    a = doc(rng)
    b = edit(a, rng, 4)
    sa, sb = signature(" ".join(a), 5, 256), signature(" ".join(b), 5, 256)
    assert sa.dtype == np.uint32 and sa.shape == (256,)
    true = jaccard(" ".join(a), " ".join(b))
    assert abs((sa == sb).mean() - true) < 0.1


def _jsonl(tmp_path, records: list[str], name="docs.jsonl"):
    """`records`: raw JSONL lines."""
    f = tmp_path / name
    f.write_text("\n".join(records) + "\n")
    return f


def test_exact_and_near_duplicates_dropped_unrelated_kept(ray_session, tmp_path):
    rng = random.Random(1)
    a, c, d = doc(rng), doc(rng), doc(rng)
    near_a = edit(a, rng, 3)  # a few words changed
    assert jaccard(" ".join(a), " ".join(near_a)) > 0.85
    texts = [" ".join(a), " ".join(c), " ".join(near_a), " ".join(d), " ".join(c), "short"]
    f = _jsonl(tmp_path, [json.dumps({"text": t}) for t in texts])
    kept, report = clean_corpus(read_corpus(CorpusConfig(kind="jsonl", paths=[str(f)])), CleanConfig(min_chars=64))
    kept_texts = sorted((r["doc_id"], r["text"]) for r in kept.take_all())
    assert [t for _, t in kept_texts] == [" ".join(a), " ".join(c), " ".join(d)]  # the first of each cluster
    assert report["documents_read"] == 6 and report["documents_kept"] == 3
    assert report["dropped"]["exact_duplicate"] == 1 and report["dropped"]["near_duplicate"] == 1
    assert report["dropped"]["too_short"] == 1 and report["bad_records"] == 0


def test_unrelated_documents_sharing_a_topic_are_kept(ray_session, tmp_path):
    rng = random.Random(2)
    base = doc(rng)
    half = base[:150] + doc(rng, 150)  # Jaccard ~0.3 with base: related, not a duplicate
    assert jaccard(" ".join(base), " ".join(half)) < 0.5
    f = _jsonl(tmp_path, [json.dumps({"text": " ".join(x)}) for x in (base, half)])
    kept, report = clean_corpus(read_corpus(CorpusConfig(kind="jsonl", paths=[str(f)])), CleanConfig())
    assert report["documents_kept"] == 2 and kept.count() == 2


def test_exact_only_and_length_filter(ray_session, tmp_path):
    rng = random.Random(3)
    a = " ".join(doc(rng, 50))
    near = " ".join(edit(a.split(), rng, 1))
    f = _jsonl(tmp_path, [json.dumps({"text": t}) for t in (a, a + "\r\n", near, "x" * 10, "y" * 5000, "  \n ")])
    cfg = CleanConfig(near_dedup=False, min_chars=20, max_chars=1000)
    kept, report = clean_corpus(read_corpus(CorpusConfig(kind="jsonl", paths=[str(f)])), cfg)
    # "a\r\n" normalises to "a\n", a different text, so exact dedup keeps it; the near copy stays too
    assert report["dropped"] == {"malformed_json": 0, "missing_field": 0, "binary": 0, "empty": 1, "too_short": 1,
                                 "too_long": 1, "exact_duplicate": 0, "near_duplicate": 0}
    assert kept.count() == 3
    f2 = _jsonl(tmp_path, [json.dumps({"text": t}) for t in (a, "\u00e9" + a, "e\u0301" + a)], "nfc.jsonl")
    kept, report = clean_corpus(read_corpus(CorpusConfig(kind="jsonl", paths=[str(f2)])), cfg)
    assert report["dropped"]["exact_duplicate"] == 1  # equal after NFC


def test_bad_records_reported_and_budget(ray_session, tmp_path):
    rng = random.Random(4)
    good = [json.dumps({"text": " ".join(doc(rng, 40))}) for _ in range(8)]
    lines = good[:3] + ["{broken"] + good[3:6] + [json.dumps({"title": "x"})] + good[6:]
    f = _jsonl(tmp_path, lines)
    ds = read_corpus(CorpusConfig(kind="jsonl", paths=[str(f)]))
    kept, report = clean_corpus(ds, CleanConfig(max_bad_fraction=0.25))
    assert report["dropped"]["malformed_json"] == 1 and report["dropped"]["missing_field"] == 1
    assert report["bad_records"] == 2 and report["documents_kept"] == 8
    assert report["bad_examples"][0].startswith(f"{f}:4: not valid JSON")
    assert report["bad_examples"][1] == f"{f}:8: field 'text' missing"
    with pytest.raises(UserError, match=r"2 of 10 records are bad \(20.0% > clean.max_bad_fraction=5.0%\); first: .*:4:"):
        clean_corpus(ds, CleanConfig(max_bad_fraction=0.05))


def test_invalid_utf8_counted(ray_session, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a line with a bad byte \xff in it, long enough\n" + b"a clean line that is long enough to keep\n")
    ds = read_corpus(CorpusConfig(kind="text", text_mode="line", paths=[str(f)]))
    kept, report = clean_corpus(ds, CleanConfig(min_chars=10, max_bad_fraction=0.5))
    assert report["utf8_replaced"] == 1 and report["documents_kept"] == 2
    assert report["bad_examples"] == [f"{f}:1: invalid UTF-8 replaced by U+FFFD"]
    assert any("\ufffd" in r["text"] for r in kept.take_all())
    with pytest.raises(UserError, match="1 of 2 records are bad"):
        clean_corpus(ds, CleanConfig(min_chars=10, max_bad_fraction=0.1))


def test_empty_after_cleaning_names_the_filters_and_keys(ray_session, tmp_path):
    """A filter's setting that removes every document is a ConfigError (exit 2) naming the key."""
    f = _jsonl(tmp_path, [json.dumps({"text": t}) for t in ("tiny", "small", "x" * 2000)])
    with pytest.raises(ConfigError) as err:
        clean_corpus(read_corpus(CorpusConfig(kind="jsonl", paths=[str(f)])), CleanConfig(min_chars=64, max_chars=1000))
    assert str(err.value) == ("corpus: cleaning removed all 3 documents: 2 shorter than clean.min_chars=64 (lower "
                              "clean.min_chars), 1 longer than clean.max_chars=1000 (raise clean.max_chars)")
    # records that are empty or broken are the data's fault, not a setting's: exit 1
    f = _jsonl(tmp_path, [json.dumps({"text": " \n "}), "{broken"], "bad.jsonl")
    with pytest.raises(UserError, match=r"val_corpus: cleaning removed all 2 documents: 1 not valid JSON, 1 empty or "
                                        r"blank; first: .*bad.jsonl:2: not valid JSON") as err:
        clean_corpus(read_corpus(CorpusConfig(kind="jsonl", paths=[str(f)])), CleanConfig(max_bad_fraction=1),
                     "val_corpus")
    assert not isinstance(err.value, ConfigError)
