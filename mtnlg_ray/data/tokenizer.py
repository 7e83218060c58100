"""SentencePiece tokenizer: train on a sample of the cleaned corpus, or load a `.model` file.

Trained models are lossless for source code: identity normalisation, no dummy prefix, no
whitespace collapsing, whitespace-only pieces allowed, byte fallback for anything unseen
(newlines and indentation survive `decode(encode(text))` exactly). Training sees all of the sampled
text: documents are fed as sentences under max_sentence_length, cut at word starts (`training_sentences`).

Long documents are encoded in segments cut at word starts (`encode_documents`): SentencePiece's
BPE cost per character grows with the input's length (a priority queue over all of its symbol
pairs; the stdlib's 756 KB `pydoc_data/topics.py` costs twice the average per character), and one
giant document would hold one core while the others idle. The cut is exact, not an approximation:
see `cuts_are_exact`.

Special tokens (fixed ids so every stage agrees):
    0 <pad>            padding
    1 <unk>            unknown (unused with byte_fallback)
    2 <|endoftext|>    end of document (EOD), appended after every document when packing
    <|system|> <|user|> <|assistant|> <|end|>   chat role markers (see data/chat.py)
`Tokenizer.encode` reads every one of them written in the text as that token (as Hugging Face
tokenizers and vLLM do: `"<|endoftext|>def"` is EOD then `def`); `parse_special=False` is the reading
preprocessing gives a corpus (SentencePiece alone: `<pad>`, `<unk>` and `<|endoftext|>` are plain
characters there, the role markers, SentencePiece's user-defined symbols, are still recognised).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import file_sha256

PAD, UNK, EOD = "<pad>", "<unk>", "<|endoftext|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
WORD_START = re.compile(r"(?<=[^ ]) ")  # a space after a non-space: where SentencePiece begins a word
SPACE = "\u2581"  # SentencePiece's escaped space


def cuts_are_exact(model: bytes) -> bool:
    """Whether encoding a text equals concatenating the encodings of its parts cut at word starts.

    True for models that never see a cut: identity normalisation (no dummy prefix, no whitespace
    collapsing: both would change a part's edges), whitespace as a word's prefix, and no vocabulary
    piece (user-defined symbols included) with a word start inside it (a non-space followed by a
    space). Then no piece spans a cut, so BPE's merges on one side never touch the other (each
    merge makes a vocabulary piece) and the encodings are independent: every model we train
    (`train_tokenizer`). Unigram models are never cut: their Viterbi scores would decompose too,
    but float ties could break differently.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type not in (trainer.BPE, trainer.CHAR) or trainer.treat_whitespace_as_suffix:
        return False
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or norm.precompiled_charsmap:
        return False
    return not any(re.search(f"[^{SPACE}]{SPACE}", p.piece) for p in proto.pieces)


def encode_documents(sp: spm.SentencePieceProcessor, texts: list[str], exact_cuts: bool, num_threads: int = 1,
                     segment_chars: int = 4096) -> list[np.ndarray]:
    """int32 ids of each text followed by EOD (the model's eos), in one batch call on `num_threads`.

    With `exact_cuts` (`cuts_are_exact` of the model), texts longer than 2 * `segment_chars` are
    cut at the first word start after every `segment_chars` characters and the parts encoded as
    separate items of the batch: the same ids, faster, and spread evenly over the threads.
    """
    parts, owner = [], []
    for i, text in enumerate(texts):
        start = 0
        while exact_cuts and len(text) - start > 2 * segment_chars:
            cut = WORD_START.search(text, start + segment_chars)
            if cut is None:
                break
            parts.append(text[start:cut.start()])
            owner.append(i)
            start = cut.start()
        parts.append(text[start:])
        owner.append(i)
    ids = sp.encode(parts, return_type="numpy", num_threads=num_threads)
    eod = np.array([sp.eos_id()], np.int32)
    docs: list[list[np.ndarray]] = [[] for _ in texts]
    for i, part in zip(owner, ids):
        docs[i].append(part)
    return [np.concatenate([*d, eod]).astype(np.int32, copy=False) for d in docs]


