"""SentencePiece tokenizer: training, special tokens, lossless round trip, load errors."""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path

import pytest

import numpy as np
import sentencepiece as spm

from mtnlg_ray.data.tokenizer import (EOD, ROLE_TOKENS, Tokenizer, cuts_are_exact, encode_documents, train_tokenizer,
                                     training_sentences)
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import file_sha256


def test_special_tokens_and_sha(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == 512 and tok.pad_id == 0 and tok.eod_id == 2
    assert tok.id_to_piece(tok.eod_id) == EOD
    assert len({tok.token_id(p) for p in ROLE_TOKENS}) == len(ROLE_TOKENS)
    assert tok.sha256 == file_sha256(tok.path)


def test_special_tokens_written_in_text_are_those_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    specials = {"<pad>": 0, "<unk>": 1, EOD: 2, **{p: tok.token_id(p) for p in ROLE_TOKENS}}
    assert tok.special_tokens == specials  # every special token of the model, none other
    code = "def f():\n    return 1\n"
    for piece, i in specials.items():
        assert tok.encode(piece + code) == [i] + tok.encode(code)
        assert tok.encode(code + piece + code) == tok.encode(code) + [i] + tok.encode(code)
    # the literal reading is SentencePiece's own (as preprocessing reads a corpus): EOD as 13 characters
    assert tok.encode(EOD + code, parse_special=False) == tok.sp.encode(EOD + code)
    assert len(tok.encode(EOD, parse_special=False)) > 1
    # without control tokens in the text, both readings agree (SentencePiece splits at role markers itself)
    text = "<|user|>hi<|end|><|assistant|>" + code + "<|endoftext"
    assert tok.encode(text) == tok.encode(text, parse_special=False) == tok.sp.encode(text)
    assert tok.decode(tok.encode(code + EOD + code)) == code + code  # control tokens decode to nothing


def test_token_bytes_join_into_the_text(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "caf\u00e9 \u2603 \U0001f600 x = 1<|user|>"
    ids = tok.encode(text)
    assert any(tok.sp.is_byte(i) for i in ids)  # characters outside the vocabulary fall back to bytes
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == tok.decode(ids) == text
    assert tok.token_bytes(tok.eod_id) == b""


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


def _long_doc() -> str:
    """textwrap.py (~19k chars) with 'é' throughout (its first 8,192 characters are more than 8,192
    bytes, a sentence SentencePiece skips whole); 'λ' and 'Ж' (30 each) only after position 10,000."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().replace("e", "\u00e9", 300)
    assert len(text) > 12_000 and "\u03bb" not in text and "\u0416" not in text
    return text[:10_000] + text[10_000:].replace("the", "\u03bb\u0416", 30)


def test_long_documents_reach_the_trainer_whole(tmp_path):
    """A document over max_sentence_length (bytes) is cut at word starts, not truncated or skipped."""
    doc = _long_doc()
    parts = list(training_sentences([doc, "", "short"], 8192))
    assert "".join(parts) == doc + "short" and len(parts) > 2
    assert all(len(p.encode()) <= 8192 for p in parts)
    assert all(p[0] == " " and p[-1] not in " \n" for p in parts[1:-2])  # every cut at a word start
    assert any("\u03bb" in p for p in parts)
    tok = train_tokenizer([doc], tmp_path / "t.model", vocab_size=400)
    for ch in ("\u00e9", "\u03bb", "\u0416"):  # pieces of their own, not byte fallback
        assert tok.sp.piece_to_id(ch) != tok.sp.unk_id() and tok.sp.encode(ch, out_type=str) == [ch]
    # never after a line break (the trainer strips it from a sentence's end); parts with no word start
    # end before their last line break, else before a character (never inside one)
    assert list(training_sentences(["ab cd\n ef"], 6)) == ["ab", " cd", "\n ef"]
    assert list(training_sentences(["ab\ncd" + "\u00e9" * 4], 4)) == ["ab", "\ncd", "\u00e9\u00e9", "\u00e9\u00e9"]


def test_character_coverage_is_passed_to_sentencepiece(tmp_path):
    doc = _long_doc() + "\u03a9"  # one Ω in ~19k characters
    default = train_tokenizer([doc], tmp_path / "d.model", vocab_size=400)
    full = train_tokenizer([doc], tmp_path / "f.model", vocab_size=400, character_coverage=1.0)
    assert default.sp.piece_to_id("\u03a9") == default.sp.unk_id()  # the rarest 0.05% go to bytes
    assert full.sp.encode("\u03a9", out_type=str) == ["\u03a9"]


def test_char_model_has_one_piece_per_character(tmp_path):
    """vocab_size does not apply to a char model, not even SentencePiece's default cap of 8000."""
    text = " ab\tc\n" + "".join(chr(0x4E00 + i) for i in range(9000))
    tok = train_tokenizer([text], tmp_path / "c.model", vocab_size=64, model_type="char", character_coverage=1.0)
    specials = 3 + len(ROLE_TOKENS)  # <pad> <unk> <|endoftext|>, the role markers
    assert tok.vocab_size == len(set(text)) + specials + 256  # + the byte fallback pieces
    assert tok.decode(tok.encode(text)) == text
