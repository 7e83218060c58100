"""Multi-LoRA in the engine: requests for several adapters and the base model share batches, and each gets
what its merged model (the export of its LoRA run) gives: the same greedy tokens, logprobs within 1e-4;
the prefix cache never hands one adapter's KV blocks to another; speculative decoding keeps the outputs."""

from __future__ import annotations

import pytest

from mtnlg_ray.api import from_pretrained
from mtnlg_ray.checkpoint.lora_adapter import read_adapter
from mtnlg_ray.checkpoint.native import build_model
from mtnlg_ray.config.serve import SpeculativeConfig
from mtnlg_ray.model.multi_lora import LoraBank
from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.sampling import SamplingParams

PROMPT = ("def wrap(text, width=70, **kwargs):\n    w = TextWrapper(width=width, **kwargs)\n"
          "    return w.wrap(text)\n\ndef fill(text, width=70")


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tiny_loras):
    """(a fresh tiny model with a bank of the LoRA runs' adapters, {name: merged model}, tokenizer)."""
    tok, model = from_pretrained(tiny_checkpoint)
    bank = LoraBank(model, max_loras=3)
    merged = {None: from_pretrained(tiny_checkpoint)[1]}
    for name, (run, state) in tiny_loras.items():
        bank.load(name, read_adapter(str(run), model.config))
        merged[name] = build_model(model.config, state).eval()
    return model, bank, merged, tok


def run(engine, requests):
    """Add every (lora, prompt, params) at once, step to the end: {index: (tokens, logprobs)}, hits per step."""
    ids = {engine.add(p, params, lora=lora): i for i, (lora, p, params) in enumerate(requests)}
    got = {i: ([], []) for i in range(len(requests))}
    while engine.has_work:
        for out in engine.step():
            if out.token_id is not None:
                got[ids[out.request_id]][0].append(out.token_id)
                got[ids[out.request_id]][1].append(out.logprob[0])
    return got


def alone(model, prompt, params):
    return run(Engine(model, max_slots=1, prefix_cache_blocks=0), [(None, prompt, params)])[0]


def check(got, want):
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-4)


def test_mixed_batches_equal_the_merged_models_and_the_prefix_cache_keeps_adapters_apart(served):
    model, bank, merged, tok = served
    prompt = tok.encode(PROMPT)
    assert len(prompt) > 32  # two full prefix-cache blocks
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
    want = {name: alone(m, prompt, params) for name, m in merged.items()}
    assert all(abs(want[n][1][0] - want[None][1][0]) > 1e-2 for n in merged if n)  # every adapter changes logits
    hits = []
    engine = Engine(model, max_slots=4, loras=bank, on_step=lambda s: hits.append(s.prefix_cache_hits))
    first = ["sql", None, "chat", "sql"]
    got = run(engine, [(n, prompt, params) for n in first])  # one prefill batch, one decode batch
    for i, name in enumerate(first):
        check(got[i], want[name])
    assert sum(hits) == 0  # nothing cached yet
    hits.clear()
    second = ["poem", "chat", None]  # poem's blocks were never computed; chat's and the base's were
    got = run(engine, [(n, prompt, params) for n in second])
    for i, name in enumerate(second):
        check(got[i], want[name])
    assert sum(hits) == 2 * ((len(prompt) - 1) // 16 * 16)  # chat and the base: all full blocks but the last token


def test_speculative_decoding_with_adapter_rows_keeps_greedy_outputs(served):
    model, bank, merged, tok = served
    prompt = tok.encode("x = 1\ny = 2\nx = 1\ny = 2\nx = 1\ny = 2\nx = 1\n")
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0)
    drafted = []
    engine = Engine(model, max_slots=3, loras=bank, prefix_cache_blocks=0, on_step=lambda s: drafted.append(
                    s.spec_draft_tokens), speculative=SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2))
    names = ["chat", None, "sql"]
    got = run(engine, [(n, prompt, params) for n in names])
    for i, name in enumerate(names):
        check(got[i], alone(merged[name], prompt, params))
    assert sum(drafted) > 0
