"""A global batch that does not divide by micro_batch x dp, dealt out by the training loop's own
code (mtnlg_ray/train/batching.py) over 2 gloo processes, gives the step of one plain process on
the same rows: same loss, gradients and updated weights (fp32, 1e-5 relative).

This is what lets an elastic run keep its global batch at any worker count."""

from __future__ import annotations

import torch

from mtnlg_ray.config import ParallelConfig
from mtnlg_ray.parallel import build_mesh, parallelize
from parallel_harness import CLIP, LR, assert_same_step, batch, reference_step, run_workers, tiny_model

PP_MODEL = dict(n_layers=4, tie_embeddings=False)
CASES = {  # name -> (parallel fields, model fields, global batch, micro_batch_size, masked labels)
    # slots of 2, 1, 1, 1 rows; rank 0's second micro-batch is a row masked all along (no counted token)
    "fsdp G=5 m=2, masked labels": ({"data_parallel": "fsdp"}, {}, 5, 2, True),
    "ddp G=6 m=4": ({"data_parallel": "ddp"}, {}, 6, 4, False),  # one micro-step of 3 rows per rank
    "fsdp G=1 m=2": ({"data_parallel": "fsdp"}, {}, 1, 2, False),  # rank 1 trains on a padding row only
    # dp 1 over two stages: micro-batches of 2, 2, 1 rows, the last padded to 2 (one chunk all padding)
    # (the three micro-batches run as the 6 chunks of one 1F1B schedule)
    "pp2 G=5 m=2": ({"pp": 2, "pp_microbatches": 2, "pp_schedule": "1f1b"}, PP_MODEL, 5, 2, True),
    # one chunk per step for two stages: too few for 1F1B, so that shape runs under GPipe
    "pp2 1f1b G=1 m=1": ({"pp": 2, "pp_microbatches": 1, "pp_schedule": "1f1b"}, PP_MODEL, 1, 1, False),
}
SEED = 11


def global_rows(g: int, masked: bool) -> dict[str, torch.Tensor]:
    """G rows of 17 ids (+ labels with unevenly placed -100s when `masked`)."""
    ids, tgt = batch(g, seed=3)
    rows = {"input_ids": torch.cat([ids, tgt[:, -1:]], dim=1)}
    if masked:
        labels = rows["input_ids"].clone()
        labels[0, :10] = -100
        labels[min(3, g - 1), :] = -100
        labels[g - 1, 5:9] = -100
        rows["labels"] = labels
    return rows


def _padded_for_eval(rows: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """The rows plus uncounted rows up to a multiple of `multiple` (the pipeline splits batches evenly)."""
    from mtnlg_ray.train.batching import deal

    if multiple == 1:
        return rows
    (mb,) = deal(rows, -(-len(rows["input_ids"]) // multiple) * multiple, 1, 0, pad_to_micro_batch=True).micro
    return mb.rows


def _elastic_step(rank: int, world_size: int):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from mtnlg_ray.train.batching import accumulate, deal, inputs_targets

    out = {}
    for name, (fields, model_fields, g, mb, masked) in CASES.items():
        cfg = ParallelConfig(precision="fp32", **fields)
        dims = build_mesh(cfg, world_size, "cpu")
        model = parallelize(tiny_model(**model_fields), dims, cfg, torch.device("cpu"), seed=SEED)
        params = [p for part in model.parts for p in part.parameters()]
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)  # as the harness
        rows = global_rows(g, masked)
        batches = deal(rows, mb, dims.dp, dims.dp_rank, pad_to_micro_batch=dims.pp > 1)
        loss = accumulate(model, batches, torch.device("cpu"))  # the loop's own accumulation
        norm = model.clip_grad_norm(CLIP)
        grads = {}
        for part in model.parts:
            for pname, p in part.named_parameters():
                if p.grad is None:
                    continue
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[pname.removeprefix("module.")] = grad.detach().clone()
        opt.step()
        if dims.dp > 1:
            dist.all_reduce(loss, group=dims.group("dp"))
        loss = float(loss) / batches.global_tokens  # the loop's logged loss: token mean over the G rows
        after = float(model.eval_loss(*inputs_targets(_padded_for_eval(rows, cfg.pp_microbatches if dims.pp > 1 else 1),
                                                      torch.device("cpu"))))
        weights = {}
        for part in model.parts:
            sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
            weights |= {k: v.detach().clone() for k, v in sd.items()}
        shapes = [tuple(m.rows["input_ids"].shape) for m in batches.micro]
        out[name] = ((loss, norm, after, grads, weights), (dims.pp_rank, dims.dp_rank), shapes)
    return out


def test_uneven_global_batch_step_matches_single_process():
    results = run_workers(_elastic_step, 2, timeout=300)
    shapes = {name: [r[name][2] for r in results] for name in CASES}
    assert shapes["fsdp G=5 m=2, masked labels"] == [[(2, 17), (1, 17)], [(1, 17), (1, 17)]]
    assert shapes["ddp G=6 m=4"] == [[(3, 17)], [(3, 17)]]
    assert shapes["fsdp G=1 m=2"] == [[(1, 17)], [(1, 17)]]
    assert shapes["pp2 G=5 m=2"] == [[(2, 17), (2, 17), (2, 17)]] * 2
    for name, (fields, model_fields, g, mb, masked) in CASES.items():
        rows = global_rows(g, masked)
        labels = rows.get("labels", rows["input_ids"])
        want = reference_step(tiny_model(**model_fields), rows["input_ids"][:, :-1], labels[:, 1:], seed=SEED)
        steps = [r[name][0] for r in results]
        if "pp" in fields:  # the two stages together hold the model
            assert_same_step(steps, want, merge=True)
        else:
            assert_same_step(steps, want)
