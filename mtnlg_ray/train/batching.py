"""One optimizer step's global batch, dealt out to the data-parallel ranks, for any worker count.

The global batch (G rows of T+1 ids, in stream order) is what the config says; the number of
workers only changes how it is cut. With micro-batch size m and dp data-parallel ranks:

    k      = ceil(G / (m x dp))       micro-steps, the same on every rank (FSDP and DDP run their
                                      collectives once per micro-step on every rank)
    slots  = k x dp                   slot j is micro-step j // dp of dp rank j % dp
    rows   : slot j takes the next G // slots rows of the batch, the first G % slots slots one
             more (slot 0 the first rows, slot 1 the next ...); never more than m

When m x dp divides G every slot holds m rows: plain gradient accumulation of G / (m x dp)
micro-batches, dp rank r of micro-step i taking stream micro-batch i x dp + r. Otherwise the slots
differ by at most one row: G = 6, m = 4 on 2 ranks is one micro-step of 3 rows each, on 1 rank two
of 3 rows. A slot holds padding rows (targets all -100: counted nowhere) only when G < slots
(some slots get no row, yet run a forward and backward), and under pipeline parallelism, where
every micro-batch is padded to m rows: a pipeline schedule is built per micro-batch shape.

Loss scaling. A micro-batch's loss is the mean over its n_j counted target tokens (targets of
-100 are not counted). FSDP and DDP average gradients over dp, so scaling it by
n_j x dp / N, with N the counted tokens of the whole global batch, makes the accumulated gradient

    (1 / dp) x sum_j (n_j x dp / N) x grad(loss_j) = grad(sum of all token losses) / N,

the gradient of the mean loss over the N tokens of the global batch, whatever dp, k and the row
split (with equal n_j it is the usual 1 / k). A micro-batch without counted tokens (padding only,
or SFT rows masked all along) runs with its own next-token ids as targets and scale 0: a finite
loss and an exactly zero gradient (a mean over no tokens would be NaN, and NaN x 0 is NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtnlg_ray.parallel.pp import stage_layers


def inputs_targets(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of T+1 ids -> inputs (B, T) and next-token targets (B, T); "labels" (-100 = masked) win."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True) if "labels" in batch else ids
    return ids[:, :-1], labels[:, 1:]


def slot_rows(global_batch: int, micro_batch_size: int, dp: int) -> list[range]:
    """Row ranges of the global batch per slot (slot j = micro-step j // dp, dp rank j % dp)."""
    if global_batch < 1 or micro_batch_size < 1 or dp < 1:
        raise ValueError(f"slot_rows: need positive sizes (global {global_batch}, micro {micro_batch_size}, dp {dp})")
    slots = math.ceil(global_batch / (micro_batch_size * dp)) * dp
    return stage_layers(global_batch, slots)  # the even split pipeline stages use: the first ones one more


def counted_per_row(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Counted target tokens of each row (G,): T for plain rows, fewer where labels are -100."""
    labels = rows.get("labels", rows["input_ids"])
    return (labels[:, 1:] != -100).sum(dim=1)


def pad_rows(ids: torch.Tensor, labels: torch.Tensor, pad: int,
             first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`pad` more rows counted nowhere: copies of `first` (default ids[:1]) as inputs, labels -100."""
    row = ids[:1] if first is None else first
    return (torch.cat([ids, row.expand(pad, -1)]),
            torch.cat([labels, torch.full((pad, ids.shape[1]), -100, dtype=labels.dtype)]))


@dataclass
class MicroBatch:
    rows: dict[str, torch.Tensor]  # "input_ids" and "labels", (B, T+1) each; B <= micro_batch_size
    loss_scale: float  # n_j x dp / N (see the module doc); 0 for a micro-batch without counted tokens
    tokens: int  # counted target tokens n_j


@dataclass
class RankBatches:
    """This dp rank's micro-batches of one step, in order, and what the step holds as a whole."""

    micro: list[MicroBatch]
    global_tokens: int  # N: counted target tokens of the whole global batch
    padding_rows: int  # padding rows over all slots of the step (every rank computes the same)


def deal(rows: dict[str, torch.Tensor], micro_batch_size: int, dp: int, dp_rank: int,
         pad_to_micro_batch: bool = False) -> RankBatches:
    """Cut the global batch `rows` ({"input_ids": (G, T+1)} [+ "labels"]) into dp rank `dp_rank`'s
    micro-batches. `pad_to_micro_batch`: every micro-batch gets exactly micro_batch_size rows (for
    pipeline schedules); otherwise only empty slots get one padding row."""
    ids = rows["input_ids"]
    ranges = slot_rows(ids.shape[0], micro_batch_size, dp)
    per_row = counted_per_row(rows)
    total = int(per_row.sum())
    labels = rows.get("labels", ids)
    micro, padding = [], 0
    for j, r in enumerate(ranges):
        size = micro_batch_size if pad_to_micro_batch else max(len(r), 1)
        pad = size - len(r)
        padding += pad
        if j % dp != dp_rank:
            continue
        inp, lab = ids[r.start:r.stop], labels[r.start:r.stop]
        if pad:
            inp, lab = pad_rows(inp, lab, pad, first=ids[:1])
        n = int(per_row[r.start:r.stop].sum())
        if n == 0:
            # finite loss, zero gradient (module doc); a pipeline's token-sum loss needs no trick
            lab, scale = (lab if pad_to_micro_batch else inp), 0.0
        else:
            scale = n * dp / total
        micro.append(MicroBatch({"input_ids": inp, "labels": lab}, scale, n))
    return RankBatches(micro, total, padding)


def accumulate(model, batches: RankBatches, device: torch.device) -> torch.Tensor:
    """Forward and backward of every micro-batch of this rank (gradient sync on the last only) on a
    `mtnlg_ray.parallel.Parallelized` (under pipeline parallelism: all in one schedule). Returns this rank's sum of (mean loss x counted tokens) over
    its micro-batches (a 0-d tensor, not synchronised: no host sync per micro-batch); the step's
    mean loss is its sum over dp ranks divided by `batches.global_tokens`."""
    pipeline = getattr(model, "pipeline", None)
    if pipeline is not None and pipeline.schedule != "interleaved_1f1b" and batches.micro:
        # Megatron: the step's micro-batches are the chunks of ONE pipeline schedule (fill and
        # drain once per step; the interleaved schedule, whose chunk counts torch restricts, keeps
        # one schedule per micro-batch). The pipeline divides token sums by the rank's counted tokens n, so
        # the scale n x dp / N = the sum of the micro-batch scales keeps the gradient the same.
        rows = {k: torch.cat([mb.rows[k] for mb in batches.micro]) for k in ("input_ids", "labels")}
        inp, tgt = inputs_targets(rows, device)
        model.set_grad_sync(True)
        n = sum(mb.tokens for mb in batches.micro)
        loss = model.forward_backward(inp, tgt, loss_scale=sum(mb.loss_scale for mb in batches.micro),
                                      pp_chunks=len(batches.micro) * pipeline.n_microbatches)
        return loss.to(torch.float64) * n
    total = torch.zeros((), dtype=torch.float64, device=device)
    last = len(batches.micro) - 1
    for i, mb in enumerate(batches.micro):
        inp, tgt = inputs_targets(mb.rows, device)
        model.set_grad_sync(i == last)
        loss = model.forward_backward(inp, tgt, loss_scale=mb.loss_scale)
        if mb.tokens:
            total += loss.to(torch.float64) * mb.tokens
    return total
