"""`python benchmarks/serve.py --shared-prefix N`: prefix caching on requests that share a system prompt.

N requests, each a 512-token system prompt followed by its own 32-token question (all cut from
stdlib sources), go one at a time to two bare engines over the same model in this process (the
Engine a replica's engine process steps, with its thread count, decode layout and malloc settings):
one with the prefix cache (the default) and one without (`serve.enable_prefix_caching: false`),
alternating request by request so both see the same machine load. TTFT is a request's prefill step
(admission, the cached blocks copied into its row, the forward over what is left, the first token);
prefill work is the prompt tokens the forward computed over the prompt's length.

Targets: prefill work <= 20% of the prompt after the first request; median TTFT >= 3x lower with
the cache than without.
"""

from __future__ import annotations

import statistics
import time

import torch

from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.sampling import SamplingParams
from tables import print_head  # this script's directory is on sys.path

OUTPUT_LEN = 8  # tokens per request: TTFT is the measure, the rest only closes the request


def one_request(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    """(TTFT s, prompt tokens the prefix cache supplied) of one request run to its end alone."""
    t0 = time.perf_counter()
    engine.add(prompt, SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0))
    first = engine.step()[0]
    ttft = time.perf_counter() - t0
    while engine.has_work:
        engine.step()
    return ttft, first.num_cached_tokens


def run(model, system: list[int], questions: list[list[int]], slots: int, threads: int) -> dict:
    """Every prompt through both engines, alternating; per engine the TTFTs and cached tokens in order."""
    torch.set_num_threads(threads)
    engines = {"on": Engine(model, max_slots=slots), "off": Engine(model, max_slots=slots, prefix_cache_blocks=0)}
    warm = list(reversed(system))  # warm-up on a prompt that shares nothing with the measured ones
    for engine in engines.values():
        one_request(engine, warm)
    results = {name: ([], []) for name in engines}
    for q in questions:
        for name, engine in engines.items():
            ttft, cached = one_request(engine, system + q)
            results[name][0].append(ttft)
            results[name][1].append(cached)
    return results


def report(results: dict, prompt_len: int, args) -> None:
    print(f"\nPrefix caching: {args.n_layers}x{args.d_model} GPT (random weights), bare engine, "
          f"{len(results['on'][0])} requests one at a time, each a 512-token shared system prompt + a distinct "
          f"32-token question ({prompt_len} tokens), {OUTPUT_LEN} output tokens; {torch.get_num_threads()} torch "
          f"thread(s)")
    head = (f"| {'prefix caching':<14} | {'TTFT ms first':>13} | {'TTFT ms median, later':>21} | "
            f"{'prefill work, later':>19} |")
    print_head(head, args.load)
    medians = {}
    for name, (ttfts, cached) in results.items():
        medians[name] = statistics.median(ttfts[1:])
        work = statistics.mean(1 - c / prompt_len for c in cached[1:])
        print(f"| {name:<14} | {ttfts[0] * 1e3:13.1f} | {medians[name] * 1e3:21.1f} | {work:18.1%} |")
    work = statistics.mean(1 - c / prompt_len for c in results["on"][1][1:])
    ratio = medians["off"] / medians["on"]
    print(f"\nprefill work per request after the first, caching on: {work:.1%}   (target <= 20%: "
          f"{'met' if work <= 0.2 else 'NOT met'})")
    print(f"median TTFT off / on: {ratio:.2f}x   (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
