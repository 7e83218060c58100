"""GPT-2's byte-level BPE tokenizer (vocab.json + merges.txt), for imported GPT-2 directories.

The algorithm of OpenAI's `encoder.py`: text is split by GPT-2's regex, each piece's UTF-8
bytes are mapped to printable unicode characters, then merged by BPE rank. It offers the same
interface as the SentencePiece `Tokenizer`, so a GPT-2 directory works wherever ours does.
`<|endoftext|>` in the text is encoded as the special token (end of document), unless
`parse_special=False`.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import regex
import torch

from mtnlg_ray.errors import UserError

PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


class GPT2BPETokenizer:
    def __init__(self, directory: str | Path):
        self.path = Path(directory)
        vocab_file, merges_file = self.path / "vocab.json", self.path / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise UserError(f"{f}: not found (a GPT-2 tokenizer needs vocab.json and merges.txt)")
        try:
            self.encoder: dict[str, int] = json.loads(vocab_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{vocab_file}: not valid JSON ({err})") from None
        lines = [ln for ln in merges_file.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#version")]
        self.ranks = {tuple(ln.split(" ")): i for i, ln in enumerate(lines)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.vocab_size = len(self.encoder)
        self.eod_id = self.encoder.get(EOT, self.vocab_size - 1)
        self.pad_id = self.eod_id
        self.special_tokens = {EOT: self.encoder[EOT]} if EOT in self.encoder else {}
        self.sha256 = hashlib.sha256(vocab_file.read_bytes() + merges_file.read_bytes()).hexdigest()
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the best pair, left to right
                if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def _encode_plain(self, text: str) -> list[int]:
        ids = []
        for piece in PATTERN.findall(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(word))
        return ids

    def token_id(self, piece: str) -> int:
        if piece not in self.encoder:
            raise UserError(f"{self.path}: tokenizer has no {piece!r} token")
        return self.encoder[piece]

    def encode(self, text: str, return_tensors: str | None = None, parse_special: bool = True):
        ids: list[int] = []
        for k, chunk in enumerate(text.split(EOT) if parse_special and self.special_tokens else [text]):
            if k:
                ids.append(self.eod_id)
            ids.extend(self._encode_plain(chunk))
        return torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str | list[str]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.decode(row) for row in ids]
        text = "".join(self.decoder.get(i, "") for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        return self.decoder[i]

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (a piece of a multi-byte character may be part of one)."""
        return bytes(self.byte_decoder[c] for c in self.decoder.get(i, ""))
