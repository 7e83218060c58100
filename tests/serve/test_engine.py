"""Continuous batching engine, without Ray: batched output == each request alone, joins mid-flight,
prompts of one length share a prefill, seeded sampling under different batch mixes, stop strings,
cancellation, the queue bound."""

from __future__ import annotations

import pytest
import torch

from mtnlg_ray.model.generate import generate
from mtnlg_ray.serve.engine import Engine, QueueFull
from mtnlg_ray.serve.sampling import SamplingParams

GREEDY = dict(temperature=0.0)


def prompts_of(tok, texts):
    return [tok.encode(t) for t in texts]


def run_until_done(engine, schedule, max_steps=2000):
    """Step `engine`; schedule maps step number -> [(key, prompt, params)] added before that step.
    Returns ({key: [tokens]}, {key: finish_reason}, [decode batch sizes])."""
    ids, tokens, finish = {}, {}, {}
    for n in range(max_steps):
        for key, prompt, params in schedule.get(n, []):
            ids[engine.add(prompt, params)] = key
            tokens[key] = []
        if not engine.has_work and n > max(schedule):
            return tokens, finish
        for out in engine.step():
            if out.token_id is not None:
                tokens[ids[out.request_id]].append(out.token_id)
            if out.finished:
                finish[ids[out.request_id]] = out.finish_reason
    raise AssertionError("engine did not finish")


def test_batched_greedy_equals_each_request_alone_with_mid_flight_joins(tiny):
    model, tok = tiny
    texts = ["def f(x):\n    return", "import os", "class Wrapper:\n    def __init__(self, width=70,",
             "# a comment", "for i in range(10):\n", "x"]
    prompts = prompts_of(tok, texts)
    max_tokens = [30, 12, 25, 40, 7, 18]
    batches = []
    engine = Engine(model, max_slots=3, max_waiting=8, on_step=lambda s: batches.append(s.decode_batch))
    # Requests arrive while others are decoding; with 3 rows, later ones also wait for a free row.
    schedule = {0: [(0, prompts[0], None)], 3: [(1, prompts[1], None), (2, prompts[2], None)],
                5: [(3, prompts[3], None)], 9: [(4, prompts[4], None), (5, prompts[5], None)]}
    schedule = {n: [(k, p, SamplingParams(max_tokens=max_tokens[k], **GREEDY)) for k, p, _ in reqs]
                for n, reqs in schedule.items()}
    got, finish = run_until_done(engine, schedule)
    for k, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_tokens[k])[0][len(prompt):]
        assert got[k] == alone, f"request {k} differs when batched"
        assert finish[k] == "length"
    assert max(batches) == 3  # rows really were decoded together
    assert engine.num_running == 0 and sorted(engine.free) == [0, 1, 2]


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny):
    model, tok = tiny
    target = tok.encode("def main():\n")
    params = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=1234,
                            presence_penalty=0.3, frequency_penalty=0.2, repetition_penalty=1.1)
    alone, _ = run_until_done(Engine(model, max_slots=4), {0: [("t", target, params)]})

    others = [SamplingParams(max_tokens=m, temperature=1.0, seed=s) for m, s in ((30, 1), (9, None), (40, 99))]
    mixes = [
        {0: [("a", tok.encode("import sys"), others[0]), ("t", target, params)]},
        {0: [("a", tok.encode("x = 1"), others[1])], 2: [("b", tok.encode("if"), others[2]), ("t", target, params)],
         6: [("c", tok.encode("while True:"), others[0])]},
    ]
    for mix in mixes:
        got, _ = run_until_done(Engine(model, max_slots=4), mix)
        assert got["t"] == alone["t"]
    other_seed = SamplingParams(**{**params.__dict__, "seed": 4321})
    different, _ = run_until_done(Engine(model, max_slots=4), {0: [("t", target, other_seed)]})
    assert different["t"] != alone["t"]


def test_stop_string_spanning_token_boundary(tiny):
    model, tok = tiny
    prompt = tok.encode("def f(x):")
    # seeded sampling, not greedy: an untrained model's greedy run repeats one token, often a byte piece
    sampled = dict(max_tokens=40, seed=0)
    free_run, _ = run_until_done(Engine(model), {0: [("r", prompt, SamplingParams(**sampled))]})
    ids = free_run["r"]
    pieces = [tok.decode([t]) for t in ids]
    # Pick a boundary between two tokens that both decode to text; the stop string straddles it.
    i = next(i for i in range(2, len(ids) - 1) if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[i][-1] + pieces[i + 1][0]
    full = tok.decode(ids)
    expected = full[: full.index(stop)]
    engine = Engine(model, decode=tok.decode)
    rid = engine.add(prompt, SamplingParams(stop=(stop,), **sampled))
    text, outs = "", []
    while engine.has_work:
        outs += [o for o in engine.step() if o.request_id == rid]
        text = "".join(o.text for o in outs)
        assert stop not in text  # never emitted, not even transiently
    assert outs[-1].finish_reason == "stop"
    assert text == expected


def test_stop_token_and_context_limit(tiny):
    model, tok = tiny
    prompt = tok.encode("import os")
    ref, _ = run_until_done(Engine(model), {0: [("r", prompt, SamplingParams(max_tokens=10, **GREEDY))]})
    stop_id = ref["r"][4]
    first = ref["r"].index(stop_id)
    got, finish = run_until_done(Engine(model), {0: [("r", prompt, SamplingParams(
        max_tokens=10, stop_token_ids=(stop_id,), **GREEDY))]})
    assert got["r"] == ref["r"][: first + 1] and finish["r"] == "stop"
    # A generation that fills the context ends with "length" exactly at the context size.
    engine = Engine(model, max_context=16)
    got, finish = run_until_done(engine, {0: [("r", prompt, SamplingParams(max_tokens=100, **GREEDY))]})
    assert len(prompt) + len(got["r"]) == 16 and finish["r"] == "length"


def test_logprobs_and_prompt_logprobs(tiny):
    model, tok = tiny
    prompt = tok.encode("return value")
    engine = Engine(model)
    engine.add(prompt, SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=True, **GREEDY))
    outs = []
    while engine.has_work:
        outs += engine.step()
    assert len(outs[0].prompt_logprobs) == len(prompt) and outs[0].prompt_logprobs[0] is None
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0, :, : model.config.vocab_size].log_softmax(-1)
    lp1, top1 = outs[0].prompt_logprobs[1]
    assert lp1 == pytest.approx(float(full[0, prompt[1]]), abs=1e-4) and len(top1) == 2
    for o in outs:  # greedy: the chosen token is the most likely one
        chosen, top = o.logprob
        assert top[0][0] == o.token_id and chosen == pytest.approx(top[0][1])


