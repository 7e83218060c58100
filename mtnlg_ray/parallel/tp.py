"""Tensor parallelism with DTensor: Megatron-LM's layout, as a plan keyed by the GPT's module names.

Inside a block (Shoeybi et al., 2019, section 3), with X replicated on the tp ranks:
  attention  Q, K, V = X A_q, X A_k, X A_v   A split by columns -> each rank holds n_heads / tp
             heads and runs attention on them locally; Y = concat(heads) B with B split by rows,
             so each rank has a partial sum and one all-reduce gives Y.
  MLP        Y = GeLU(X A) B, A split by columns (GeLU stays local), B by rows, one all-reduce.
So a block costs two all-reduces forward and two backward (the "g" operators); the "f" operators
(identity forward, all-reduce backward) come from annotating the block input as replicated.
LoRA adapters (model/lora.py) on these linears are split along with their weight (see
`_AdapterAware`), so fine-tuning with LoRA runs under the same plan.

The embedding is vocab-parallel (rows split, partial lookups summed: Megatron's
VocabParallelEmbedding) and the LM head column-parallel over the vocabulary; with tied
embeddings both hold the same Shard(0) weight. Logits are all-gathered to (B, T, V) for the loss.

Sequence parallel (Korthikanti et al., 2022) additionally splits the LayerNorms, dropout and
residual stream along the sequence (dim 1): the all-reduces become a reduce-scatter into the
residual plus an all-gather before each column-parallel projection, and activation memory outside
attention/MLP drops by tp. Pipeline stage boundaries then carry the local sequence shard.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.model.lora import LORA_A, LORA_B


class _AdapterAware:
    """Shards a LoRA linear's adapters (W + B A, A: (r, in), B: (out, r)) to match its weight, so
    the low-rank path needs no extra communication: column-parallel W (rows split) gets B split by
    rows and A replicated; row-parallel W (columns split) gets A split by columns and B replicated,
    its partial sum joining the base output's all-reduce. Plain linears are unaffected."""

    adapter_layouts: dict[str, Shard | Replicate] = {}

    def _partition_linear_fn(self, name, module, device_mesh):
        if not isinstance(module, nn.Linear):  # called for every submodule too (a LoRA linear's dropout)
            return
        adapters = {n: module._parameters.pop(n) for n in list(module._parameters) if n in self.adapter_layouts}
        super()._partition_linear_fn(name, module, device_mesh)
        for n, p in adapters.items():
            dt = distribute_tensor(p, device_mesh, [self.adapter_layouts[n]], src_data_rank=self.src_data_rank)
            module.register_parameter(n, nn.Parameter(dt, requires_grad=p.requires_grad))


class ColwiseLinear(_AdapterAware, ColwiseParallel):
    adapter_layouts = {LORA_A: Replicate(), LORA_B: Shard(0)}


class RowwiseLinear(_AdapterAware, RowwiseParallel):
    adapter_layouts = {LORA_A: Shard(1), LORA_B: Replicate()}


def block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """TP plan of one transformer block, keyed by module names inside `blocks.{i}`."""
    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()  # layout of the residual stream between sublayers
    plan: dict[str, ParallelStyle] = {
        "attn.q_proj": ColwiseLinear(),
        "attn.k_proj": ColwiseLinear(),
        "attn.v_proj": ColwiseLinear(),
        "attn.out_proj": RowwiseLinear(output_layouts=residual, use_local_output=not sp),
        "mlp.up_proj": ColwiseLinear(),
        "mlp.down_proj": RowwiseLinear(output_layouts=residual, use_local_output=not sp),
    }
    if sp:
        plan |= {
            "ln_1": SequenceParallel(),
            "ln_2": SequenceParallel(),
            # attn(x, rope, step, layer): gather the sequence before the column-parallel Q/K/V.
            "attn": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
            ),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        }
    return plan


def root_plan(model: GPT, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """TP plan of the modules outside the blocks that this (pipeline stage) model still holds."""
    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()
    plan: dict[str, ParallelStyle] = {}
    if model.tok_emb is not None:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual, use_local_output=not sp)
        if sp and model.pos_emb is not None:
            # (T, d) position rows: replicated table, output split along the sequence like tok_emb's.
            plan["pos_emb"] = PrepareModuleOutput(
                output_layouts=Replicate(), desired_output_layouts=Shard(0), use_local_output=False
            )
    if model.ln_f is not None and sp:
        plan["ln_f"] = SequenceParallel()
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=Replicate(), use_local_output=True)
    return plan


def apply_tp(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (or one pipeline stage of it) in place over `tp_mesh`; FQNs are unchanged."""
    tied = model.tok_emb is not None and model.lm_head is not None and model.lm_head.weight is model.tok_emb.weight
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel))
    parallelize_module(model, tp_mesh, root_plan(model, sequence_parallel))
    if tied:
        # Each style wrapped the shared weight in its own Parameter; both are Shard(0) over the
        # vocabulary, so re-tie them to one DTensor parameter.
        model.lm_head.weight = model.tok_emb.weight
    if sequence_parallel:
        _local_stage_boundaries(model, tp_mesh)


def _local_stage_boundaries(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Under sequence parallel a pipeline stage passes its local sequence shard (B, T / tp, d) as
    a plain tensor: a middle stage wraps its input back into a Shard(1) DTensor and unwraps its
    output. A stage with both ends (no pipeline) needs neither."""
    if model.tok_emb is None:
        model.register_forward_pre_hook(
            lambda mod, args: (DTensor.from_local(args[0], tp_mesh, (Shard(1),), run_check=False), *args[1:])
        )
    if model.lm_head is None:
        model.register_forward_hook(lambda mod, args, out: out.to_local() if isinstance(out, DTensor) else out)