class Tokenizer:
    """A loaded SentencePiece model with the helpers the rest of the system uses."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise UserError(f"{self.path}: not a SentencePiece model ({err})") from None
        self.sha256 = file_sha256(self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self.special_tokens = special_pieces(self.path.read_bytes())
        self._special_re = special_pattern(self.special_tokens)

    def token_id(self, piece: str) -> int:
        """The id of a special piece; an error if this tokenizer lacks it."""
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != UNK:
            raise UserError(f"{self.path}: tokenizer has no {piece!r} token")
        return i

    def encode(self, text: str, return_tensors: str | None = None, parse_special: bool = True):
        """Token ids of `text` (no EOD added); return_tensors="pt" gives a (1, T) LongTensor.

        Special tokens written in the text are those tokens (`parse_special=False`: only the role
        markers, as preprocessing reads a corpus). Cutting the text at them is exact: SentencePiece
        never merges across a user-defined symbol either."""
        if parse_special and "<" in text:
            ids = split_special(text, self._special_re, self.special_tokens, self.sp.encode)
        else:
            ids = self.sp.encode(text)
        if return_tensors == "pt":
            import torch  # lazily: Ray Data tokenizer tasks never pay torch's import time

            return torch.tensor([ids], dtype=torch.long)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str | list[str]:
        """Text of a list of ids or a 1-D tensor; a 2-D tensor / list of lists gives a list of texts."""
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.decode(row) for row in ids]
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token `i` adds to decoded text: one byte for a byte-fallback piece <0xNN>,
        none for control tokens (EOD, padding: decoding drops them), SentencePiece's ' ⁇ ' for <unk>."""
        sp = self.sp
        if sp.is_byte(i):
            return bytes([int(sp.id_to_piece(i)[3:5], 16)])
        if sp.is_control(i):
            return b""
        return sp.decode([i]).encode("utf-8") if sp.is_unknown(i) else sp.id_to_piece(i).replace(SPACE, " ").encode()


def special_pieces(model: bytes) -> dict[str, int]:
    """{piece: id} of a SentencePiece model's special tokens: control (pad, EOD), unknown, user-defined."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    kinds = (proto.SentencePiece.CONTROL, proto.SentencePiece.UNKNOWN, proto.SentencePiece.USER_DEFINED)
    return {p.piece: i for i, p in enumerate(proto.pieces) if p.type in kinds}


def special_pattern(specials: dict[str, int]) -> re.Pattern | None:
    """One regex matching any of `specials`, longest first (so `<|end|>` never cuts `<|endoftext|>`)."""
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def split_special(text: str, pattern: re.Pattern | None, specials: dict[str, int], encode) -> list[int]:
    """Ids of `text` with every special token written in it read as that token, the rest by `encode`."""
    if pattern is None:
        return encode(text)
    ids: list[int] = []
    start = 0
    for m in pattern.finditer(text):
        if m.start() > start:
            ids += encode(text[start:m.start()])
        ids.append(specials[m.group()])
        start = m.end()
    if start < len(text):
        ids += encode(text[start:])
    return ids


def training_sentences(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Each non-empty document, cut into parts of at most `max_bytes` (>= 4) UTF-8 bytes that join back into it.

    SentencePiece skips a sentence longer than its max_sentence_length (counted in bytes) whole, so
    uncut, a long document's text would never reach the trainer; cut, all of it does but a document's
    final line breaks (the trainer strips them from every sentence). See `_sentence_cut` for where.
    """
    for doc in docs:
        data = doc.encode("utf-8")
        start = 0
        while len(data) - start > max_bytes:
            cut = _sentence_cut(data, start, max_bytes)
            yield data[start:cut].decode("utf-8")
            start = cut
        if start < len(data):
            yield data[start:].decode("utf-8")


LINE_BREAKS = b"\n\r"  # the trainer strips these from the end of a sentence: no part may end with one


