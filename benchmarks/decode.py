"""Decode speed: our KV-cached decoding vs `transformers` generate vs our full recomputation.

All three run in this process on the same random weights (a GPT-2 model from `transformers`,
imported into ours), greedy, no early stop. Also: the per-token cost at context position ~1000
divided by that at ~10 (incremental decoding stays flat; recomputation grows linearly).

    python benchmarks/decode.py            # both shapes, batch 1 and 8 (a few minutes on 2 cores)
    python benchmarks/decode.py --quick    # fewer tokens
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from mtnlg_ray.checkpoint import hf_gpt2
from mtnlg_ray.checkpoint.native import build_model
from mtnlg_ray.model.kv_cache import KVCache

SHAPES = {"6x384": dict(n_layer=6, n_embd=384, n_head=6), "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12)}


def make_pair(shape: dict):
    """A random GPT-2 from transformers and the same weights in our GPT."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **shape)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, tensors = hf_gpt2.load(d)
    return hf, build_model(cfg, tensors)


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` wall times after a warm-up (the least disturbed run on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def full_recompute(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)], dim=1)
    return seq


@torch.no_grad()
def per_token_seconds(model, context: int, steps: int = 16) -> float:
    """Seconds per decode step for one sequence whose cache already holds `context` tokens."""
    cache = KVCache.for_model(model, 1, max_len=context + steps + 1)
    model(torch.randint(0, 50257, (1, context)), kv_cache=cache)
    tok = torch.zeros(1, 1, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(steps):
        model(tok, kv_cache=cache)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def per_token_seconds_recompute(model, context: int, steps: int = 4) -> float:
    ids = torch.randint(0, 50257, (1, context))
    start = time.perf_counter()
    for _ in range(steps):
        model(ids)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    new_tokens, prompt_len = (16, 16) if args.quick else (64, 16)

    rows = []
    for name, shape in SHAPES.items():
        hf, ours = make_pair(shape)
        for batch in (1, 8):
            prompt = torch.randint(0, 50257, (batch, prompt_len))
            t_ours = timed(lambda: ours.generate(prompt, new_tokens))
            t_hf = timed(lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False, use_cache=True, pad_token_id=0))
            t_full = timed(lambda: full_recompute(ours, prompt, new_tokens))
            tps = [batch * new_tokens / t for t in (t_ours, t_hf, t_full)]
            rows.append((name, batch, *tps))
        flat = min(per_token_seconds(ours, 1000) for _ in range(3)) / min(per_token_seconds(ours, 10) for _ in range(3))
        grow = per_token_seconds_recompute(ours, 1000) / per_token_seconds_recompute(ours, 10)
        rows.append((name, "cost@1000/cost@10", flat, None, grow))

    print(f"\nDecode throughput, {prompt_len}-token prompts, {new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads, fp32 CPU (tokens/s; higher is better)\n")
    print("| model | batch | ours (KV cache) | transformers generate | ours full recompute | ours / transformers | ours / recompute |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, ours_tps, hf_tps, full_tps in rows:
        if hf_tps is None:
            continue
        print(f"| {name} | {batch} | {ours_tps:.1f} | {hf_tps:.1f} | {full_tps:.1f} | "
              f"{ours_tps / hf_tps:.2f}x | {ours_tps / full_tps:.2f}x |")
    print("\nPer-token time at context ~1000 divided by that at ~10 (1.0 = flat; target < 1.5 for ours)\n")
    print("| model | ours (KV cache) | ours full recompute |")
    print("|---|---|---|")
    for name, batch, flat, _, grow in rows:
        if batch == "cost@1000/cost@10":
            print(f"| {name} | {flat:.2f} | {grow:.2f} |")


if __name__ == "__main__":
    main()
