"""Decode speed: ours (fp32 and int8) vs CTranslate2 (float32 and int8) on the same weights.

A random GPT-2 from `transformers` is saved once per shape and vocabulary; ours loads it through
the public `mtnlg_ray.from_pretrained` and decodes with `model.generate` and with the serving
engine (serve/engine.py: each prompt a request, stepped until all are done, prefix cache off);
both run the same decode plan (model/decode_layout.py). CTranslate2 4.x converts the same
directory with its `TransformersConverter`. Greedy, no early stop, a 32-token prompt, 128 new
tokens; best of `--repeats` runs after a warm-up. Ours uses `--threads` torch threads and
CTranslate2 the same number of intra-op threads. Also: the int8 mode's logit error against fp32
(max |diff| over a greedy fp32 decode's steps, greedy-token agreement).

    python benchmarks/decode.py                 # 2 shapes x 2 vocabularies x batch 1, 8 (~10 min on 2 cores)
    python benchmarks/decode.py --quick         # 16 new tokens, one repeat
    python benchmarks/decode.py --transformers  # plus transformers generate and our full recomputation
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import mtnlg_ray
from mtnlg_ray.model.kv_cache import KVCache
from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.sampling import SamplingParams

SHAPES = {"6x384": dict(n_layer=6, n_embd=384, n_head=6), "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12)}
VOCABS = {"8k": 8192, "50k": 50257}


def save_random_gpt2(shape: dict, vocab: int, out: str) -> GPT2LMHeadModel:
    """A seeded random GPT-2 in `out` with a word-level tokenizer ("t0".."t{V-1}") for CTranslate2."""
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=1024, **shape)).eval()
    hf.save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    end = f"t{vocab - 1}"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token=end, eos_token=end).save_pretrained(out)
    return hf


def ct2_generators(hf_dir: str, threads: int) -> dict:
    """CTranslate2 generators for the directory, float32 and int8 weights."""
    import ctranslate2

    gens = {}
    for quant in ("float32", "int8"):
        out = os.path.join(hf_dir, f"ct2-{quant}")
        ctranslate2.converters.TransformersConverter(hf_dir).convert(out, quantization=quant, force=True)
        gens[quant] = ctranslate2.Generator(out, device="cpu", compute_type=quant, intra_threads=threads)
    return gens


def ct2_generate(gen, prompt: torch.Tensor, n: int) -> list[list[int]]:
    tokens = [[f"t{i}" for i in row] for row in prompt.tolist()]
    res = gen.generate_batch(tokens, max_length=n, min_length=n, include_prompt_in_result=False, sampling_topk=1)
    return [r.sequences_ids[0] for r in res]


def engine_generate(model, prompt: torch.Tensor, n: int) -> list[list[int]]:
    """Greedy tokens of the serving engine: every prompt row a request of n tokens, stepped until done."""
    engine = Engine(model, max_slots=len(prompt), max_context=prompt.shape[1] + n, prefix_cache_blocks=0)
    ids = [engine.add(row, SamplingParams(max_tokens=n, temperature=0.0)) for row in prompt.tolist()]
    tokens = {rid: [] for rid in ids}
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id].append(out.token_id)
    return [tokens[rid] for rid in ids]


def timed(fns: dict, repeats: int = 3) -> dict:
    """Best wall time of each function over `repeats` rounds after a warm-up; the functions take
    turns in every round, so load from others on a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.no_grad()
def int8_error(fp32, int8, prompt: torch.Tensor, n: int) -> tuple[float, float, float]:
    """(max |logit diff|, max |fp32 logit|, greedy agreement): both models prefill the prompt, then
    step one token at a time through fp32's greedy tokens (the decode steps `generate` runs), so
    every step compares logits over the same context."""
    seqs = fp32.generate(prompt, n)  # (B, T + n)
    logits = []
    for model in (fp32, int8):
        cache = KVCache.for_model(model, seqs.shape[0], seqs.shape[1])
        steps = [model(prompt, kv_cache=cache, last_only=True)]
        steps += [model(seqs[:, t:t + 1], kv_cache=cache) for t in range(prompt.shape[1], seqs.shape[1] - 1)]
        logits.append(torch.cat(steps, 1)[..., : model.config.vocab_size])
    a, b = logits
    return float((a - b).abs().max()), float(a.abs().max()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


@torch.no_grad()
def full_recompute(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)], dim=1)
    return seq


