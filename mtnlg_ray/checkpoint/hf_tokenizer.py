"""The tokenizer files of a Hugging Face export, so `AutoTokenizer` gives exactly our ids.

    tokenizer.json          our tokenizer in the `tokenizers` library's form (data/tokenizer_json.py)
    tokenizer_config.json   the fast tokenizer class, special tokens, model_max_length and the chat
                            template (Jinja2, the same source our server renders)
    generation_config.json  end-of-sequence ids: end of document, and `<|end|>` which closes a chat turn
    tokenizer.model         the SentencePiece model it was converted from (or GPT-2's vocab.json +
                            merges.txt), for `mtnlg import-hf`: it reads the model back when
                            tokenizer.json is still exactly its conversion

`tokenizer_class` is `PreTrainedTokenizerFast`, which reads tokenizer.json only: a SentencePiece
class would rebuild its own tokenizer from tokenizer.model with transformers' defaults (a dummy
prefix our models do not add) and give other ids. config.json takes its token ids from `token_ids`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mtnlg_ray.data.chat import chat_stop_id
from mtnlg_ray.data.tokenizer_json import to_tokenizers

log = logging.getLogger(__name__)


def token_ids(tok) -> dict:
    """bos/eos/pad ids for config.json: no BOS (ours never add one), end of document, padding."""
    if tok is None:  # no tokenizer: no ids, rather than GPT-2's 50256 in another vocabulary
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {"bos_token_id": None, "eos_token_id": tok.eod_id, "pad_token_id": tok.pad_id}


def stop_ids(tok) -> list[int]:
    """Where generation ends: end of document, then the chat turn's end when the vocabulary has one."""
    end = chat_stop_id(tok)
    return [tok.eod_id] + ([end] if end != tok.eod_id else [])


def tokenizer_config(tok, fast, model_max_length: int, chat_template: str) -> dict:
    """transformers' tokenizer_config.json for `fast` (the tokenizers.Tokenizer written beside it)."""
    piece = tok.id_to_piece
    unk = getattr(tok, "unk_id", -1)
    added = fast.get_added_tokens_decoder()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": None,
        "eos_token": piece(tok.eod_id),
        "pad_token": piece(tok.pad_id),
        "unk_token": piece(unk) if unk is not None and unk >= 0 else None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding must not touch spaces before punctuation
        "added_tokens_decoder": {str(i): {"content": t.content, "special": t.special, "normalized": False,
                                          "lstrip": False, "rstrip": False, "single_word": False}
                                 for i, t in sorted(added.items())},
        "chat_template": chat_template,
    }


def export_files(tok, tokenizer_path: str | Path, model_max_length: int, chat_template: str) -> dict[str, bytes]:
    """{file name: content} of an export's tokenizer files (module docstring)."""
    src = Path(tokenizer_path)
    fast = to_tokenizers(src)
    if src.suffix == ".model" and json.loads(fast.to_str())["model"]["type"] == "Unigram":
        log.warning("%s: a unigram model; SentencePiece and tokenizers may order the pieces of equal-score "
                    "segmentations (runs of spaces) differently, so a few ids can differ in transformers "
                    "(bpe and char models give the same ids)", src)
    ends = stop_ids(tok)
    files = {
        "tokenizer.json": fast.to_str(pretty=True).encode(),
        "tokenizer_config.json": _json(tokenizer_config(tok, fast, model_max_length, chat_template)),
        "generation_config.json": _json({**token_ids(tok), "eos_token_id": ends if len(ends) > 1 else ends[0]}),
    }
    if src.is_dir():
        files.update({name: (src / name).read_bytes() for name in ("vocab.json", "merges.txt")})
    elif src.suffix != ".json":
        files["tokenizer.model"] = src.read_bytes()
    return files


def _json(body: dict) -> bytes:
    return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()
