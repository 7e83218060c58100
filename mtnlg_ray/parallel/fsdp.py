"""Data parallelism: FSDP2 (`fully_shard`, ZeRO-3 style) or DDP, and the compute precision.

FSDP2 shards every parameter along dim 0 over the "dp" mesh dim: each rank keeps 1/dp of the
weights, gradients and (through the optimizer on the sharded DTensors) the Adam state. Each
transformer block is its own FSDP group, so only one block's full weights are all-gathered at a
time (and freed after its forward, re-gathered for backward); the root group holds the
embeddings, final norm and head. With tensor parallelism the parameters are already DTensors on
the "tp" dim and FSDP2 shards them further on "dp" (2-D, as torchtitan's `parallelize_llama`).

DDP keeps a full replica per rank and all-reduces gradients; it is applied after the weights
are materialised (its constructor broadcasts rank 0's parameters) and only without TP.

Activation checkpointing needs no wrapper here: `GPT.forward` runs each block under
non-reentrant `torch.utils.checkpoint` when `model.activation_checkpointing` is set, which
composes with FSDP2 (the block's all-gather simply runs again in the recomputation) and with TP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from mtnlg_ray.model.gpt import GPT


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on CUDA, fp32 elsewhere; "fp32" / "bf16" as named."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def apply_fsdp(model: GPT, dp_mesh: DeviceMesh, dtype: torch.dtype, reshard_after_forward: bool = True) -> None:
    """fully_shard each block, then the root (embeddings, ln_f, lm_head); in place, FQNs unchanged.

    bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32, and the
    sharded master weights stay fp32 (FSDP2 MixedPrecisionPolicy).
    """
    mp = MixedPrecisionPolicy()
    if dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    blocks = list(model.blocks.values())
    for i, block in enumerate(blocks):
        # The last block's weights are needed again right away by backward: keep them gathered.
        last = i == len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, dp_group: dist.ProcessGroup, device: torch.device) -> DistributedDataParallel:
    """Wrap a materialised model in DDP over the dp group (parameters broadcast from dp rank 0)."""
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(model, device_ids=device_ids, process_group=dp_group)


def set_grad_sync(part: nn.Module, enabled: bool) -> None:
    """Turn gradient reduction off while accumulating micro-batches, on for the last one."""
    if isinstance(part, FSDPModule):
        part.set_requires_gradient_sync(enabled)
    elif isinstance(part, DistributedDataParallel):
        part.require_backward_grad_sync = enabled  # what DDP.no_sync() toggles
