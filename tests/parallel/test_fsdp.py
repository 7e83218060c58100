"""FSDP2 and DDP over 2 gloo processes against one plain process (mtnlg_ray/parallel/fsdp.py)."""

from __future__ import annotations

import pytest
import torch

from mtnlg_ray.config import ParallelConfig
from mtnlg_ray.parallel import build_mesh, parallelize
from mtnlg_ray.parallel.fsdp import compute_dtype
from parallel_harness import (assert_close_rel, assert_same_step, batch, lora, one_step, reference_step, run_workers,
                              tiny_model)

MODEL = dict(activation_checkpointing=True)  # checkpointed blocks must give the same gradients


def _data_parallel_step(rank: int, world_size: int, mode: str):
    """Each dp rank trains on its half of the batch, accumulating two micro-batches of one row."""
    from torch.distributed.tensor import DTensor

    cfg = ParallelConfig(data_parallel=mode, precision="fp32")
    dims = build_mesh(cfg, world_size, "cpu")
    model = parallelize(tiny_model(**MODEL), dims, cfg, torch.device("cpu"), seed=7)
    shards = [(p.to_local().shape[0], p.shape[0]) for p in model.parts[0].parameters() if isinstance(p, DTensor)]
    ids, tgt = batch(4)
    mine = slice(2 * dims.dp_rank, 2 * dims.dp_rank + 2)
    step = one_step(model, ids[mine], tgt[mine], accumulate=2)
    lora_model = parallelize(tiny_model(**MODEL), dims, cfg, torch.device("cpu"), seed=7, model_transform=lora)
    lora_step = one_step(lora_model, ids[mine], tgt[mine])  # frozen base weights among sharded ones
    # bf16 compute (FSDP2 MixedPrecisionPolicy / autocast for DDP): fp32 master weights and grads
    bf16_cfg = cfg.model_copy(update={"precision": "bf16"})
    bf16 = parallelize(tiny_model(**MODEL), dims, bf16_cfg, torch.device("cpu"), seed=7)
    bf16_loss = float(bf16.forward_backward(ids[mine], tgt[mine], loss_scale=1.0))
    fp32 = parallelize(tiny_model(**MODEL), dims, cfg, torch.device("cpu"), seed=7)
    fp32_loss = float(fp32.eval_loss(ids[mine], tgt[mine]))
    dtypes = {str(p.dtype) for p in bf16.parts[0].parameters()} | {str(p.grad.dtype) for p in bf16.parts[0].parameters()}
    return (step, lora_step), shards, (bf16_loss, fp32_loss, sorted(dtypes))


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_data_parallel_step_matches_single_process(mode):
    results = run_workers(_data_parallel_step, 2, mode)
    assert_same_step([steps[0] for steps, _, _ in results], reference_step(tiny_model(**MODEL), *batch(4), seed=7))
    want = reference_step(tiny_model(**MODEL), *batch(4), seed=7, model_transform=lora)
    assert_same_step([steps[1] for steps, _, _ in results], want)
    for _, _, (bf16_loss, fp32_loss, dtypes) in results:
        assert dtypes == ["torch.float32"]
        assert bf16_loss != fp32_loss and abs(bf16_loss - fp32_loss) < 0.02 * fp32_loss  # really bf16, still close
    shards = results[0][1]
    if mode == "fsdp":  # really sharded: each rank holds half the rows of every parameter
        assert shards and all(2 * local == rows for local, rows in shards)
    else:
        assert shards == []


def test_single_process_needs_no_process_group_and_matches_plain_gpt():
    from mtnlg_ray.model.gpt import GPT, lm_loss

    cfg = ParallelConfig()
    dims = build_mesh(cfg, 1, "cpu")
    assert dims.mesh is None and (dims.pp, dims.dp, dims.tp) == (1, 1, 1) and dims.is_first_stage and dims.is_last_stage
    model = parallelize(tiny_model(), dims, cfg, torch.device("cpu"), seed=3)
    torch.manual_seed(3)
    plain = GPT(tiny_model())
    assert model.parts[0].lm_head.weight is model.parts[0].tok_emb.weight  # still tied after materialising
    for (name, a), b in zip(model.parts[0].state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    ids, tgt = batch(2)
    tgt[0, :5] = -100
    loss = model.forward_backward(ids, tgt, loss_scale=1.0)
    assert loss.requires_grad is False
    # -100 targets are ignored: the mean runs over the counted tokens only
    logits = plain(ids)
    keep = tgt != -100
    want = torch.nn.functional.cross_entropy(logits[keep], tgt[keep])
    assert_close_rel(loss, want, 1e-6, "loss")
    assert_close_rel(model.eval_loss(ids, tgt), want, 1e-6, "eval loss")
    lm_loss(logits, tgt).backward()
    want_norm = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1))
    assert_close_rel(model.clip_grad_norm(0.1), want_norm, 1e-6, "grad norm")
    for (name, p), q in zip(model.parts[0].named_parameters(), plain.parameters()):
        assert_close_rel(p.grad, q.grad, 1e-5, name)  # clipped identically


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert compute_dtype("fp32", torch.device("cuda")) == torch.float32
    # one process, bf16: autocast compute, fp32 parameters and gradients
    ids, tgt = batch(2)
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = ParallelConfig(precision=precision)
        model = parallelize(tiny_model(), build_mesh(cfg, 1, "cpu"), cfg, torch.device("cpu"), seed=1)
        losses[precision] = float(model.forward_backward(ids, tgt, loss_scale=1.0))
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parts[0].parameters())
    assert losses["bf16"] != losses["fp32"] and abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"]


COMBOS = {  # 4 ranks: FSDP2 sharding the TP shards (2-D), and FSDP2 under a pipeline
    "tp2 x dp2": dict(tp=2),
    "pp2 x dp2": dict(pp=2),
}
COMBO_MODEL = dict(n_layers=4, tie_embeddings=False)


def _combo_steps(rank: int, world_size: int):
    out = {}
    for name, fields in COMBOS.items():
        cfg = ParallelConfig(precision="fp32", **fields)
        dims = build_mesh(cfg, world_size, "cpu")
        model = parallelize(tiny_model(**COMBO_MODEL), dims, cfg, torch.device("cpu"), seed=5)
        ids, tgt = batch(4)
        mine = slice(2 * dims.dp_rank, 2 * dims.dp_rank + 2)
        out[name] = (one_step(model, ids[mine], tgt[mine]), (dims.pp_rank, dims.dp_rank, dims.tp_rank))
    return out


def test_fsdp_composes_with_tp_and_pp_on_four_ranks():
    want = reference_step(tiny_model(**COMBO_MODEL), *batch(4), seed=5)
    results = run_workers(_combo_steps, 4, timeout=300)
    for name in COMBOS:
        coords = [r[name][1] for r in results]
        if name.startswith("tp"):  # rank = dp * 2 + tp
            assert coords == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
            assert_same_step([r[name][0] for r in results], want)
        else:  # rank = pp * 2 + dp; the two stages of one dp replica together hold the model
            assert coords == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
            for dp in (0, 1):
                assert_same_step([r[name][0] for r, c in zip(results, coords) if c[1] == dp], want, merge=True)
