"""Evaluation on the validation stream: the rows every rank keeps, and the token-weighted loss.

`load_eval_set` reads the first `train.eval_batches` micro-batches (or the whole split) once;
`evaluate` runs them on every rank (dp rank r takes batches r, r+dp, ...) and returns the loss in
nats per token, the perplexity and bits per byte. Fine-tuning's baseline uses the same rows.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist

from mtnlg_ray.data.dataset import BlendedRows
from mtnlg_ray.train.batching import inputs_targets, pad_rows
from mtnlg_ray.train.stream import iter_batches


def load_eval_set(rows: BlendedRows | None, micro_batch: int, batches: int | str) -> list[dict[str, torch.Tensor]]:
    """The first `batches` micro-batches of the validation stream ("all": the whole split), kept in
    memory (the same on every rank). With "all" the last, partial micro-batch is padded to full size
    with rows counted nowhere (labels -100), so every forward has one shape (pipelines need it)."""
    if rows is None:
        return []
    whole = batches == "all"
    out = list(itertools.islice(iter_batches(rows, micro_batch, drop_last=not whole), None if whole else batches))
    if out and len(out[-1]["input_ids"]) < micro_batch:
        ids = out[-1]["input_ids"]
        inp, lab = pad_rows(ids, out[-1].get("labels", ids), micro_batch - len(ids))
        out[-1] = {"input_ids": inp, "labels": lab}
    return out


def world_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over all ranks (tp/pp replicas hold equal values, so this is the mean over dp)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def evaluate(model, eval_set: list[dict], dims, device: torch.device,
             token_bytes: torch.Tensor | None = None) -> dict[str, float]:
    """{"val_loss": token-weighted mean loss (nats / token), "val_ppl", "val_bpb": bits per byte}.

    dp rank r takes batches r, r+dp, ... Every rank runs the same number of forwards (collectives
    inside); padding batches get weight 0. Bits per byte (nanochat's tokenizer-independent measure)
    = the summed loss over ln 2 x the UTF-8 bytes of the targets (`token_bytes`: (V,) bytes per id)."""
    per_rank = math.ceil(len(eval_set) / dims.dp)
    loss_sum = tokens = nbytes = 0.0
    for i in range(per_rank):
        idx = i * dims.dp + dims.dp_rank
        inp, tgt = inputs_targets(eval_set[min(idx, len(eval_set) - 1)], device)
        loss = float(model.eval_loss(inp, tgt))
        if idx < len(eval_set):
            counted = tgt[tgt != -100]
            loss_sum += loss * counted.numel()
            tokens += counted.numel()
            if token_bytes is not None:
                nbytes += float(token_bytes[counted.cpu()].sum())
    loss_sum, tokens, nbytes = world_mean([loss_sum, tokens, nbytes], device)
    out = {"val_loss": loss_sum / max(tokens, 1.0)}
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    if nbytes:
        out["val_bpb"] = loss_sum / (math.log(2) * nbytes)
    return out
