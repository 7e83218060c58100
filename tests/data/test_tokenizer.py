"""SentencePiece tokenizer: training, special tokens, lossless round trip, load errors."""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path

import pytest

import numpy as np
import sentencepiece as spm

from mtnlg_ray.data.tokenizer import EOD, ROLE_TOKENS, Tokenizer, cuts_are_exact, encode_documents, train_tokenizer
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import file_sha256


def test_special_tokens_and_sha(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == 512 and tok.pad_id == 0 and tok.eod_id == 2
    assert tok.id_to_piece(tok.eod_id) == EOD
    assert len({tok.token_id(p) for p in ROLE_TOKENS}) == len(ROLE_TOKENS)
    assert tok.sha256 == file_sha256(tok.path)


def test_round_trip_is_lossless_on_code(tiny_tokenizer):
    source = (Path(sysconfig.get_paths()["stdlib"]) / "fnmatch.py").read_text()  # not in the training sample
    for text in (source, "def f(x):\n\tif x:  # tab, two spaces\n\n        return 'caf\u00e9 \u2603 \U0001f600'\n"):
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text
        assert all(0 <= i < tiny_tokenizer.vocab_size for i in ids)
    batch = tiny_tokenizer.encode_batch(["a = 1\n", "b = 2\n"])
    assert tiny_tokenizer.decode(batch) == ["a = 1\n", "b = 2\n"]


def test_train_unigram_and_errors(tmp_path):
    docs = [(Path(sysconfig.get_paths()["stdlib"]) / n).read_text() for n in ("bisect.py", "heapq.py")]
    tok = train_tokenizer(docs, tmp_path / "u.model", vocab_size=400, model_type="unigram")
    assert tok.vocab_size == 400 and tok.decode(tok.encode(docs[0])) == docs[0]
    with pytest.raises(UserError, match="no documents to train on"):
        train_tokenizer([], tmp_path / "e.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(UserError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "missing.model")


def test_documents_cut_at_word_starts_encode_to_the_same_ids(tiny_tokenizer, tmp_path):
    """encode_documents cuts long texts into parts at word starts: exactly the whole text's ids + EOD."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("fnmatch.py", "textwrap.py", "argparse.py")]
    texts += ["x" * 5000, "a  b\n" * 900 + "    " * 300, "", "<|user|> hi <|end|>" * 200]  # no word start; runs of spaces
    model = tiny_tokenizer.path.read_bytes()
    assert cuts_are_exact(model)
    sp = tiny_tokenizer.sp
    for chars in (16, 64, 4096):
        got = encode_documents(sp, texts, exact_cuts=True, num_threads=2, segment_chars=chars)
        for text, ids in zip(texts, got):
            assert ids.dtype == np.int32 and ids.tolist() == sp.encode(text) + [tiny_tokenizer.eod_id]
    # models whose encoding a cut could change are never cut
    unigram = train_tokenizer(texts[:2], tmp_path / "u.model", vocab_size=400, model_type="unigram")
    assert not cuts_are_exact(unigram.path.read_bytes())
    buf = io.BytesIO()  # SentencePiece's defaults: NFKC, a dummy prefix, collapsed whitespace
    lines = [line for t in texts[:3] for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=300, minloglevel=2)
    assert not cuts_are_exact(buf.getvalue())
