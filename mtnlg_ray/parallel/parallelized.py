"""This rank's share of a GPT for its parallel layout: `parallelize` and `Parallelized`.

    dims = build_mesh(job.parallel, world_size, device.type)      # ("pp", "dp", "tp") mesh
    model = parallelize(job.model, dims, job.parallel, device, seed=job.train.seed)
    loss = model.forward_backward(input_ids, targets, loss_scale=1 / accumulation_steps)
    norm = model.clip_grad_norm(1.0); optimizer.step()              # optimizer over model.parts

`parallelize` builds the GPT on the meta device (no memory), applies an optional transform
(e.g. LoRA), cuts this rank's pipeline stage(s) out of it (pp.py), shards it with DTensor tensor
parallelism (tp.py) and FSDP2 (fsdp.py), materialises the shards, then fills them with the
initial weights. Parameter names stay those of the plain GPT in every layout, so
`torch.distributed.checkpoint.state_dict.get_model_state_dict(part)` of each part gives
checkpoints that load under any other layout. With one process nothing distributed is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from mtnlg_ray.config import ModelConfig, ParallelConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.gpt import GPT, lm_loss, rotary_tables
from mtnlg_ray.parallel.fsdp import apply_ddp, apply_fsdp, compute_dtype, set_grad_sync
from mtnlg_ray.parallel.mesh import ParallelDims, check_layout, virtual_stages
from mtnlg_ray.parallel.pp import Pipeline, rank_stages, split_stage
from mtnlg_ray.parallel.tp import apply_tp


class Parallelized:
    """This rank's share of the model and the forward/backward that matches its layout."""

    def __init__(self, parts: list[nn.Module], dims: ParallelDims, cfg: ParallelConfig, device: torch.device,
                 dtype: torch.dtype, pipeline: Pipeline | None):
        self.parts = parts  # model chunk(s) of this rank: for the optimizer and DCP state dicts
        self.dims, self.cfg, self.device, self.dtype = dims, cfg, device, dtype
        self.pipeline = pipeline
        # FSDP2 casts parameters itself; otherwise bf16 compute comes from autocast.
        self._fsdp_mp = cfg.data_parallel == "fsdp" and dims.dp > 1
        self._autocast = dtype != torch.float32 and not self._fsdp_mp

    def _precision(self):
        if self._autocast:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _check(self, input_ids: torch.Tensor) -> None:
        if self.cfg.sequence_parallel and input_ids.shape[1] % self.dims.tp:
            raise ValueError(f"sequence parallel: sequence length {input_ids.shape[1]} must divide by tp={self.dims.tp}")

    def forward_backward(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_scale: float,
                         pp_chunks: int | None = None) -> torch.Tensor:
        """Backward of lm_loss * loss_scale for one micro-batch (B, T); returns the unscaled mean loss
        over its counted tokens (targets == -100 are ignored), detached. Every pp and tp rank that
        processes this micro-batch returns the same value; dp ranks hold different micro-batches
        (average over `dims.group("dp")` for logging). Under pipeline parallelism, `pp_chunks`
        splits (B, T) into that many schedule chunks (default: parallel.pp_microbatches)."""
        self._check(input_ids)
        for part in self.parts:
            part.train()
        with self._precision():
            if self.pipeline is not None:
                return self.pipeline.run(input_ids, targets, loss_scale, train=True, n_chunks=pp_chunks)
            loss = lm_loss(self.parts[0](input_ids), targets)
        (loss * loss_scale).backward()
        return loss.detach()

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of one batch in eval mode (no dropout), without gradients; same contract."""
        self._check(input_ids)
        for part in self.parts:
            part.eval()
        try:
            with self._precision():
                if self.pipeline is not None:
                    return self.pipeline.run(input_ids, targets, 1.0, train=False)
                return lm_loss(self.parts[0](input_ids), targets).detach()
        finally:
            for part in self.parts:
                part.train()

    def set_grad_sync(self, enabled: bool) -> None:
        """False while accumulating micro-batches (no gradient reduction), True before the last."""
        for part in self.parts:
            set_grad_sync(part, enabled)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of all gradients (every part, every mesh dim); scales them to max_norm
        when it is larger and max_norm > 0 (as torch.nn.utils.clip_grad_norm_)."""
        grads = [p.grad for part in self.parts for p in part.parameters() if p.grad is not None]
        # Group by layout: one norm (and for DTensors one reduction) per group.
        groups: dict[object, list[torch.Tensor]] = {}
        for g in grads:
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(g)
        total_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for key, group in groups.items():
            norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()  # reduces over the dims the gradients are sharded on
            total_sq += norm.float().to(self.device) ** 2
        if self.dims.pp > 1:
            dist.all_reduce(total_sq, group=self.dims.group("pp"))  # stages hold disjoint parameters
        total = float(total_sq.sqrt())
        if max_norm > 0:
            coef = max_norm / (total + 1e-6)
            if coef < 1:
                for group in groups.values():
                    torch._foreach_mul_(group, coef)
        return total