def run_case(hf_dir: str, hf, vocab: int, batch: int, args) -> dict:
    gens = ct2_generators(hf_dir, args.threads)
    _, ours = mtnlg_ray.from_pretrained(hf_dir)
    _, ours8 = mtnlg_ray.from_pretrained(hf_dir)
    ours8.generate(torch.zeros(1, 1, dtype=torch.long), 1, quantization="int8")  # int8 from now on
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, args.prompt), generator=g)
    n = args.new_tokens
    mine = ours.generate(prompt, n)[:, args.prompt:].tolist()
    agree = sum(a == b for r, s in zip(mine, ct2_generate(gens["float32"], prompt, n)) for a, b in zip(r, s))
    if engine_generate(ours, prompt, n) != mine:
        raise SystemExit("the serving engine's greedy tokens differ from generate's")
    fns = {
        "ours": lambda: ours.generate(prompt, n),
        "ours engine": lambda: engine_generate(ours, prompt, n),
        "ours int8": lambda: ours8.generate(prompt, n),
        "ct2": lambda: ct2_generate(gens["float32"], prompt, n),
        "ct2 int8": lambda: ct2_generate(gens["int8"], prompt, n),
    }
    if args.transformers:
        fns["transformers"] = lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                  use_cache=True, pad_token_id=0)
    t = timed(fns, args.repeats)
    if args.transformers:
        t["recompute"] = timed({"recompute": lambda: full_recompute(ours, prompt, n)}, 1)["recompute"]
    out = {k: batch * n / v for k, v in t.items()}
    out["same tokens as ct2"] = agree / (batch * n)
    if batch == 1:
        out["int8 error"] = int8_error(ours, ours8, torch.randint(0, vocab, (4, args.prompt), generator=g), 250)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, one timed repeat")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--vocabs", nargs="+", default=list(VOCABS), choices=list(VOCABS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--transformers", action="store_true", help="add transformers generate and full recomputation")
    args = ap.parse_args()
    if importlib.util.find_spec("ctranslate2") is None:
        raise SystemExit("benchmarks/decode.py compares with CTranslate2: pip install -e '.[bench]'")
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    rows = []
    for shape in args.shapes:
        for vname in args.vocabs:
            d = tempfile.mkdtemp()
            try:
                hf = save_random_gpt2(SHAPES[shape], VOCABS[vname], d)
                for batch in args.batches:
                    rows.append((shape, vname, batch, run_case(d, hf, VOCABS[vname], batch, args)))
                    print("measured:", *rows[-1], flush=True)  # progress; the tables follow
            finally:
                shutil.rmtree(d)

    print(f"\nDecode throughput, {args.prompt}-token prompt, {args.new_tokens} new tokens, greedy, "
          f"{args.threads} threads (CTranslate2: intra_threads={args.threads}), CPU, tokens/s; higher is better\n")
    extra = " transformers | ours full recompute |" if args.transformers else ""
    print("| model | vocab | batch | ours fp32 | engine fp32 | CT2 float32 | ours / CT2 fp32 | engine / CT2 fp32 | "
          "ours int8 | CT2 int8 | ours int8 / CT2 int8 | same greedy tokens as CT2 |" + extra)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if extra else ""))
    for shape, vname, batch, r in rows:
        line = (f"| {shape} | {vname} | {batch} | {r['ours']:.0f} | {r['ours engine']:.0f} | {r['ct2']:.0f} | "
                f"{r['ours'] / r['ct2']:.2f}x | {r['ours engine'] / r['ct2']:.2f}x | "
                f"{r['ours int8']:.0f} | {r['ct2 int8']:.0f} | {r['ours int8'] / r['ct2 int8']:.2f}x | "
                f"{r['same tokens as ct2']:.0%} |")
        if extra:
            line += f" {r['transformers']:.0f} | {r['recompute']:.0f} |"
        print(line)
    print("\nint8 vs fp32 logits (4 rows x 250 greedy steps = 1,000 tokens)\n")
    print("| model | vocab | max abs logit diff | max abs logit | greedy agreement |")
    print("|---|---|---|---|---|")
    for shape, vname, batch, r in rows:
        if "int8 error" in r:
            diff, scale, agree = r["int8 error"]
            print(f"| {shape} | {vname} | {diff:.4f} | {scale:.2f} | {agree:.1%} |")


if __name__ == "__main__":
    main()
