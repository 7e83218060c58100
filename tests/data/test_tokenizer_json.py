"""tokenizer.json from our tokenizers: the same ids as ours (SentencePiece bpe, char, unigram, a model with
SentencePiece's defaults, GPT-2 BPE), special tokens in text, decoding; reading a tokenizer.json as ours."""

from __future__ import annotations

import inspect
import io
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm

from mtnlg_ray.data.tokenizer_json import HFTokenizer, from_gpt2_bpe, from_sentencepiece
from mtnlg_ray.data.tokenizer import EOD, ROLE_TOKENS, Tokenizer, find_tokenizer, train_tokenizer, training_sentences
from mtnlg_ray.errors import UserError

EDGES = ["", " ", "  x  ", "\n\n\tdef f(x):\r\n        return 'caf\u00e9 \u2603 \U0001f600 \u6f22\u5b57'\n",
         "<|endoftext|>def<|user|>hi<|end|>  <|assistant|> x<pad><unk>", "   leading and trailing   ",
         "a<|endoftext|><|endoftext|>b<|end", "x = 1_000_000  # 123 4567\n", "<0x0A> and <0x41>: byte pieces as text",
         "".join(f"{c}{' ' * n}I\n" for n in range(1, 40) for c in "x:")]  # runs of spaces: unigram's ties


def corpus() -> list[str]:
    """Stdlib sources the tokenizers were not trained on, and edge cases (whitespace, bytes, specials)."""
    import colorsys
    import fractions
    import json.decoder
    import reprlib
    import string

    return [inspect.getsource(m) for m in (colorsys, fractions, json.decoder, reprlib, string)] + EDGES


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """{kind: Tokenizer}: the session's bpe, and char, unigram and SentencePiece-defaults models (< 1 s)."""
    root = tmp_path_factory.mktemp("hf_tok")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "heapq.py", "bisect.py")]
    out = {"bpe": tiny_tokenizer, "char": train_tokenizer(docs, root / "char.model", model_type="char"),
           "unigram": train_tokenizer(docs, root / "uni.model", vocab_size=400, model_type="unigram")}
    buf = io.BytesIO()  # SentencePiece's normalizer defaults: NFKC, a dummy prefix, extra spaces removed
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(training_sentences(docs, 8192))), model_writer=buf,
                                   model_type="bpe", vocab_size=500, byte_fallback=True,
                                   pad_id=0, unk_id=1, bos_id=-1, eos_id=2,
                                   pad_piece="<pad>", unk_piece="<unk>", eos_piece=EOD,
                                   user_defined_symbols=list(ROLE_TOKENS), minloglevel=2)
    (root / "defaults.model").write_bytes(buf.getvalue())
    out["defaults"] = Tokenizer(root / "defaults.model")
    return out


@pytest.mark.parametrize("kind", ["bpe", "char", "defaults"])
def test_sentencepiece_conversion_gives_our_ids(models, kind):
    tok = models[kind]
    fast = from_sentencepiece(tok.path.read_bytes())
    for text in corpus():
        ids = tok.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text[:60]
        if "<" not in text:  # decoding drops control tokens and keeps role markers, as SentencePiece
            assert fast.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    if kind == "defaults":  # with a dummy prefix, text after a role marker read whole differs (module docstring)
        return
    fast.encode_special_tokens = True  # transformers' split_special_tokens: our parse_special=False
    for text in EDGES:
        assert fast.encode(text, add_special_tokens=False).ids == tok.encode(text, parse_special=False), text


