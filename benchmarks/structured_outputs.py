"""`python benchmarks/serve.py --structured`: what a structured-output constraint costs per token.

Batches of 1 and 16 requests (the serving benchmark's prompts, greedy, at most `--output-len`
tokens each) decode on a bare engine over the same model in this process (the Engine a replica's
engine process steps, with its thread count, decode layout and malloc settings), free and
constrained by a JSON schema, alternating `--rounds` times; per path the lower median time of the
decode steps that ran the whole batch (a constrained output ends when its JSON closes, and a smaller
batch steps faster). A constrained row's extra work per token is its grammar's token mask
(llguidance, mtnlg_ray/serve/structured.py) and one step of its state: "mask us/token" is that
alone, from replaying the constrained outputs through `mask_rows` and `advance`.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.sampling import SamplingParams
from mtnlg_ray.serve.structured import JSON_WHITESPACE, GrammarCompiler, GrammarSpec, mask_rows
from tables import print_head  # this script's directory is on sys.path

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "size": {"type": "integer"},
                                           "code": {"type": "string"}},
          "required": ["name", "size", "code"], "additionalProperties": False}
BATCHES = (1, 16)


def decode(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """(median seconds of the decode steps over all of `prompts`, each request's tokens), run together."""
    ids = {engine.add(p, params): i for i, p in enumerate(prompts)}
    outputs: list[list[int]] = [[] for _ in prompts]
    steps = []
    while engine.has_work:
        full = engine.num_running == len(prompts)  # else the prefill step, or a request has ended
        t0 = time.perf_counter()
        outs = engine.step()
        if full:
            steps.append(time.perf_counter() - t0)
        for out in outs:
            if out.token_id is not None:
                outputs[ids[out.request_id]].append(out.token_id)
    return statistics.median(steps), outputs


def mask_us(grammars: GrammarCompiler, spec: GrammarSpec, outputs: list[list[int]]) -> float:
    """Microseconds per token of the grammar alone: `outputs` replayed together, each step one mask_rows
    over the live rows and one advance per row (what sample_batch adds to a step)."""
    constraints = [grammars.constraint(spec, (grammars.tokenizer.eod_id,)) for _ in outputs]
    logits = torch.zeros(len(outputs), grammars.vocab_size)
    spent, tokens = 0.0, 0
    for step in range(max(map(len, outputs))):
        live = [j for j, o in enumerate(outputs) if step < len(o)]
        t0 = time.perf_counter()
        mask_rows(logits, live, [constraints[j] for j in live])
        for j in live:
            constraints[j].advance(outputs[j][step])
        spent, tokens = spent + time.perf_counter() - t0, tokens + len(live)
    return spent / tokens * 1e6


def run(tokenizer, model, prompts: list[list[int]], output_len: int, rounds: int, threads: int) -> dict:
    """{batch: (free step s, constrained step s, mask us per token, constrained output tokens)}."""
    torch.set_num_threads(threads)
    grammars = GrammarCompiler(tokenizer, model.config.vocab_size)
    spec = GrammarSpec.json_schema(SCHEMA, JSON_WHITESPACE)
    paths = {"free": SamplingParams(max_tokens=output_len, temperature=0.0),
             "json": SamplingParams(max_tokens=output_len, temperature=0.0, structured=spec,
                                    stop_token_ids=(tokenizer.eod_id,))}
    engine = Engine(model, max_slots=max(BATCHES), decode=tokenizer.decode, grammars=grammars, prefix_cache_blocks=0)
    decode(engine, prompts[:1], paths["json"])  # warm-up (compiles the grammar once)
    results = {}
    for batch in BATCHES:
        best: dict[str, tuple[float, list]] = {}
        for _ in range(rounds):
            for name, params in paths.items():
                step, outputs = decode(engine, prompts[:batch], params)
                if name not in best or step < best[name][0]:
                    best[name] = (step, outputs)
        outputs = best["json"][1]
        results[batch] = (best["free"][0], best["json"][0], mask_us(grammars, spec, outputs),
                          statistics.mean(map(len, outputs)))
    return results


def report(results: dict, args) -> None:
    print(f"\nStructured outputs: {args.n_layers}x{args.d_model} GPT (random weights), bare engine, greedy, "
          f"{args.output_len} tokens per request, one torch thread; json_schema {json.dumps(SCHEMA)}")
    head = (f"| {'batch':>5} | {'step ms free':>12} | {'step ms json':>12} | {'difference':>10} | "
            f"{'per row us':>10} | {'mask us/token':>13} | {'json tokens':>11} |")
    print_head(head, args.load)
    for batch, (free, constrained, us, length) in results.items():
        diff = (constrained - free) * 1e3
        print(f"| {batch:>5} | {free * 1e3:12.2f} | {constrained * 1e3:12.2f} | {diff:+10.2f} | "
              f"{diff * 1e3 / batch:+10.1f} | {us:13.1f} | {length:11.1f} |")
    print(f"\nstep ms: median decode step over the whole batch, the lower of {args.rounds} alternating runs; mask "
          "us/token: the grammar alone (mask + advance) per constrained row and step; json tokens: mean output length")