def _sentence_cut(data: bytes, start: int, max_bytes: int) -> int:
    """Where the part of `data` from `start` ends: in (start, start + max_bytes], at a character.

    The last word start (a space after a character other than a space or line break) that fits: the
    trainer splits its sentences into words there anyway, so a BPE or char model counts the same
    words as from the whole document. A part without one (one huge token or run of whitespace) ends
    before its last line break, else before a character. A space byte never occurs inside a
    multi-byte character, nor a line break, so every such cut falls between characters.
    """
    end = start + max_bytes + 1  # rfind's exclusive end: a cut at start + max_bytes is allowed
    while (i := data.rfind(b" ", start + 1, end)) > start:
        while i > start and data[i - 1] == 0x20:  # back to the start of the run of spaces
            i -= 1
        if i > start and data[i - 1] not in LINE_BREAKS:
            return i
        end = i
    i = data.rfind(b"\n", start + 1, start + max_bytes + 1)
    while i > start and data[i - 1] in LINE_BREAKS:
        i -= 1
    if i > start:
        return i
    i = start + max_bytes
    while data[i] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back to its lead byte (max_bytes >= 4)
        i -= 1
    return i


def train_tokenizer(
    docs: Iterable[str],
    out_path: str | Path,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentence_length: int = 8192,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    """Train a SentencePiece model on `docs`, write `out_path`.

    Every character of `docs` reaches the trainer: documents are cut into sentences of at most
    `max_sentence_length` bytes (`training_sentences`). `vocab_size` is exact for bpe and unigram; a
    char model ignores it and has one piece per character kept by `character_coverage` (the share
    of the sample's characters that get a piece; the rarest rest become byte pieces with
    `byte_fallback`, else <unk>), plus the specials and 256 byte pieces: read `Tokenizer.vocab_size`.
    """
    sentences = list(training_sentences(docs, max_sentence_length))
    if not sentences:
        raise UserError("tokenizer: no documents to train on (the cleaned corpus is empty)")
    buf = io.BytesIO()
    kwargs = dict(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=2,
        pad_piece=PAD, unk_piece=UNK, eos_piece=EOD,
        user_defined_symbols=list(ROLE_TOKENS),
        max_sentence_length=max_sentence_length,
        minloglevel=2,
    )
    if model_type == "char":
        # SentencePiece would stop a char model at its default vocab_size (8000) without use_all_vocab
        kwargs.pop("vocab_size")
        kwargs.update(hard_vocab_limit=False, use_all_vocab=True)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as err:
        raise UserError(f"tokenizer: SentencePiece training failed: {str(err).splitlines()[-1]}") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out)
    return Tokenizer(out)


def find_tokenizer(directory: str | Path) -> Path | None:
    """The tokenizer inside a checkpoint or model directory, None when there is none: a Hugging Face
    tokenizer.json (what transformers reads), or the tokenizer.model beside it when the json is
    exactly its conversion (as an HF export writes them); else tokenizer.model (SentencePiece); else
    the directory itself when it holds GPT-2's vocab.json + merges.txt."""
    d = Path(directory)
    model, fast = d / "tokenizer.model", d / "tokenizer.json"
    if fast.is_file():
        from mtnlg_ray.data.tokenizer_json import is_conversion

        return model if model.is_file() and is_conversion(fast, model) else fast
    if model.is_file():
        return model
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return d
    return None


def load_tokenizer(source: str | Path):
    """A Tokenizer for a `.model` file, an HFTokenizer for a tokenizer.json, or a GPT2BPETokenizer for
    a directory with vocab.json + merges.txt."""
    p = Path(source)
    if p.is_dir():
        # imported here: gpt2_bpe imports torch, and this module is read before torch starts (CLI checks)
        from mtnlg_ray.data.gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer(p)
    if p.suffix == ".json":
        from mtnlg_ray.data.tokenizer_json import HFTokenizer

        return HFTokenizer(p)
    return Tokenizer(p)


def copy_tokenizer(source: str | Path, out_dir: str | Path) -> None:
    """Copy a tokenizer (as found by `find_tokenizer`) into a checkpoint directory; a tokenizer.json
    takes its tokenizer_config.json along (special tokens, chat template)."""
    import shutil

    src, out = Path(source), Path(out_dir)
    if src.is_dir():
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(src / name, out / name)
    elif src.suffix == ".json":
        shutil.copyfile(src, out / "tokenizer.json")
        if (src.parent / "tokenizer_config.json").is_file():
            shutil.copyfile(src.parent / "tokenizer_config.json", out / "tokenizer_config.json")
    else:
        shutil.copyfile(src, out / "tokenizer.model")