def test_unigram_differs_only_between_segmentations_of_equal_score(models):
    """SentencePiece adds scores in float32, tokenizers in float64: ties (the orders of the pieces of a
    run of spaces) may break differently, and nothing else (a special token read as text is spelled
    out in both: its piece would score higher)."""
    tok = models["unigram"]
    fast = from_sentencepiece(tok.path.read_bytes())
    literal = from_sentencepiece(tok.path.read_bytes())
    literal.encode_special_tokens = True
    for text in corpus():
        for parse_special, encoder in ((True, fast), (False, literal)):
            ids = tok.encode(text, parse_special=parse_special)
            theirs = encoder.encode(text, add_special_tokens=False).ids
            assert "".join(map(tok.id_to_piece, theirs)) == "".join(map(tok.id_to_piece, ids)), text[:60]
            assert sum(map(tok.sp.get_score, theirs)) == pytest.approx(sum(map(tok.sp.get_score, ids)), abs=1e-3)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2's vocab.json + merges.txt of a byte-level BPE trained on a few stdlib sources."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import models as tm
    from tokenizers import pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("gpt2")
    fast = Fast(tm.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fast.train_from_iterator(corpus()[:3], trainer)
    fast.model.save(str(d))
    return d


def test_gpt2_bpe_conversion_gives_our_ids(gpt2_dir):
    from mtnlg_ray.data.gpt2_bpe import GPT2BPETokenizer

    ours, fast = GPT2BPETokenizer(gpt2_dir), from_gpt2_bpe(gpt2_dir)
    for text in corpus()[:2] + EDGES:  # ours is pure Python: two sources suffice
        ids = ours.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text[:60]
        assert fast.decode(ids, skip_special_tokens=False) == ours.decode(ids)


def test_tokenizer_json_is_read_as_ours(models, gpt2_dir, tmp_path):
    for name, (ours, fast) in {"sp": (models["bpe"], from_sentencepiece(models["bpe"].path.read_bytes())),
                               "gpt2": (None, from_gpt2_bpe(gpt2_dir))}.items():
        d = tmp_path / name
        d.mkdir()
        fast.save(str(d / "tokenizer.json"))
        if ours is None:
            from mtnlg_ray.data.gpt2_bpe import GPT2BPETokenizer

            ours = GPT2BPETokenizer(gpt2_dir)
        else:  # as an export writes it: without it, padding would be the end of document
            (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOD, "pad_token": "<pad>"}))
        tok = HFTokenizer(d / "tokenizer.json")
        assert (tok.vocab_size, tok.eod_id, tok.pad_id) == (ours.vocab_size, ours.eod_id, ours.pad_id)
        assert tok.special_tokens == ours.special_tokens
        for text in EDGES:
            ids = tok.encode(text)
            assert ids == ours.encode(text)
            assert tok.encode(text, parse_special=False) == ours.encode(text, parse_special=False)
            kept = [i for i in ids if i not in (ours.eod_id, getattr(ours, "unk_id", -1))]  # ours: EOD text, <unk> ⁇
            assert tok.decode(ids) == ours.decode(kept)
            assert b"".join(map(tok.token_bytes, ids)) == b"".join(map(ours.token_bytes, kept))
    (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "pad_token": "<unk>"}))
    tok = HFTokenizer(tmp_path / "sp" / "tokenizer.json")
    assert (tok.eod_id, tok.pad_id) == (models["bpe"].token_id("<|end|>"), 1)
    (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(UserError, match="no end-of-document token '</s>'"):
        HFTokenizer(tmp_path / "sp" / "tokenizer.json")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="not a Hugging Face tokenizer.json"):
        HFTokenizer(tmp_path / "junk.json")


def test_a_tokenizer_json_is_preferred_unless_it_is_the_models_conversion(models, tmp_path):
    tok = models["bpe"]
    shutil.copy(tok.path, tmp_path / "tokenizer.model")
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"
    from_sentencepiece(tok.path.read_bytes()).save(str(tmp_path / "tokenizer.json"))
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"  # the same tokenizer: the model
    edited = json.loads((tmp_path / "tokenizer.json").read_text())
    edited["added_tokens"].append({**edited["added_tokens"][-1], "id": tok.vocab_size, "content": "<|tool|>"})
    (tmp_path / "tokenizer.json").write_text(json.dumps(edited))
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.json"  # what transformers would read
