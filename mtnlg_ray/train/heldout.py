"""`mtnlg eval CHECKPOINT --data FILE`: held-out loss (nats per token), perplexity and bits per byte.

The rows are made as preprocessing makes a dataset's (data/shards.py): the documents of FILE (read
by data/readers.py: text, JSONL or Parquet, kind from the suffix unless given), each tokenized and
followed by EOD (`encode_documents`), concatenated and cut into rows of seq_len + 1; the tail that
fills no row is dropped (a file too short for one row is scored as one shorter row). The loss is
training's validation (`train.evaluate.evaluate`) on those rows, so a file holding a run's
validation documents gives the number the run logged as val_loss (same rows, same code).
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from mtnlg_ray.data.readers import iter_records, kind_of, resolve_paths
from mtnlg_ray.data.tokenizer import cuts_are_exact, encode_documents
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.gpt import lm_loss
from mtnlg_ray.train.evaluate import evaluate
from mtnlg_ray.train.metrics import token_byte_lengths

log = logging.getLogger(__name__)


def read_documents(paths: list[str], kind: str | None = None, text_mode: str = "file", text_field: str = "text",
                   max_docs: int | None = None) -> list[str]:
    """The documents of `paths` (files, directories, globs), in file order; records that are not
    documents (malformed JSON, a missing field, binary content) are skipped with a count."""
    docs, skipped = [], 0
    for path in resolve_paths(paths, kind or "text"):
        for rec in iter_records(path, kind or kind_of(path), text_mode, text_field):
            if rec.status:
                skipped += 1
                continue
            docs.append(rec.text)
            if max_docs is not None and len(docs) >= max_docs:
                return docs
    if skipped:
        log.warning("skipped %d records that are not documents (malformed JSON, missing field or binary)", skipped)
    return docs


def pack_rows(tokenizer, docs: list[str], seq_len: int) -> tuple[np.ndarray, int]:
    """(rows (N, seq_len + 1) int64 as preprocessing packs them, tokens in the dropped tail)."""
    if not hasattr(tokenizer, "sp"):
        raise UserError("mtnlg eval needs a SentencePiece tokenizer (tokenizer.model), as preprocessing writes")
    exact = cuts_are_exact(tokenizer.path.read_bytes())
    flat = np.concatenate(encode_documents(tokenizer.sp, docs, exact, num_threads=2)).astype(np.int64)
    width = seq_len + 1
    n = len(flat) // width
    if n == 0:  # shorter than one row: score it whole
        return flat[None, :], 0
    return flat[: n * width].reshape(n, width), len(flat) - n * width


class _OneProcess:
    """`parallel.Parallelized.eval_loss` for a plain model in this process (what `evaluate` calls)."""

    def __init__(self, model, bar: tqdm):
        self.model, self.bar = model, bar

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(self.model(input_ids), targets)
        self.bar.update(int((targets != -100).sum()))
        return loss


def evaluate_file(checkpoint: str, data: list[str], kind: str | None = None, text_mode: str = "file",
                  text_field: str = "text", max_docs: int | None = None, seq_len: int | None = None,
                  batch_size: int = 8, device: str = "cpu") -> dict[str, float]:
    """{"val_loss", "val_ppl", "val_bpb", "tokens", "rows", "documents", "dropped_tail_tokens"} of
    `checkpoint` on the documents of `data` (see the module docstring)."""
    from mtnlg_ray.api import from_pretrained

    docs = read_documents(data, kind, text_mode, text_field, max_docs)
    if not docs:
        raise UserError(f"{', '.join(data)}: no documents to evaluate")
    tok, model = from_pretrained(checkpoint, device)
    if tok is None:
        raise UserError(f"{checkpoint}: has no tokenizer, so the documents cannot be tokenized")
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_seq_len of {model.config.max_seq_len}")
    rows, dropped = pack_rows(tok, docs, seq_len)
    batches = [{"input_ids": torch.from_numpy(rows[i:i + batch_size])} for i in range(0, len(rows), batch_size)]
    token_bytes = torch.from_numpy(token_byte_lengths(tok))
    with tqdm(total=rows.size - len(rows), desc="eval", unit=" tok", disable=None, mininterval=1) as bar:
        out = evaluate(_OneProcess(model, bar), batches, SimpleNamespace(dp=1, dp_rank=0), torch.device(device),
                       token_bytes)
    out.update(tokens=rows.size - len(rows), rows=len(rows), documents=len(docs), dropped_tail_tokens=dropped)
    if math.isnan(out["val_loss"]):
        raise UserError(f"{checkpoint}: the loss is NaN")
    return out
