"""SentencePiece tokenizer: train on a sample of the cleaned corpus, or load a `.model` file.

Trained models are lossless for source code: identity normalisation, no dummy prefix, no
whitespace collapsing, whitespace-only pieces allowed, byte fallback for anything unseen
(newlines and indentation survive `decode(encode(text))` exactly).

Long documents are encoded in segments cut at word starts (`encode_documents`): SentencePiece's
BPE cost per character grows with the input's length (a priority queue over all of its symbol
pairs; the stdlib's 756 KB `pydoc_data/topics.py` costs twice the average per character), and one
giant document would hold one core while the others idle. The cut is exact, not an approximation:
see `cuts_are_exact`.

Special tokens (fixed ids so every stage agrees):
    0 <pad>            padding
    1 <unk>            unknown (unused with byte_fallback)
    2 <|endoftext|>    end of document (EOD), appended after every document when packing
    <|system|> <|user|> <|assistant|> <|end|>   chat role markers (see data/sft.py)
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable

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

    def token_id(self, piece: str) -> int:
        """The id of a special piece; an error if this tokenizer lacks it."""
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != UNK:
            raise UserError(f"{self.path}: tokenizer has no {piece!r} token")
        return i

    def encode(self, text: str, return_tensors: str | None = None):
        """Token ids of `text` (no EOD added); return_tensors="pt" gives a (1, T) LongTensor."""
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


def train_tokenizer(
    docs: Iterable[str],
    out_path: str | Path,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentence_length: int = 8192,
) -> Tokenizer:
    """Train a SentencePiece model on `docs` (each a sentence for the trainer), write `out_path`."""
    docs = [d[:max_sentence_length] for d in docs if d]
    if not docs:
        raise UserError("tokenizer: no documents to train on (the cleaned corpus is empty)")
    buf = io.BytesIO()
    kwargs = dict(
        sentence_iterator=iter(docs),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=2,
        pad_piece=PAD, unk_piece=UNK, eos_piece=EOD,
        user_defined_symbols=list(ROLE_TOKENS),
        max_sentence_length=max_sentence_length,
        hard_vocab_limit=model_type != "char",
        minloglevel=2,
    )
    if model_type == "char":
        kwargs.pop("vocab_size")
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
    """The tokenizer inside a checkpoint or model directory: tokenizer.model (SentencePiece), or the
    directory itself when it holds GPT-2's vocab.json + merges.txt; None when there is none."""
    d = Path(directory)
    if (d / "tokenizer.model").is_file():
        return d / "tokenizer.model"
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return d
    return None


def load_tokenizer(source: str | Path):
    """A Tokenizer for a `.model` file, or a GPT2BPETokenizer for a directory with vocab.json + merges.txt."""
    p = Path(source)
    if p.is_dir():
        from mtnlg_ray.data.gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer(p)
    return Tokenizer(p)


def copy_tokenizer(source: str | Path, out_dir: str | Path) -> None:
    """Copy a tokenizer (as found by `find_tokenizer`) into a checkpoint directory."""
    import shutil

    src, out = Path(source), Path(out_dir)
    if src.is_dir():
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(src / name, out / name)
    else:
        shutil.copyfile(src, out / "tokenizer.model")
