"""Hugging Face `tokenizer.json` files (the `tokenizers` library): made from our tokenizers, and read as ours.

    from_sentencepiece(model)     a SentencePiece model's `tokenizers.Tokenizer`: the same ids as
                                  `Tokenizer.encode` (data/tokenizer.py), special tokens included
    from_gpt2_bpe(directory)      GPT-2's vocab.json + merges.txt as a byte-level BPE tokenizer.json
    to_tokenizers(path)           either, for a tokenizer as `find_tokenizer` names it
    HFTokenizer(tokenizer.json)   a tokenizer.json with the interface of our `Tokenizer`

How a SentencePiece model maps onto `tokenizers` (checked on the stdlib by tests/data/test_tokenizer_json.py):
- normalizer: SentencePiece's order: the precompiled character map (none for our identity models),
  extra spaces removed, the dummy prefix, spaces escaped to `▁`. No pre-tokenizer: SentencePiece
  encodes a text whole (its pieces never hold a word start, so nothing would be gained by splitting).
  Special tokens are matched in the raw text first and the rest is normalized piece by piece, as our
  `split_special` encodes each piece between them with its own dummy prefix. (Read with
  `parse_special=False`, SentencePiece gives text after a role marker no dummy prefix, tokenizers
  still does: models with a dummy prefix differ there; ours have none.)
- BPE (and char, a BPE without merges): SentencePiece merges the adjacent pair whose joined piece has
  the highest score, leftmost first; the merge list is every split of a normal piece into two normal
  pieces, ranked by (score, id) of the joined piece. Pairs that make one piece differ in rank, which
  matters only when two such pairs overlap, e.g. `▁` + `▁▁` and `▁▁` + `▁` within one run of spaces:
  SentencePiece then merges the leftmost, `tokenizers` the lower rank. The stdlib holds no such case for our models.
- unigram: the same Viterbi search over the same scores of normal pieces; SentencePiece adds scores
  in float32 and `tokenizers` in float64, so segmentations of (nearly) equal score, such as the
  orders of the pieces of a run of spaces, may be chosen differently. Their total score is the same.
- special tokens: control pieces (`<pad>`, `<|endoftext|>`) and `<unk>` are special (`split_special_tokens`
  reads them as text, as `parse_special=False` does); user-defined pieces (the chat role markers) are
  added tokens that are not special: SentencePiece recognises them in any text, and decoding keeps them.
- byte fallback: `<0xNN>` pieces for characters outside the vocabulary, in both.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from mtnlg_ray.data.tokenizer import EOD, SPACE
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import file_sha256

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def from_sentencepiece(model: bytes):
    """The `tokenizers.Tokenizer` that encodes as this SentencePiece model does (module docstring)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    trainer, norm, kinds = proto.trainer_spec, proto.normalizer_spec, proto.SentencePiece
    if trainer.model_type == trainer.WORD or trainer.treat_whitespace_as_suffix:
        raise UserError("tokenizer: word models and treat_whitespace_as_suffix have no tokenizer.json form; "
                        "use a bpe, unigram or char model")
    pieces = proto.pieces
    if trainer.model_type == trainer.UNIGRAM:
        # SentencePiece's lattice holds normal pieces only; tokenizers' holds every piece, so the rest
        # (`<0x0A>`, and `<|endoftext|>` read as text) get a score below any spelling of them
        normal = [p.score for p in pieces if p.type == kinds.NORMAL]
        longest = max((len(p.piece) for p in pieces if p.type != kinds.NORMAL), default=1)
        never = (min(normal, default=0.0) - 10.0) * (longest + 1)
        algorithm = Unigram([(p.piece, p.score if p.type == kinds.NORMAL else never) for p in pieces],
                            unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    else:  # BPE; a char model is a BPE without merges
        normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == kinds.NORMAL}
        ranked = sorted((rank, piece[:k], piece[k:]) for piece, rank in normal.items()
                        for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
        algorithm = BPE({p.piece: i for i, p in enumerate(pieces)}, [(a, b) for _, a, b in ranked],
                        unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    tok = Tokenizer(algorithm)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:  # spaces only: SentencePiece leaves newlines and tabs alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # not to an empty text, as SentencePiece
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_tokens([AddedToken(p.piece, special=p.type != kinds.USER_DEFINED, normalized=False)
                    for p in pieces if p.type in (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED)])
    return tok


def from_gpt2_bpe(directory: str | Path):
    """GPT-2's byte-level BPE (vocab.json + merges.txt) as transformers' GPT-2 tokenizer.json has it."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    d = Path(directory)
    vocab, merges = BPE.read_file(str(d / "vocab.json"), str(d / "merges.txt"))
    tok = Tokenizer(BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, then bytes
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if EOD in vocab:
        tok.add_special_tokens([AddedToken(EOD, special=True, normalized=False)])
    return tok


def to_tokenizers(path: str | Path):
    """The `tokenizers.Tokenizer` of a tokenizer as `find_tokenizer` names it: tokenizer.model, a
    GPT-2 directory (vocab.json + merges.txt) or a tokenizer.json (read as it is)."""
    from tokenizers import Tokenizer as Fast

    p = Path(path)
    if p.is_dir():
        return from_gpt2_bpe(p)
    if p.suffix == ".json":
        return Fast.from_file(str(p))
    return from_sentencepiece(p.read_bytes())


@lru_cache(maxsize=8)
def _converts_to(model: Path, tokenizer_json: Path, stamps: tuple) -> bool:
    try:
        return json.loads(tokenizer_json.read_text(encoding="utf-8")) == json.loads(
            from_sentencepiece(model.read_bytes()).to_str())
    except Exception:  # either unreadable (protobuf's DecodeError, JSON, I/O): tokenizer.json is read
        return False


def is_conversion(tokenizer_json: str | Path, model: str | Path) -> bool:
    """Whether `tokenizer_json` is exactly `from_sentencepiece` of the SentencePiece `model` (as an HF
    export writes them side by side), so either may be read; False if either is unreadable."""
    a, b = Path(model), Path(tokenizer_json)
    try:
        stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (a, b))  # a file rewritten is read again
    except OSError:
        return False
    return _converts_to(a, b, stamps)


@lru_cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte map (imported here: gpt2_bpe imports torch)."""
    from mtnlg_ray.data.gpt2_bpe import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


class HFTokenizer:
    """A tokenizer.json with the interface of our `Tokenizer`: `encode` reads special tokens written
    in the text as those tokens (`parse_special=False`: as text, transformers' `split_special_tokens`)
    and adds no BOS/EOS, as transformers' `add_special_tokens=False`. The end-of-document, padding
    and unknown tokens are tokenizer_config.json's `eos_token`, `pad_token`, `unk_token` beside it
    (default `<|endoftext|>`; padding defaults to it)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Fast

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: tokenizer.json not found")
        try:
            self.tk = Fast.from_file(str(self.path))
            self._literal = Fast.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"{self.path}: not a Hugging Face tokenizer.json ({err})") from None
        self._literal.encode_special_tokens = True
        self.sha256 = file_sha256(self.path)
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        added = self.tk.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items())}
        self._skipped = {i for i, t in added.items() if t.special}  # decoding drops these
        config = {}
        cpath = self.path.parent / "tokenizer_config.json"
        if cpath.is_file():
            try:
                config = json.loads(cpath.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UserError(f"{cpath}: not valid JSON ({err})") from None
        eos = _token_name(config.get("eos_token")) or EOD
        if self.tk.token_to_id(eos) is None:
            raise UserError(f"{self.path}: has no end-of-document token {eos!r} (eos_token in tokenizer_config.json)")
        self.eod_id = self.tk.token_to_id(eos)
        pad, unk = _token_name(config.get("pad_token")), _token_name(config.get("unk_token"))
        self.pad_id = self.tk.token_to_id(pad) if pad and self.tk.token_to_id(pad) is not None else self.eod_id
        unk_id = self.tk.token_to_id(unk) if unk else None
        self.unk_id = -1 if unk_id is None else unk_id
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(self.tk.to_str()).get("decoder"))

    def token_id(self, piece: str) -> int:
        """The id of a token; an error if this tokenizer lacks it."""
        i = self.tk.token_to_id(piece)
        if i is None:
            raise UserError(f"{self.path}: tokenizer has no {piece!r} token")
        return i

    def encode(self, text: str, return_tensors: str | None = None, parse_special: bool = True):
        """Token ids of `text`; return_tensors="pt" gives a (1, T) LongTensor."""
        ids = (self.tk if parse_special else self._literal).encode(text, add_special_tokens=False).ids
        if return_tensors == "pt":
            import torch

            return torch.tensor([ids], dtype=torch.long)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str | list[str]:
        """Text of a list of ids or a 1-D tensor (special tokens dropped); 2-D gives a list of texts."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.decode(row) for row in ids]
        return self.tk.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(i) or ""

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token `i` adds to decoded text (none for a special token decoding drops)."""
        if i in self._skipped:
            return b""
        piece = self.id_to_piece(i)
        if i in self.special_tokens.values():
            return piece.encode()
        if self._byte_level:
            return bytes(_byte_decoder()[c] for c in piece)
        m = BYTE_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece.replace(SPACE, " ").encode()
