"""The native decode step (model/native_step.py, decode_step.c) gives the torch plan's logits and cache."""

import os
import subprocess
import sys

import pytest
import torch

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model import native_step
from mtnlg_ray.model.generate import use_decode_layout
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.model.kv_cache import KVCache
from mtnlg_ray.model.quantize import quantize_rows

TOL = 1e-4  # float32, same math in another order
pytestmark = pytest.mark.skipif(not native_step._cpu_ok(), reason="the native step needs an x86-64 CPU with AVX2")


def model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layers=2, d_model=64, n_heads=4, max_seq_len=96, vocab_size=300) | kw
    m = GPT(ModelConfig(**cfg)).eval()
    use_decode_layout(m)
    return m


@torch.no_grad()
def steps(m, native: bool, lengths: list[int], rows: list[int] | None, n: int = 6, slots: int = 20):
    """Prefill `lengths` random prompts into `rows`, then n one-token steps of them all; returns
    (logits of the steps (B, n, V), the cache). With `native` the prefills of up to 16 tokens and
    the steps run natively; without, on the plan's torch ops."""
    plan = m.decode_plan
    saved, plan.native = plan.native, (plan.native if native else None)
    try:
        g = torch.Generator().manual_seed(1)
        cache = KVCache.for_model(m, slots, 64)
        for r, length in zip(rows or range(len(lengths)), lengths):
            m(torch.randint(0, 300, (1, length), generator=g), cache, [r])
        out = [m(torch.randint(0, 300, (len(lengths), 1), generator=g), cache, rows) for _ in range(n)]
        return torch.cat(out, 1), cache
    finally:
        plan.native = saved


def test_builds_here_with_weights_in_one_huge_page_buffer():
    assert native_step.library() is not None
    plan = model().decode_plan
    assert plan.native is not None
    assert plan.native.arena.data_ptr() % native_step.HUGE_PAGE == 0
    # the native step runs every forward of up to 16 rows: the torch products keep no small-batch copies
    assert all(p.blocked is None and p.halves is None for L in plan.layers for p in (L.qkv, L.out, L.up, L.down))


@pytest.mark.parametrize("kw", [{}, {"position": "rotary", "bias": False}, {"tie_embeddings": False},
                                {"d_model": 128, "n_heads": 2, "vocab_size": 1000},
                                {"d_model": 256, "n_heads": 4}])  # MLP rows of 4 KiB: one batch row takes the tiles
@pytest.mark.parametrize("lengths,rows", [([7], None), ([5, 5, 5], None), ([3, 9, 6, 12, 1], [5, 0, 2, 3, 19]),
                                          ([4] * 16, None)])
def test_native_equals_torch_plan(kw, lengths, rows):
    # one row; rows 0..B-1 at one length (generate); rows of different lengths in scattered slots
    # (the engine); the most rows the native step takes. Every kernel tile width (1, 3, 4, 5 and 6 batch rows) runs.
    m = model(**kw)
    (a, cache_a), (b, cache_b) = steps(m, True, lengths, rows), steps(m, False, lengths, rows)
    assert a.shape == b.shape == (len(lengths), 6, m.config.padded_vocab_size)
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    torch.testing.assert_close(cache_a.k, cache_b.k, atol=TOL, rtol=0)
    torch.testing.assert_close(cache_a.v, cache_b.v, atol=TOL, rtol=0)
    assert torch.equal(cache_a.lengths, cache_b.lengths)


@pytest.mark.parametrize("rows", [None, [3, 1]])
def test_several_tokens_per_row_attend_causally(rows):
    # speculative verification: T tokens per row, each attending to its row's cache and the tokens before it
    m = model(position="rotary")
    outs = []
    for native in (True, False):
        m.decode_plan.native, saved = (m.decode_plan.native if native else None), m.decode_plan.native
        g = torch.Generator().manual_seed(2)
        cache = KVCache.for_model(m, 4, 64)
        with torch.no_grad():
            m(torch.randint(0, 300, (2, 5), generator=g), cache, rows)
            outs.append((m(torch.randint(0, 300, (2, 4), generator=g), cache, rows), cache))
        m.decode_plan.native = saved
    (a, ca), (b, cb) = outs
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    torch.testing.assert_close(ca.k, cb.k, atol=TOL, rtol=0)
    assert torch.equal(ca.lengths, cb.lengths) and ca.lengths.sum() == 18


