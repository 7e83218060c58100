"""Multi-process harness for the parallelism tests: real gloo process groups, no Ray.

`run_workers(fn, world_size, *args)` spawns `world_size` processes that join one gloo group over a
free local TCP port, run `fn(rank, world_size, *args)` with one intra-op thread each, and returns
their results in rank order. A worker exception fails the test with that worker's traceback; a
hang fails it after `timeout` seconds (the workers are killed).

`one_step` is the training step every layout is compared on (forward_backward, clip, AdamW) and
`reference_step` the same step in one plain process.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from typing import NamedTuple

import torch
import torch.multiprocessing as mp

from mtnlg_ray.config import ModelConfig, ParallelConfig

LR = 1e-3
CLIP = 0.5  # low enough that the step really clips


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, results, fn, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # by value: shared-memory tensors would vanish with this process
        results.put((rank, "ok", buf.getvalue()))
        dist.barrier()  # keep the group alive until every rank has sent its result
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))


def run_workers(fn, world_size: int, *args, timeout: float = 150.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, results, fn, args), daemon=True)
             for r in range(world_size)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"parallel workers timed out after {timeout}s (got ranks {sorted(out)})") from None
            if status == "error":
                raise AssertionError(f"worker rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]


def tiny_model(**overrides) -> ModelConfig:
    """The debug preset with a 96-token vocabulary (padded to 128 rows), fp32, no dropout."""
    fields = dict(preset="debug", vocab_size=96, max_seq_len=32) | overrides
    return ModelConfig(**fields)


def batch(n: int = 4, t: int = 16, seed: int = 0, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


class StepResult(NamedTuple):
    loss: float  # returned by forward_backward
    norm: float  # returned by clip_grad_norm
    after: float  # eval_loss on the same batch after the optimizer step
    grads: dict[str, torch.Tensor]  # full clipped gradients of this rank's parameters, by FQN
    weights: dict[str, torch.Tensor]  # full updated weights of this rank's parts, by FQN


def one_step(model, input_ids, targets, accumulate: int = 1) -> tuple:
    """forward_backward over `accumulate` micro-batches (gradient sync on the last only) + clip +
    AdamW step on a Parallelized; the fields of a StepResult (a plain tuple, to cross processes).
    With dp > 1 each dp rank passes its own rows and the loss is averaged over dp."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    params = [p for part in model.parts for p in part.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for i, (ids, tgt) in enumerate(zip(input_ids.chunk(accumulate), targets.chunk(accumulate))):
        model.set_grad_sync(i == accumulate - 1)
        losses.append(model.forward_backward(ids, tgt, loss_scale=1.0 / accumulate))
    loss = torch.stack(losses).mean()
    norm = model.clip_grad_norm(CLIP)
    grads = {}
    for part in model.parts:
        for name, p in part.named_parameters():
            if p.grad is None:  # frozen (e.g. the base weights under LoRA)
                continue
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name.removeprefix("module.")] = g.detach().clone()  # DDP's wrapper prefix
    opt.step()
    after = model.eval_loss(input_ids, targets)
    if model.dims.dp > 1:  # each dp rank saw its own rows (equal token counts): average the means
        both = torch.stack([loss, after])
        dist.all_reduce(both, group=model.dims.group("dp"))
        loss, after = both / model.dims.dp
    weights: dict[str, torch.Tensor] = {}
    for part in model.parts:
        if model.dims.mesh is None:  # one process: no process group for the DCP helpers
            part_sd = part.state_dict()
        else:
            part_sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        weights |= {k: v.detach().clone() for k, v in part_sd.items()}
    return (float(loss), norm, float(after), grads, weights)


def reference_step(model_cfg: ModelConfig, input_ids, targets, seed: int = 0, model_transform=None) -> StepResult:
    """The same step in one process without any parallelism."""
    from mtnlg_ray.parallel import build_mesh, parallelize

    cfg = ParallelConfig(precision="fp32")
    model = parallelize(model_cfg, build_mesh(cfg, 1, "cpu"), cfg, torch.device("cpu"), seed=seed,
                        model_transform=model_transform)
    return StepResult(*one_step(model, input_ids, targets))


def assert_close_rel(got, want, rel: float = 1e-5, what: str = "", floor: float = 0.0) -> None:
    """||got - want|| <= rel * max(||want||, floor) (L2 over all entries; relative error for scalars)."""
    got = torch.as_tensor(got).detach().to(torch.float64)
    want = torch.as_tensor(want).detach().to(torch.float64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, scale = float((got - want).norm()), max(float(want.norm()), floor)
    assert err <= rel * scale, f"{what}: |difference| {err:.3g} exceeds {rel} x {scale:.3g}"


def _global_norm(tensors: dict) -> float:
    return float(sum(t.double().norm() ** 2 for t in tensors.values()) ** 0.5)


def assert_same_step(ranks: list[tuple], want: StepResult, rel: float = 1e-5, merge: bool = False) -> None:
    """Every rank returns the reference loss, grad norm and post-step eval loss; the gradients
    agree tensor by tensor and the updated weights as a whole, all within `rel`.

    `merge`: the ranks hold disjoint parameters (pipeline stages); compare their union.
    Gradients are compared per tensor against max(its norm, 1e-4 x the global norm): the key
    projection bias has an exactly zero gradient in exact arithmetic (softmax ignores a shift
    shared by all keys), so only rounding noise is left to compare there. Weights are compared as
    one vector: after Adam's first step an entry moves by lr * g / (|g| + eps), which for the few
    entries with |g| near eps turns a 1e-7 difference in summation order into a visible one for
    that entry alone, while the gradients themselves agree to ~1e-7."""
    ranks = [StepResult(*r) for r in ranks]
    for r in ranks:
        assert_close_rel(r.loss, want.loss, rel, "loss")
        assert_close_rel(r.norm, want.norm, rel, "grad norm")
        assert_close_rel(r.after, want.after, rel, "eval loss after the step")
    views = [ranks] if merge else [[r] for r in ranks]
    for view in views:
        grads, weights = {}, {}
        for r in view:
            assert not set(weights) & set(r.weights), "ranks hold the same parameters"
            grads |= r.grads
            weights |= r.weights
        assert sorted(weights) == sorted(want.weights), f"names differ: {sorted(set(weights) ^ set(want.weights))[:5]}"
        assert sorted(grads) == sorted(want.grads), f"names differ: {sorted(set(grads) ^ set(want.grads))[:5]}"
        floor = 1e-4 * _global_norm(want.grads)
        for name, g in want.grads.items():
            assert_close_rel(grads[name], g, rel, f"gradient of {name}", floor)
        diff = {k: weights[k] - want.weights[k] for k in want.weights}
        assert _global_norm(diff) <= rel * _global_norm(want.weights), \
            f"updated weights differ by {_global_norm(diff):.3g} (norm {_global_norm(want.weights):.3g})"


def lora(model) -> None:
    """The LoRA transform the fine-tuning loop applies: adapters on both column- and row-parallel linears."""
    from mtnlg_ray.config import LoraConfig
    from mtnlg_ray.model.lora import apply_lora

    apply_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "out_proj", "up_proj", "down_proj"]))
