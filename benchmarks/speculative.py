"""`python benchmarks/serve.py --speculative`: n-gram speculative decoding on and off, at concurrency 1.

Two workloads, each through the bare serving engine (the Engine a replica's engine process steps,
one torch thread, decode layout and malloc settings as there) and through `generate()`, with the
same model and prompts on and off, alternating request by request (which goes first alternates too)
so both see the same load:

  repetitive      "copy this function" requests: the first 128 tokens of a stdlib function (from
                  files the model never saw) followed by <|endoftext|>, greedy, 128 output tokens,
                  for a model whose greedy output copies: a 2 x 512 GPT trained here for COPY_STEPS
                  steps (about 10 minutes on 2 cores; `--workdir DIR` keeps it) on "a 128-token stdlib
                  window, <|endoftext|>, the same window again", the loss on the copy (it falls from
                  ~5 to ~0.05 nats). It copies windows of that length: the format of the requests.
  non-repetitive  the serving benchmark's random-weight 6 x 384 GPT sampled at temperature 1.0 on
                  128-token stdlib prompts, 128 output tokens: its output does not repeat, so drafts are rare and
                  rejected (what speculation costs when it does not help). Random weights decoded
                  greedily fall into loops, which n-gram lookup predicts: that is not this workload.

Output tok/s is a request's output tokens over its wall time (prefill included). Targets: >= 1.5x on
the repetitive workload, no more than 5% slower on the non-repetitive one.
"""

from __future__ import annotations

import ast
import random
import sysconfig
import time
from pathlib import Path

import torch

from mtnlg_ray.config import ModelConfig, SpeculativeConfig
from mtnlg_ray.model.generate import generate, use_decode_layout
from mtnlg_ray.model.gpt import GPT, lm_loss
from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.sampling import SamplingParams
from tables import print_head  # this script's directory is on sys.path

SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=2)
COPY_STEPS, COPY_WINDOW = 500, 128  # training steps, tokens per copied window
# The copy model's shape: the smallest whose weights (34 MB in float32) do not fit this machine's
# 32 MiB L3, so that a decode step streams them from memory as a served model's does. A 2 x 256 copier
# (10 MB) runs from cache, where a step is compute bound and scoring k + 1 = 5 positions costs 2.6x
# one position (2 x 512: 1.5x), which no proposer can win back.
COPY_LAYERS, COPY_WIDTH = 2, 512
OUTPUT_LEN = 128  # non-repetitive workload


