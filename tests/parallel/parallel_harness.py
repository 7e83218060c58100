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


def one_step(model, input_ids, targets) -> tuple[float, float, float]:
    """forward_backward + clip + AdamW step on a Parallelized; (loss, grad norm, eval loss after)."""
    params = [p for part in model.parts for p in part.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    loss = model.forward_backward(input_ids, targets, loss_scale=1.0)
    norm = model.clip_grad_norm(CLIP)
    opt.step()
    after = model.eval_loss(input_ids, targets)
    return float(loss), norm, float(after)


def full_state(model) -> dict[str, torch.Tensor]:
    """Full, unsharded weights of this rank's parts by FQN (DCP state-dict API)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd: dict[str, torch.Tensor] = {}
    for part in model.parts:
        part_sd = get_model_state_dict(part, options=StateDictOptions(full_state_dict=True))
        sd |= {k: v.detach().clone() for k, v in part_sd.items()}
    return sd


def reference_step(model_cfg: ModelConfig, input_ids, targets, seed: int = 0):
    """The same step in one process without any parallelism: (loss, norm, eval loss, weights)."""
    from mtnlg_ray.parallel import build_mesh, parallelize

    cfg = ParallelConfig(precision="fp32")
    model = parallelize(model_cfg, build_mesh(cfg, 1, "cpu"), cfg, torch.device("cpu"), seed=seed)
    loss, norm, after = one_step(model, input_ids, targets)
    return loss, norm, after, {k: v.detach().clone() for k, v in model.parts[0].state_dict().items()}


def assert_close_rel(got: float | torch.Tensor, want: float | torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """||got - want|| <= rel * ||want|| (L2 over all entries; plain relative error for scalars).

    The norm, not each entry: after an Adam step an entry whose gradient is a near-cancellation
    (~1e-10) moves by lr * g / (|g| + eps), which turns a 1e-7 difference in summation order into
    a visible one for that single entry; the tensor as a whole still agrees to ~1e-7."""
    got = torch.as_tensor(got).detach().to(torch.float64)
    want = torch.as_tensor(want).detach().to(torch.float64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, scale = float((got - want).norm()), float(want.norm())
    assert err <= rel * scale, f"{what}: |difference| {err:.3g} exceeds {rel} x |reference| {scale:.3g}"


def assert_same_weights(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Every tensor within `rel` of the reference, except the key-projection bias: softmax is
    invariant to adding q.b_k to every score, so its gradient is exactly zero in exact arithmetic
    and what Adam makes of it is normalised rounding noise, different for every reduction order.
    When the reference took no real step there (a real update has size ~lr; with rotary positions
    the bias does get a gradient), we check that neither side did."""
    assert sorted(got) == sorted(want), f"parameter names differ: {sorted(set(got) ^ set(want))[:5]}"
    for name in want:
        if name.endswith("attn.k_proj.bias") and float(want[name].abs().max()) < 0.01 * LR:
            assert float(got[name].abs().max()) < 0.01 * LR, f"{name}: moved by {float(got[name].abs().max()):.3g}"
            continue
        assert_close_rel(got[name], want[name], rel, name)
