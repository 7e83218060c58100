"""Pipeline parallelism with `torch.distributed.pipelining`: stages cut from the GPT by layer.

A stage is the plain GPT with the other stages' blocks deleted (the first stage keeps tok_emb /
pos_emb, the last ln_f / lm_head; the rest are set to None and `GPT.forward` passes hidden states
through), so parameter names stay those of the full model (`blocks.7.attn.q_proj.weight`) and a
checkpoint saved under one layout loads under another. The transformer blocks are split as evenly
as possible, earlier stages taking one more when they do not divide.

Schedules (Narayanan et al., 2021): "gpipe" (all forwards, then all backwards), "1f1b" (one
forward / one backward in steady state: at most pp micro-batches of activations in flight) and
"interleaved_1f1b" (each rank holds 2 stages, s and s + pp, which shrinks the bubble by half
for more point-to-point traffic). Each micro-batch of B sequences is split into
`pp_microbatches` chunks along the batch, and, as in Megatron-LM, all the micro-batches of one
optimizer step run through ONE schedule (k micro-batches -> k x pp_microbatches chunks), so the
pipeline fills and drains once per step rather than once per micro-batch (not for
"interleaved_1f1b", whose chunk counts torch restricts: one schedule per micro-batch). torch's 1F1B
schedules need at least as many chunks as stages; a step with fewer (e.g. early in a batch
ramp-up: MT-NLG starts at 2 sequences per pipeline for 35 stages) runs that shape under GPipe.

The loss is a token sum over each chunk divided by the number of counted (not -100) tokens of
the whole micro-batch, with `scale_grads=False`, so the gradient is exactly the one of the mean
loss over the micro-batch, as without pipelining, even when the chunks hold unequal numbers of
ignored targets.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtnlg_ray.model.gpt import GPT

log = logging.getLogger(__name__)


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Block indices of each stage: as even as possible, the first n_layers % n_stages get one more."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def rank_stages(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Stage ids held by one pp rank: rank r holds r, r + pp, ... (interleaved looping placement)."""
    return [pp_rank + v * pp for v in range(virtual)]


def split_stage(model: GPT, stage: int, n_stages: int) -> None:
    """Cut `model` (on the meta device) down to pipeline stage `stage` in place."""
    keep = {str(i) for i in stage_layers(model.config.n_layers, n_stages)[stage]}
    for key in list(model.blocks.keys()):
        if key not in keep:
            del model.blocks[key]
    if stage > 0:
        model.tok_emb = None
        model.pos_emb = None
    if stage < n_stages - 1:
        model.ln_f = None
        model.lm_head = None


class Pipeline:
    """Runs this rank's stage(s) under a schedule; one (stages, schedule) per input shape and mode,
    since pipelining infers the activation shapes sent between stages on its first step."""

    def __init__(self, parts: list[nn.Module], stage_ids: list[int], n_stages: int, pp_group: dist.ProcessGroup,
                 schedule: str, n_microbatches: int, device: torch.device):
        self.parts, self.stage_ids, self.n_stages = parts, stage_ids, n_stages
        self.group, self.schedule, self.n_microbatches, self.device = pp_group, schedule, n_microbatches, device
        self.is_last = (n_stages - 1) in stage_ids
        self._schedules: dict[tuple, object] = {}
        self._n_counted = torch.ones(())  # tokens counted in the current micro-batch
        self._loss_scale = 1.0
        self._chunk_losses: list[torch.Tensor] = []
        # The last stage's pp rank, as a global rank, broadcasts the loss.
        self._src = dist.get_global_rank(pp_group, (n_stages - 1) % dist.get_world_size(pp_group))

    def _chunk_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        loss = total / self._n_counted
        self._chunk_losses.append(loss.detach())
        return loss * self._loss_scale

    def _get(self, shape: tuple[int, ...], train: bool, n_chunks: int):
        key = (shape, train, n_chunks)
        if key not in self._schedules:
            # imported here: torch.distributed.pipelining brings in dynamo (about 1 s), which every
            # worker would otherwise import at start-up, with or without a pipeline
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

            stages = [PipelineStage(part, s, self.n_stages, self.device, group=self.group)
                      for part, s in zip(self.parts, self.stage_ids)]
            kw = dict(n_microbatches=n_chunks, loss_fn=self._chunk_loss, scale_grads=False)
            try:
                if self.schedule == "interleaved_1f1b":
                    sched = ScheduleInterleaved1F1B(stages, **kw)
                else:
                    sched = (Schedule1F1B if self.schedule == "1f1b" else ScheduleGPipe)(stages[0], **kw)
            except ValueError as err:  # too few chunks for a 1F1B schedule (module doc)
                if len(stages) > 1:
                    raise
                log.info("pipeline: %d chunks under %s is not possible (%s); using gpipe for this shape",
                         n_chunks, self.schedule, err)
                sched = ScheduleGPipe(stages[0], **kw)
            self._schedules[key] = sched
        return self._schedules[key]

    def run(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_scale: float, train: bool,
            n_chunks: int | None = None) -> torch.Tensor:
        """Forward (and backward when `train`) of one batch (B, T) in `n_chunks` chunks (default:
        pp_microbatches, one micro-batch); returns the mean loss over its counted tokens on every
        pp rank (broadcast from the last stage)."""
        B = input_ids.shape[0]
        n_chunks = n_chunks or self.n_microbatches
        if B % n_chunks:
            raise ValueError(f"pipeline: a batch of {B} sequences does not split into {n_chunks} chunks")
        sched = self._get(tuple(input_ids.shape), train, n_chunks)
        self._chunk_losses, self._loss_scale = [], loss_scale
        self._n_counted = (targets != -100).sum().clamp(min=1).to(torch.float32)
        args = (input_ids,) if 0 in self.stage_ids else ()
        target = targets if self.is_last else None
        losses: list[torch.Tensor] | None = [] if self.is_last else None
        if train:
            sched.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            with torch.no_grad():
                sched.eval(*args, target=target, losses=losses)
        # The last n_chunks calls are the real chunks (a first step also calls the loss
        # once while inferring shapes).
        chunks = self._chunk_losses[-n_chunks:]
        loss = torch.stack(chunks).sum() if self.is_last else torch.zeros((), dtype=torch.float32)
        loss = loss.to(self.device)
        dist.broadcast(loss, src=self._src, group=self.group)
        return loss
