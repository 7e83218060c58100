"""n-gram speculative decoding in the engine: greedy outputs (and their logprobs, stops, penalties, context
limit) identical with it on and off, seeded sampling reproducible, drafts and acceptances counted."""

from __future__ import annotations

import pytest

from mtnlg_ray.config import SpeculativeConfig
from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.sampling import SamplingParams

SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]):
    """Queue every request, step to the end; (outputs per request, StepStats of every step)."""
    stats, outs = [], {}
    engine.on_step = stats.append
    for i, (prompt, params) in enumerate(requests):
        engine.add(prompt, params, request_id=str(i))
        outs[str(i)] = []
    while engine.has_work:
        for out in engine.step():
            outs[out.request_id].append(out)
    return [outs[str(i)] for i in range(len(requests))], stats


def tokens(outs) -> list[int]:
    return [o.token_id for o in outs if o.token_id is not None]


def test_greedy_outputs_identical_with_speculation(tiny):
    model, tok = tiny
    texts = ["def f(x):\n    return x\n\ndef g(x):\n    return", "import os", "class A:\n    pass\nclass B:"]
    prompts = [tok.encode(t) for t in texts]
    reqs = [(p, SamplingParams(max_tokens=n, temperature=0.0, logprobs=2)) for p, n in zip(prompts, (40, 25, 33))]
    reqs.append((prompts[0], SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=1.3,
                                            frequency_penalty=0.2)))
    plain, _ = run(Engine(model, max_slots=3), reqs)
    spec, stats = run(Engine(model, max_slots=3, speculative=SPEC), reqs)
    for a, b in zip(plain, spec):
        assert tokens(b) == tokens(a)
        assert [o.finish_reason for o in b][-1] == "length"
        for x, y in zip(a, b):  # the logprobs of each token too
            assert (x.logprob is None) == (y.logprob is None)
            if x.logprob is not None:
                assert y.logprob[1][0][0] == x.logprob[1][0][0] and y.logprob[0] == pytest.approx(x.logprob[0], abs=1e-4)
    drafted, accepted = sum(s.spec_draft_tokens for s in stats), sum(s.spec_accepted_tokens for s in stats)
    assert 0 < accepted <= drafted
    assert len(stats) < sum(len(tokens(o)) for o in plain)  # fewer steps than tokens: runs were accepted


def test_stops_and_context_limit_inside_an_accepted_run(tiny):
    model, tok = tiny
    prompt = tok.encode("x = 1\nx = 1\nx = 1\n")
    free, _ = run(Engine(model), [(prompt, SamplingParams(max_tokens=30, temperature=0.0))])
    ref = tokens(free[0])
    stop_at = ref.index(ref[12]) + 1  # the first occurrence of the 13th token ends a stop-token run
    stop_text = tok.decode(ref[:20])[-3:]
    cases = [SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=(ref[12],)),
             SamplingParams(max_tokens=7, temperature=0.0)]
    for params in cases:
        plain, _ = run(Engine(model, decode=tok.decode), [(prompt, params)])
        spec, _ = run(Engine(model, decode=tok.decode, speculative=SPEC), [(prompt, params)])
        assert tokens(spec[0]) == tokens(plain[0]) and spec[0][-1].finish_reason == plain[0][-1].finish_reason
    assert len(tokens(spec[0])) == 7
    assert len(tokens(run(Engine(model, speculative=SPEC), [(prompt, cases[0])])[0][0])) == stop_at
    stop = SamplingParams(max_tokens=30, temperature=0.0, stop=(stop_text,))
    plain, _ = run(Engine(model, decode=tok.decode), [(prompt, stop)])
    spec, _ = run(Engine(model, decode=tok.decode, speculative=SPEC), [(prompt, stop)])
    assert "".join(o.text for o in spec[0]) == "".join(o.text for o in plain[0]) and spec[0][-1].finish_reason == "stop"
    # a row that fills the context: no draft is written past it
    engine = Engine(model, max_context=len(prompt) + 9, speculative=SPEC)
    got, _ = run(engine, [(prompt, SamplingParams(max_tokens=100, temperature=0.0))])
    assert tokens(got[0]) == ref[:9] and got[0][-1].finish_reason == "length"


def test_seeded_sampling_with_speculation_is_reproducible_whatever_the_batch(tiny):
    model, tok = tiny
    prompt = tok.encode("for i in range(10):\n    for j in range(10):\n        for")
    params = SamplingParams(max_tokens=30, temperature=0.5, top_k=20, seed=11, presence_penalty=0.1)
    alone, _ = run(Engine(model, speculative=SPEC), [(prompt, params)])
    other = (tok.encode("while True:"), SamplingParams(max_tokens=40, temperature=1.0, seed=2))
    mixed, _ = run(Engine(model, speculative=SPEC), [other, (prompt, params)])
    assert tokens(mixed[1]) == tokens(alone[0]) and len(tokens(alone[0])) == 30
    # over the batch limit a step decodes one token per row
    capped, stats = run(Engine(model, speculative=SPEC.model_copy(update={"disable_by_batch_size": 1})),
                        [other, (prompt, SamplingParams(max_tokens=30, temperature=0.0))])
    assert all(s.spec_draft_tokens == 0 for s in stats if s.decode_batch > 1)


def test_rows_not_packed_from_zero(tiny):
    model, tok = tiny
    prompts = [tok.encode(t) for t in ("a = [1, 2, 3]\nb = [1, 2, 3]\n", "import sys", "x = y")]
    long = SamplingParams(max_tokens=40, temperature=0.0)
    # the first request ends at its prefill: rows 1 and 2 decode (gathered rows, not views)
    reqs = [(prompts[2], SamplingParams(max_tokens=1, temperature=0.0)), (prompts[0], long), (prompts[1], long)]
    engine = Engine(model, max_slots=3, speculative=SPEC)
    got, stats = run(engine, reqs)
    plain, _ = run(Engine(model, max_slots=3), reqs)
    assert [tokens(o) for o in got] == [tokens(o) for o in plain]
    assert sum(s.spec_accepted_tokens for s in stats) > 0
    assert int(engine.cache.lengths.max()) == 0  # every row was freed
