"""train.compile: each block compiled with torch.compile (Inductor) trains like the eager model."""

import torch

from mtnlg_ray.config import ModelConfig, ParallelConfig
from mtnlg_ray.parallel import build_mesh, parallelize


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, max_seq_len=32, vocab_size=300)
    par = ParallelConfig()
    dims = build_mesh(par, 1, "cpu", cfg)
    eager = parallelize(cfg, dims, par, torch.device("cpu"), seed=3)
    compiled = parallelize(cfg, dims, par, torch.device("cpu"), seed=3, compile_blocks=True)
    names = [n for n, _ in compiled.parts[0].named_parameters()]
    assert names == [n for n, _ in eager.parts[0].named_parameters()]  # checkpoints unchanged
    ids = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(0))
    for model in (eager, compiled):
        model.forward_backward(ids[:, :-1], ids[:, 1:], loss_scale=1.0)
    a, b = (float(m.eval_loss(ids[:, :-1], ids[:, 1:])) for m in (eager, compiled))
    assert abs(a - b) < 1e-5
    for (n, p), (_, q) in zip(eager.parts[0].named_parameters(), compiled.parts[0].named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert any(hasattr(blk, "_compiled_call_impl") and blk._compiled_call_impl is not None
               for blk in compiled.parts[0].blocks.values())
