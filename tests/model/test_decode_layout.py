"""The decode plan (model/decode_layout.py) gives the plain model's logits through KV-cached decoding."""

import pytest
import torch
from torch import nn

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model import decode_layout
from mtnlg_ray.model.generate import use_decode_layout
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.model.kv_cache import KVCache

TOL = 1e-4  # float32, same math in another op order


def pair(position="learned", seed=0):
    """Two copies of one small model: plain forward, and with the decode plan."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, max_seq_len=64, vocab_size=300, position=position)
    plain = GPT(cfg).eval()
    planned = GPT(cfg).eval()
    planned.load_state_dict(plain.state_dict())
    use_decode_layout(planned)
    assert planned.decode_plan is not None and plain.decode_plan is None
    return plain, planned


@torch.no_grad()
def decode(model, prompts: list[list[int]], steps: int, slots: int, rows: list[int] | None):
    """Prefill each prompt into its cache row, then `steps` greedy one-token steps of all rows
    together (rows None: rows 0..B-1 without a rows argument). Returns every forward's logits."""
    cache = KVCache.for_model(model, slots, 64)
    rows = rows or list(range(len(prompts)))
    out, last = [], []
    for r, p in zip(rows, prompts):
        logits = model(torch.tensor([p]), cache, [r], last_only=True)
        out.append(logits)
        last.append(logits[:, -1])
    nxt = torch.cat(last).argmax(-1)
    for _ in range(steps):
        logits = model(nxt[:, None], kv_cache=cache, rows=None if rows == list(range(len(prompts))) else rows)
        out.append(logits)
        nxt = logits[:, -1].argmax(-1)
    return out


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize("lengths,rows", [([7], None), ([5, 5, 5], None), ([3, 9, 6, 12], [5, 0, 2, 3])])
def test_plan_equals_plain_logits(position, lengths, rows):
    # batch 1; rows 0..B-1 at one length (generate); rows of different lengths in scattered slots (the engine)
    plain, planned = pair(position)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]
    a, b = decode(plain, prompts, 20, 6, rows), decode(planned, prompts, 20, 6, rows)
    assert len(a) == len(b) == len(prompts) + 20
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(y, x, atol=TOL, rtol=0)


@torch.no_grad()
def test_batched_prefill_and_many_rows_equal_plain():
    # one prefill of several rows (T > 1 with every row from 0), more rows than the small-batch path
    plain, planned = pair()
    ids = torch.randint(0, 300, (20, 9))
    outs = []
    for m in (plain, planned):
        cache = KVCache.for_model(m, 20, 32)
        first = m(ids, kv_cache=cache)  # (20, 9, V)
        step = m(first[:, -1:].argmax(-1), kv_cache=cache)  # 20 rows > SMALL_BATCH
        outs.append((first, step))
    for x, y in zip(*outs):
        torch.testing.assert_close(y, x, atol=TOL, rtol=0)


@torch.no_grad()
def test_generate_same_tokens_with_and_without_plan():
    plain, planned = pair()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    plain_out = plain.generate(prompts, 12)
    plain.decode_plan = None  # generate gave it a plan: drop it again
    assert planned.generate(prompts, 12) == plain_out


@torch.no_grad()
def test_plan_follows_in_place_weight_changes_and_module_swaps():
    plain, planned = pair()
    for m in (plain, planned):
        m.blocks["0"].attn.k_proj.weight.mul_(1.5)  # an optimizer step between generate calls
    ids = torch.randint(0, 300, (2, 6))

    def logits(m):
        return m(ids, kv_cache=KVCache.for_model(m, 2, 16))

    torch.testing.assert_close(logits(planned), logits(plain), atol=TOL, rtol=0)

    class Adapted(nn.Module):  # stands for a LoRA-wrapped projection: the plan cannot fuse it
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) * 0.5

    for m in (plain, planned):
        m.blocks["1"].attn.q_proj = Adapted(m.blocks["1"].attn.q_proj)
    torch.testing.assert_close(logits(planned), logits(plain), atol=TOL, rtol=0)
    assert planned.decode_plan is None  # the plain forward runs from now on
    assert decode_layout.plan_decode(planned) is None


def test_training_forward_untouched():
    # the plan runs only for cached forwards without autograd; training keeps the module graph
    plain, planned = pair()
    planned.train()
    ids = torch.randint(0, 300, (2, 8))
    loss = planned(ids).square().mean()
    loss.backward()
    assert planned.blocks["0"].attn.q_proj.weight.grad is not None
    torch.testing.assert_close(planned(ids), plain.train()(ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("column_major", [False, True])
def test_product_forms_equal_linear_for_every_row_count(column_major):
    """One row (halves), 2-16 rows (oneDNN's blocked copy where torch has oneDNN), more (F.linear)."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 48), torch.randn(96)
    if column_major:  # the LM head after use_decode_layout
        w = w.t().contiguous().t()
    prod = decode_layout._Product(w, None if column_major else b)
    assert (prod.blocked is not None) == decode_layout.ONEDNN
    for n in (1, 2, 5, 16, 17, 40):
        x = torch.randn(n, 48)
        want = nn.functional.linear(x, w, None if column_major else b)
        assert torch.allclose(prod(x), want, atol=TOL), n
        assert torch.allclose(prod(x.view(1, n, 48)), want.view(1, n, 96), atol=TOL), n