def reference_state(model_cfg: ModelConfig, seed: int, init_state: dict[str, torch.Tensor] | None,
                    model_transform: Callable[[GPT], None] | None) -> dict[str, torch.Tensor]:
    """The full initial weights on CPU: `torch.manual_seed(seed); GPT(model_cfg)` (then the transform),
    overwritten by `init_state` where given. The caller's RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(model_cfg)
        base = set(model.state_dict())
        if model_transform is not None:
            model_transform(model)
    if init_state is not None:
        try:
            missing, unexpected = model.load_state_dict(init_state, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise UserError(f"initial weights do not fit the model: {str(err).splitlines()[-1].strip()}") from None
        tied = {"lm_head.weight"} if model_cfg.tie_embeddings else set()  # stored once, as tok_emb.weight
        missing = [k for k in missing if k in base and k not in tied]
        if missing or unexpected:
            what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            counts = f"{len(missing)} missing, {len(unexpected)} unexpected"
            raise UserError(f"initial weights do not fit the model: {what} ({counts})")
    return model.state_dict()


def _materialise(part: GPT, device: torch.device) -> None:
    """Allocate the (sharded) meta parameters on `device`. swap_tensors keeps every Parameter object,
    so tied weights stay one parameter (a plain to_empty would untie them)."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        part.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    if part.config.position == "rotary":  # non-persistent buffers are not in any state dict
        cos, sin = rotary_tables(part.config, device=device)
        part.rope_cos.copy_(cos)
        part.rope_sin.copy_(sin)


def parallelize(model_cfg: ModelConfig, dims: ParallelDims, cfg: ParallelConfig, device: torch.device,
                init_state: dict[str, torch.Tensor] | None = None, seed: int = 0,
                model_transform: Callable[[GPT], None] | None = None, compile_blocks: bool = False) -> Parallelized:
    """Build this rank's part of the GPT for `dims` and fill it with the initial weights.

    Order: meta GPT -> model_transform -> pipeline split -> TP -> torch.compile per block (as
    torchtitan: each block is compiled in place, so names and checkpoints are unchanged, and FSDP2's
    hooks stay outside the compiled code) -> FSDP2 -> to_empty -> weights -> DDP. Weights are `init_state` (full tensors by FQN, on every rank) or the reproducible init
    of `reference_state`: every rank builds the full model on CPU and keeps its shards, which is
    exact and fine up to a few billion parameters. At larger scale the scalable path is to call
    `init_weights()` on the materialised shards (DTensor random ops, per-rank RNG offsets) or to
    load on rank 0 only with `StateDictOptions(broadcast_from_rank0=True)`.

    `model_transform` is called on the meta model and on the CPU reference model, so it must
    create its parameters on the device of the weights it wraps.
    """
    check_layout(model_cfg, cfg, dims.world_size)
    dtype = compute_dtype(cfg.precision, device)
    n_stages = dims.pp * virtual_stages(cfg)
    stage_ids = rank_stages(dims.pp_rank, dims.pp, virtual_stages(cfg)) if dims.pp > 1 else [0]
    full = reference_state(model_cfg, seed, init_state, model_transform)
    use_fsdp = dims.dp > 1 and cfg.data_parallel == "fsdp"
    parts: list[nn.Module] = []
    for stage in stage_ids:
        with torch.device("meta"):
            part = GPT(model_cfg)
        if model_transform is not None:
            model_transform(part)
        if dims.pp > 1:
            split_stage(part, stage, n_stages)
        if dims.tp > 1:
            apply_tp(part, dims.mesh["tp"], cfg.sequence_parallel)
        if compile_blocks:
            for block in part.blocks.values():
                block.compile()
        if use_fsdp:
            apply_fsdp(part, dims.mesh["dp"], dtype, reshard_after_forward=dims.pp == 1)
        _materialise(part, device)
        state = {k: full[k] for k in part.state_dict()}
        if dims.mesh is None or not any(isinstance(p, DTensor) for p in part.parameters()):
            part.load_state_dict(state)
        else:
            set_model_state_dict(part, state, options=StateDictOptions(full_state_dict=True))
        if dims.dp > 1 and cfg.data_parallel == "ddp":
            part = apply_ddp(part, dims.group("dp"), device)
        parts.append(part)
    del full
    pipeline = None
    if dims.pp > 1:
        pipeline = Pipeline(parts, stage_ids, n_stages, dims.group("pp"), cfg.pp_schedule, cfg.pp_microbatches, device)
    return Parallelized(parts, dims, cfg, device, dtype, pipeline)
