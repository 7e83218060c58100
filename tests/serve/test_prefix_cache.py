"""Prefix caching: outputs equal with it on and off (greedy and seeded sampling), hits counted in tokens,
LRU eviction when the pool is full, an aborted request leaves the shared blocks usable, the hash chain."""

from __future__ import annotations

import torch

from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.prefix_cache import BLOCK, PrefixCache, block_hashes
from mtnlg_ray.serve.sampling import SamplingParams


def random_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams, one_at_a_time: bool = True):
    """Run prompts (each to the end before the next, or all queued at once); per request: (tokens, cached)."""
    stats, got = [], {}
    engine.on_step = stats.append
    pending = [(str(i), p) for i, p in enumerate(prompts)]
    while pending or engine.has_work:
        while pending and not (one_at_a_time and engine.has_work):
            rid, prompt = pending.pop(0)
            engine.add(prompt, params, request_id=rid)
            got[rid] = ([], None)
        for out in engine.step():
            tokens, _ = got[out.request_id]
            if out.token_id is not None:
                tokens.append(out.token_id)
            got[out.request_id] = (tokens, out.num_cached_tokens)
    return [got[str(i)] for i in range(len(prompts))], stats


def test_outputs_equal_with_and_without_caching_and_hits_are_counted(tiny):
    model, _ = tiny
    system = random_ids(5 * BLOCK + 3, seed=1)  # 5 full blocks and a partial one
    prompts = [system + random_ids(n, seed=10 + n) for n in (4, 20, 1)] + [system[:2 * BLOCK + 1]]
    for params in (SamplingParams(max_tokens=24, temperature=0.0),
                   SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=5, repetition_penalty=1.2)):
        off, off_stats = run(Engine(model, max_slots=2, prefix_cache_blocks=0), prompts, params)
        on, on_stats = run(Engine(model, max_slots=2), prompts, params)
        assert [t for t, _ in on] == [t for t, _ in off]
        # the first request computes everything; later ones reuse the 5 system blocks (the last one 2: its
        # third block would hold its last token, which is always computed)
        assert [c for _, c in on] == [0, 5 * BLOCK, 5 * BLOCK, 2 * BLOCK]
        assert sum(s.prefix_cache_hits for s in on_stats) == 12 * BLOCK
        assert sum(s.prefix_cache_queries for s in on_stats) == sum(map(len, prompts))
        assert sum(s.prefix_cache_queries for s in off_stats) == 0


def test_requests_admitted_together_and_prompt_logprobs(tiny):
    model, _ = tiny
    system = random_ids(3 * BLOCK, seed=2)
    prompts = [system + random_ids(5, seed=s) for s in (3, 4, 5)]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    off, _ = run(Engine(model, max_slots=3, prefix_cache_blocks=0), prompts, params, one_at_a_time=False)
    on, _ = run(Engine(model, max_slots=3), prompts, params, one_at_a_time=False)
    assert on == off  # admitted in one step: nothing was cached yet when they looked
    engine = Engine(model, max_slots=1)
    run(engine, prompts[:1], params)
    echo = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=True, logprobs=0)
    engine.add(prompts[0], echo)
    first = engine.step()[0]
    # prompt logprobs need every prompt position's logits: the cache is not used for them
    assert first.num_cached_tokens == 0 and len(first.prompt_logprobs) == len(prompts[0])


def test_lru_eviction_under_memory_pressure(tiny):
    model, _ = tiny
    params = SamplingParams(max_tokens=6, temperature=0.0)
    prefixes = [random_ids(3 * BLOCK, seed=20 + i) for i in range(3)]  # 3 blocks each; the pool holds 7
    engine = Engine(model, max_slots=2, prefix_cache_blocks=7)
    prompts = [prefixes[0] + [1], prefixes[1] + [2], prefixes[0] + [3],  # A, B, A again (A now the most recent)
               prefixes[2] + [4],  # C takes the free block and evicts B's last two (the deepest go first)
               prefixes[0] + [5], prefixes[1] + [6]]  # A is whole; B keeps its first block
    on, _ = run(engine, prompts, params)
    assert [c for _, c in on] == [0, 0, 3 * BLOCK, 0, 3 * BLOCK, BLOCK]
    assert engine.prefix.evictions == 4 and len(engine.prefix) == 7
    off, _ = run(Engine(model, max_slots=2, prefix_cache_blocks=0), prompts, params)
    assert [t for t, _ in on] == [t for t, _ in off]
    # a prompt longer than the whole pool keeps its first blocks only
    long = random_ids(10 * BLOCK, seed=30)
    run(engine, [long], params)
    assert run(engine, [long + [9]], params)[0][0][1] == 7 * BLOCK


def test_abort_of_a_request_on_shared_blocks(tiny):
    model, _ = tiny
    system = random_ids(4 * BLOCK, seed=40)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    engine = Engine(model, max_slots=3)
    run(engine, [system + [7]], params)  # the system prompt's blocks are cached
    a = engine.add(system + [8], params)
    b = engine.add(system + [9], params)
    outs = engine.step() + engine.step()
    assert all(o.num_cached_tokens == 4 * BLOCK for o in outs)
    assert engine.abort(a).finish_reason == "abort"
    b_tokens = [o.token_id for o in outs if o.request_id == b]
    while engine.has_work:
        b_tokens += [o.token_id for o in engine.step() if o.request_id == b]
    alone, _ = run(Engine(model, max_slots=1, prefix_cache_blocks=0), [system + [9]], params)
    assert b_tokens == alone[0][0]
    again, _ = run(engine, [system + [8]], params)  # the blocks outlive the aborted request
    assert again[0][1] == 4 * BLOCK
    assert again[0][0] == run(Engine(model, max_slots=1, prefix_cache_blocks=0), [system + [8]], params)[0][0][0]


def test_hash_chain_names_a_block_by_its_whole_prefix(tiny):
    model, _ = tiny
    a, b = random_ids(BLOCK, seed=50), random_ids(BLOCK, seed=51)
    assert block_hashes(a + b)[1] != block_hashes(b + b)[1]  # the same tokens after another prefix
    assert block_hashes(a + b + a[:5]) == block_hashes(a + b)  # partial blocks are not named
    engine = Engine(model, max_slots=1, prefix_cache_blocks=0)
    pool = PrefixCache(engine.cache, 4)
    model(torch.tensor([a + b]), kv_cache=engine.cache, rows=[0])
    assert pool.store(engine.cache, 0, block_hashes(a + b)) == 2
    assert pool.store(engine.cache, 0, block_hashes(a + b)) == 0  # already there
    assert len(pool.match(block_hashes(a + a), 2)) == 1  # stops at the first block it lacks
    k, v = engine.cache.read(0, 2 * BLOCK)
    k, v = k.clone(), v.clone()
    engine.cache.reset()
    pool.load(engine.cache, 0, pool.match(block_hashes(a + b), 2))
    assert int(engine.cache.lengths[0]) == 2 * BLOCK
    assert torch.equal(engine.cache.read(0, 2 * BLOCK)[0], k) and torch.equal(engine.cache.read(0, 2 * BLOCK)[1], v)