def test_abort_frees_the_row_at_once(tiny):
    model, tok = tiny
    engine = Engine(model, max_slots=2, max_waiting=1)
    a = engine.add(tok.encode("a = 1"), SamplingParams(max_tokens=50))
    engine.add(tok.encode("b = 2"), SamplingParams(max_tokens=50))
    c = engine.add(tok.encode("c = 3"), SamplingParams(max_tokens=50))
    engine.step()
    slot_a = next(s for s, r in engine.running.items() if r.id == a)
    assert engine.num_running == 2 and engine.num_waiting == 1 and int(engine.cache.lengths[slot_a]) > 0
    out = engine.abort(a)
    assert out.finish_reason == "abort"
    assert engine.free == [slot_a] and int(engine.cache.lengths[slot_a]) == 0
    engine.step()
    assert engine.running[slot_a].id == c  # the waiting request took the freed row
    assert engine.abort("no-such-request") is None


def test_queue_bound(tiny):
    model, tok = tiny
    engine = Engine(model, max_slots=2, max_waiting=2)
    for _ in range(4):
        engine.add(tok.encode("x"), SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        engine.add(tok.encode("x"), SamplingParams(max_tokens=2))
    engine.step()  # two admitted, two still waiting: the bound counts both
    with pytest.raises(QueueFull):
        engine.add(tok.encode("x"), SamplingParams(max_tokens=2))
    while engine.has_work:
        engine.step()
    engine.add(tok.encode("x"), SamplingParams(max_tokens=2))


class CountingModel(torch.nn.Module):
    """A GPT that records the batch shape of every forward."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.shapes = model, model.config, []

    def forward(self, ids, *args, **kwargs):
        self.shapes.append(tuple(ids.shape))
        return self.inner(ids, *args, **kwargs)


def test_prompts_of_one_length_share_a_prefill(tiny):
    model, tok = tiny
    ids = tok.encode("def f(x):\n    return x + 1\nclass A:\n    pass\n")
    same = [ids[i:i + 8] for i in range(4)]  # four prompts of 8 tokens
    other = ids[:5]
    counting = CountingModel(model)
    engine = Engine(counting, max_slots=6)
    rids = [engine.add(p, SamplingParams(max_tokens=6, **GREEDY)) for p in same + [other]]
    echo = engine.add(same[0], SamplingParams(max_tokens=0, logprobs=1, prompt_logprobs=True))
    got, first = {r: [] for r in rids}, {}
    while engine.has_work:
        for out in engine.step():
            if out.request_id in got and out.token_id is not None:
                got[out.request_id].append(out.token_id)
            if out.request_id == echo:
                first = out
    assert sorted(counting.shapes[:3]) == [(1, 5), (1, 8), (4, 8)]  # one forward per (length, echo) group
    for rid, prompt in zip(rids, same + [other]):
        assert got[rid] == generate(model, [prompt], 6)[0][len(prompt):]
    assert first.finish_reason == "length" and len(first.prompt_logprobs) == 8 and first.prompt_logprobs[0] is None


def test_runs_the_decode_plan_and_picks_up_weights_changed_while_idle(tiny_checkpoint):
    # The engine's forwards call the decode plan directly while it has work; weights changed between
    # requests (the engine idle) are checked for at the next request, as a new generate call does.
    from mtnlg_ray import from_pretrained

    tok, model = from_pretrained(tiny_checkpoint)  # its own copy: the weights change below
    generate(model, [[1, 2, 3]], 1)  # gives the model its decode plan
    engine = Engine(model, max_slots=2)
    prompt = prompts_of(tok, ["def f(x):\n    return"])[0]
    params = SamplingParams(max_tokens=12, **GREEDY)
    before, _ = run_until_done(engine, {0: [(0, prompt, params)]})
    assert engine._plan is model.decode_plan is not None
    with torch.no_grad():
        for block in model.blocks.values():
            block.mlp.down_proj.weight.mul_(-3.0)  # in place: the plan's copies are stale now
    after, _ = run_until_done(engine, {0: [(0, prompt, params)]})
    assert after[0] == generate(model, [prompt], 12)[0][len(prompt):]
    assert after[0] != before[0]