def test_more_rows_than_native_takes_run_the_torch_plan():
    m = model()
    a, _ = steps(m, True, [3] * (native_step.MAX_ROWS + 1), None)
    b, _ = steps(m, False, [3] * (native_step.MAX_ROWS + 1), None)
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("rows", [[1, 0], [1]])  # one batch row: the sequential row kernel
def test_int8_is_the_float_model_with_dequantized_weights(rows):
    # int8 weights times float32 activations: the float model whose Linears and head hold scale * Q
    m, ref = model(), model()
    ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())  # untied: the embedding stays
    for mod in [ref.lm_head] + [mod for blk in ref.blocks.values() for mod in
                                (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj, blk.attn.out_proj,
                                 blk.mlp.up_proj, blk.mlp.down_proj)]:
        q, s = quantize_rows(mod.weight)
        mod.weight.copy_(q.float() * s[:, None])
    use_decode_layout(m, "int8")
    use_decode_layout(ref)
    assert m.decode_plan.native is not None
    g = torch.Generator().manual_seed(1)
    cache = KVCache.for_model(ref, 4, 64)
    for r, n in ((1, 5), (0, 8)):  # the same float prefill for both
        ref(torch.randint(0, 300, (1, n), generator=g), cache, [r])
    ids = [torch.randint(0, 300, (len(rows), 1), generator=g) for _ in range(6)]
    caches = [cache, KVCache.for_model(ref, 4, 64)]
    caches[1].k.copy_(cache.k), caches[1].v.copy_(cache.v), caches[1].lengths.copy_(cache.lengths)
    a, b = (torch.cat([net(i, c, rows) for i in ids], 1) for net, c in ((m, caches[0]), (ref, caches[1])))
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@torch.no_grad()
def test_generate_same_tokens_and_follows_weight_changes():
    m = model()
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    on = m.generate(prompt, 40)
    m.decode_plan.native, saved = None, m.decode_plan.native
    off = m.generate(prompt, 40)
    m.decode_plan.native = saved
    assert torch.equal(on, off)
    # an optimizer-style in-place update and a replaced weight tensor: the plan rebuilds, same tokens as plain
    blk = m.blocks["0"]
    blk.mlp.down_proj.weight.add_(0.05)
    blk.attn.out_proj.weight.data = blk.attn.out_proj.weight.data * 1.5
    plain = GPT(m.config).eval()
    plain.load_state_dict(m.state_dict())
    assert torch.equal(m.generate(prompt, 40), plain.generate(prompt, 40))


def test_overflow_is_a_clear_error():
    m = model()
    cache = KVCache.for_model(m, 1, 4)
    m(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="KV cache overflow: position 4 >= max_len 4"):
        m(torch.zeros(1, 1, dtype=torch.long), cache)


def test_build_is_cached_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MTNLG_CACHE_DIR", str(tmp_path))
    cc = native_step.shutil.which("cc") or native_step.shutil.which("gcc")
    first = native_step._build(cc)
    stamp = first.stat().st_mtime_ns
    assert native_step._build(cc) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_switched_off_by_environment():
    code = ("from mtnlg_ray.model import native_step; import mtnlg_ray.model.gpt as g, mtnlg_ray.config as c;"
            "m = g.GPT(c.ModelConfig(n_layers=1, d_model=64, n_heads=4, vocab_size=100)).eval();"
            "m.generate([[1, 2]], 3); print(native_step.library(), m.decode_plan.native)")
    out = subprocess.run([sys.executable, "-c", code], env=os.environ | {"MTNLG_NATIVE_DECODE": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "None"]