def copy_model(tokenizer, workdir: Path) -> GPT:
    """A COPY_LAYERS x COPY_WIDTH GPT that copies: trained on (window, EOD, window), loss on the copy;
    cached in workdir."""
    # learned positions are trained up to 2 x COPY_WINDOW + 1: prompts and outputs stay within them
    cfg = ModelConfig(n_layers=COPY_LAYERS, d_model=COPY_WIDTH, n_heads=COPY_WIDTH // 64,
                      max_seq_len=2 * COPY_WINDOW + 1, vocab_size=tokenizer.vocab_size)
    path = workdir / f"copy_model_{tokenizer.sha256[:12]}_{COPY_LAYERS}x{COPY_WIDTH}_{COPY_STEPS}.pt"
    torch.manual_seed(0)
    model = GPT(cfg)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    ids = torch.tensor([t for f in files for t in tokenizer.encode(f.read_text(errors="replace"))])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    rng = random.Random(0)
    t0 = time.perf_counter()
    eod, n = torch.tensor([tokenizer.eod_id]), COPY_WINDOW
    for step in range(COPY_STEPS):
        starts = [rng.randrange(len(ids) - n) for _ in range(16)]
        x = torch.stack([torch.cat([ids[s:s + n], eod, ids[s:s + n]]) for s in starts])  # (16, 2n + 1)
        y = x[:, 1:].clone()
        y[:, :n] = -100  # the loss on the copy only
        loss = lm_loss(model(x[:, :-1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 99 or step == COPY_STEPS - 1:
            print(f"  copy model: step {step + 1}/{COPY_STEPS}, copy loss {loss.item():.3f} nats "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def functions(tokenizer, n: int) -> list[list[int]]:
    """The first COPY_WINDOW tokens of n stdlib functions (from files the copy model was not trained on)."""
    out = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[150:]:
        source = f.read_text(errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                ids = tokenizer.encode(ast.get_source_segment(source, node) or "")
                if len(ids) >= COPY_WINDOW:
                    out.append(ids[:COPY_WINDOW])
                    if len(out) == n:
                        return out
    return out


def engine_run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[int, float]:
    t0 = time.perf_counter()
    engine.add(prompt, params)
    n = 0
    while engine.has_work:
        n += sum(o.token_id is not None for o in engine.step())
    return n, time.perf_counter() - t0


def generate_run(model, prompt: list[int], params: SamplingParams, spec) -> tuple[int, float]:
    t0 = time.perf_counter()
    out = generate(model, [prompt], params.max_tokens, temperature=params.temperature, seed=params.seed,
                   speculative=spec)
    return len(out[0]) - len(prompt), time.perf_counter() - t0


def measure(model, prompts: list[list[int]], params: SamplingParams, threads: int) -> dict:
    """{(path, on/off): [tokens, seconds]} over every prompt, on and off alternating; plus the engine's
    drafted / accepted token counts."""
    torch.set_num_threads(threads)
    use_decode_layout(model)
    engines = {"on": Engine(model, max_slots=1, speculative=SPEC), "off": Engine(model, max_slots=1)}
    drafts = [0, 0]

    def count(stats):
        drafts[0] += stats.spec_draft_tokens
        drafts[1] += stats.spec_accepted_tokens

    engines["on"].on_step = count
    for name, engine in engines.items():  # warm-up
        engine_run(engine, prompts[0][:32], SamplingParams(max_tokens=8, temperature=0.0))
    drafts[:] = 0, 0
    totals = {(path, name): [0, 0.0] for path in ("engine", "generate()") for name in engines}
    order = list(engines.items())  # on first for even prompts, off first for odd ones
    for i, prompt in enumerate(prompts):
        p = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, seed=i)
        for name, engine in (order if i % 2 == 0 else order[::-1]):
            for path, (n, s) in (("engine", engine_run(engine, prompt, p)),
                                 ("generate()", generate_run(model, prompt, p, SPEC if name == "on" else None))):
                totals[(path, name)][0] += n
                totals[(path, name)][1] += s
    return {"totals": totals, "drafted": drafts[0], "accepted": drafts[1]}


def run(tokenizer, random_model, workdir: Path, prompts: list[list[int]], n: int, threads: int) -> dict:
    copier = copy_model(tokenizer, workdir)
    repetitive = [f + [tokenizer.eod_id] for f in functions(tokenizer, n)]
    return {"repetitive": measure(copier, repetitive, SamplingParams(max_tokens=COPY_WINDOW, temperature=0.0),
                                  threads),
            "non-repetitive": measure(random_model, prompts[:n],
                                      SamplingParams(max_tokens=OUTPUT_LEN, temperature=1.0), threads)}


def report(results: dict, args) -> None:
    print(f"\nSpeculative decoding (n-gram, k={SPEC.num_speculative_tokens}, n-grams {SPEC.prompt_lookup_min}-"
          f"{SPEC.prompt_lookup_max}), concurrency 1, {torch.get_num_threads()} torch thread(s); repetitive: "
          f"a {COPY_LAYERS} x {COPY_WIDTH} GPT trained to copy, greedy, copying {COPY_WINDOW}-token function heads; "
          f"non-repetitive: random-weight {args.n_layers} x {args.d_model}, temperature 1.0; "
          f"{OUTPUT_LEN} output tokens")
    head = (f"| {'workload':<14} | {'path':<10} | {'tok/s off':>9} | {'tok/s on':>8} | {'on / off':>8} | "
            f"{'acceptance':>10} |")
    print_head(head, args.load)
    ratios = {}
    for workload, r in results.items():
        acceptance = r["accepted"] / r["drafted"] if r["drafted"] else 0.0
        for path in ("engine", "generate()"):
            (n_off, s_off), (n_on, s_on) = r["totals"][(path, "off")], r["totals"][(path, "on")]
            ratio = ratios[(workload, path)] = (n_on / s_on) / (n_off / s_off)
            acc = f"{acceptance:.0%} of {r['drafted']}" if path == "engine" else ""
            print(f"| {workload:<14} | {path:<10} | {n_off / s_off:9.1f} | {n_on / s_on:8.1f} | {ratio:7.2f}x | "
                  f"{acc:>10} |")
    rep, non = ratios[("repetitive", "engine")], ratios[("non-repetitive", "engine")]
    print(f"\nengine, repetitive: {rep:.2f}x   (target >= 1.5x: {'met' if rep >= 1.5 else 'NOT met'}); "
          f"non-repetitive: {non:.2f}x   (target >= 0.95x: {'met' if non >= 0.95 else 'NOT met'})")
