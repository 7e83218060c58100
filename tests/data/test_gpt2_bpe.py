"""GPT-2 byte-level BPE: same ids as transformers' GPT2Tokenizer on a small vocab/merges we write."""

import json

import pytest
from transformers import GPT2Tokenizer

from mtnlg_ray.data.gpt2_bpe import GPT2BPETokenizer, bytes_to_unicode
from mtnlg_ray.errors import UserError

MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ d", "e f", "Ġd ef", "r e", "t u", "r n", "re tu", "retu rn"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2tok")
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for m in MERGES:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return d


TEXTS = ["the cat in the hat", "def f(x):\n    return x  # héllo ✓", "  spaces   and\ttabs\n\n", "it's 2024, they'll go"]


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(gpt2_dir, text):
    ours = GPT2BPETokenizer(gpt2_dir)
    ref = GPT2Tokenizer(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"))
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == text


def test_end_of_text_is_special(gpt2_dir):
    tok = GPT2BPETokenizer(gpt2_dir)
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eod_id in ids and tok.decode(ids) == "a<|endoftext|>b"
    literal = tok.encode("a<|endoftext|>b", parse_special=False)  # as plain text
    assert tok.eod_id not in literal and tok.decode(literal) == "a<|endoftext|>b"
    assert b"".join(tok.token_bytes(i) for i in literal) == b"a<|endoftext|>b"


def test_missing_merges(tmp_path, gpt2_dir):
    (tmp_path / "vocab.json").write_text((gpt2_dir / "vocab.json").read_text())
    with pytest.raises(UserError, match="merges.txt: not found"):
        GPT2BPETokenizer(tmp_path)
