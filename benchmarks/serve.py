"""Serving benchmark, measured like vLLM's `bench serve`: streaming /v1/completions at fixed concurrency.

Builds a small model itself (a 6-layer, 384-wide GPT with random weights and a SentencePiece
tokenizer trained on stdlib sources), starts a local Ray + Serve on a free port with one replica,
and sends prompts of `--input-len` tokens, each generating exactly `--output-len` tokens
(ignore_eos, greedy), keeping `concurrency` requests in flight. Per level: request throughput,
output tokens/s, TTFT, TPOT and ITL (median and p99). The same workload also runs on the bare
engine (mtnlg_ray/serve/thread_engine.py: the Engine stepped by a thread of this process, no HTTP or
Serve; same thread count, decode layout and malloc settings as the replica's engine process), which
gives the HTTP/Serve overhead on TTFT. The levels run in `--rounds` interleaved rounds (1, 4, 16,
1, 4, 16, ...), so that a slow spell of a shared machine falls on every level rather than on one; at
concurrency 1 the two paths also alternate request by request.

    python benchmarks/serve.py                     # concurrency 1, 4, 16 (about 3 minutes on 2 cores)
    python benchmarks/serve.py --quick             # fewer requests
    python benchmarks/serve.py --structured        # bare engine only: decode time per token with and without
                                                   # a json_schema constraint (structured_outputs.py)
    python benchmarks/serve.py --shared-prefix 16  # bare engine only: prefix caching on vs off on a shared
                                                   # 512-token system prompt (shared_prefix.py)
    python benchmarks/serve.py --speculative       # bare engine and generate(): n-gram speculative decoding
                                                   # on vs off, repetitive and not (speculative.py)

Besides the table it prints the output tok/s at the highest concurrency over the lowest (bounded by
what a decode step of that many rows costs against a step of one) and the TTFT that HTTP and Serve
add at the lowest concurrency over the bare engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtnlg_ray.api import from_pretrained
from mtnlg_ray.checkpoint import native
from mtnlg_ray.config import ModelConfig, ServeJob
from mtnlg_ray.data.tokenizer import Tokenizer, train_tokenizer
from mtnlg_ray.malloc import keep_freed_memory
from mtnlg_ray.model.generate import use_decode_layout
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.serve.deploy import deploy, shutdown
from mtnlg_ray.serve.engine import Engine
from mtnlg_ray.serve.sampling import SamplingParams
from mtnlg_ray.serve.thread_engine import ThreadEngine  # the bare engine: an Engine stepped by a thread

import shared_prefix  # --shared-prefix (this script's directory is on sys.path)
import speculative  # --speculative
import structured_outputs  # --structured
from tables import print_load

LEVELS = (1, 4, 16)
REPLICA_THREADS = 1  # the replica reserves num_cpus=1, so Ray gives it OMP_NUM_THREADS=1


@dataclass
class Result:
    ttft: float = 0.0  # s, request sent -> first token
    latency: float = 0.0  # s, request sent -> last token
    itl: list[float] = field(default_factory=list)  # s between consecutive token arrivals
    output_tokens: int = 0

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / max(1, self.output_tokens - 1)


def build_checkpoint(out: Path, vocab: int, context: int, n_layers: int = 6, d_model: int = 384) -> Path:
    """A GPT (64-wide heads) with random weights (seed 0) and a tokenizer trained on stdlib sources."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(errors="replace") for p in sorted(lib.glob("*.py"))[:60]]
    tok = train_tokenizer(docs, out / "tokenizer.model", vocab_size=vocab)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=n_layers, d_model=d_model, n_heads=d_model // 64, max_seq_len=context,
                      vocab_size=tok.vocab_size)
    return native.save(GPT(cfg).state_dict(), cfg, out / "ckpt", tokenizer_path=out / "tokenizer.model")


def make_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of exactly `length` token ids, cut from stdlib sources at different offsets."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    ids = []
    for p in sorted(lib.glob("*.py"))[60:]:
        ids += tokenizer.encode(p.read_text(errors="replace"))
        if len(ids) > n * length:
            break
    return [ids[i * length:(i + 1) * length] for i in range(n)]


async def run_level(one, prompts: list, concurrency: int) -> tuple[list[Result], float]:
    """Send every prompt through `one(prompt) -> Result`, `concurrency` at a time; (results, wall s)."""
    sem = asyncio.Semaphore(concurrency)

    async def limited(p):
        async with sem:
            return await one(p)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    return results, time.perf_counter() - t0


def http_request(session, url: str, output_len: int):
    """One streamed /v1/completions request over aiohttp (as vLLM's `bench serve`: its C parser keeps the
    client's own CPU small on a machine it shares with the server)."""
    async def one(prompt: list[int]) -> Result:
        body = {"model": "mtnlg", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        r, last = Result(), None
        t0 = time.perf_counter()
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:  # one SSE line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if event.get("usage"):
                    r.output_tokens = event["usage"]["completion_tokens"]
                    continue
                if last is None:
                    r.ttft = now - t0
                else:
                    r.itl.append(now - last)
                last = now
        r.latency = last - t0
        return r
    return one


def engine_request(aeng, output_len: int):
    params = SamplingParams(max_tokens=output_len, temperature=0.0)

    async def one(prompt: list[int]) -> Result:
        r, last = Result(), None
        t0 = time.perf_counter()
        async for _, out in aeng.submit([(prompt, params)]):
            now = time.perf_counter()
            if last is None:
                r.ttft = now - t0
            else:
                r.itl.append(now - last)
            last = now
            r.output_tokens = out.num_generated
        r.latency = last - t0
        return r
    return one


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize(results: list[Result], wall: float) -> dict:
    ttft = [r.ttft for r in results]
    tpot = [r.tpot for r in results]
    itl = [x for r in results for x in r.itl]
    return {"req_s": len(results) / wall, "tok_s": sum(r.output_tokens for r in results) / wall,
            "ttft": (statistics.median(ttft), pct(ttft, 99)), "tpot": (statistics.median(tpot), pct(tpot, 99)),
            "itl": (statistics.median(itl), pct(itl, 99))}


def run_all(ckpt: Path, prompts_at: dict, output_len: int, slots: int, replicas: int = 1,
            rounds: int = 1) -> tuple[dict, dict, list[float]]:
    """Every concurrency level on the bare engine and through HTTP + Serve, `rounds` times over.

    Each round runs every level once (concurrency 1 alternating the two paths request by request,
    the others back to back), so a slower or faster spell of a shared machine falls on all levels
    alike instead of on the one that happened to run then. Returns the per-level summaries of all
    rounds together (HTTP, bare) and each round's HTTP output tok/s ratio, highest / lowest level.
    """
    import aiohttp
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    job = ServeJob.model_validate({"serve": dict(
        checkpoint=str(ckpt), port=0, max_batch_slots=slots, max_waiting=64, max_ongoing_requests=64,
        max_queued_requests=-1, num_cpus=REPLICA_THREADS,
        autoscaling=dict(min_replicas=replicas, max_replicas=replicas))})
    url = deploy(job)
    torch.set_num_threads(REPLICA_THREADS)
    tokenizer, model = from_pretrained(ckpt)
    use_decode_layout(model)  # as the replica's engine process does (engine_process.py)
    keep_freed_memory()
    lo, hi = min(prompts_at), max(prompts_at)

    async def main():
        aeng = ThreadEngine(Engine(model, max_slots=slots, max_waiting=64, decode=tokenizer.decode))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                         connector=aiohttp.TCPConnector(limit=64)) as session:
            paths = {"bare": engine_request(aeng, output_len), "http": http_request(session, url, output_len)}
            for one in paths.values():
                await run_level(one, prompts_at[1][:2], 1)  # warm-up
            runs = {name: {c: [] for c in prompts_at} for name in paths}  # (results, wall s) per round
            for _ in range(rounds):
                for c, prompts in prompts_at.items():
                    if c == 1:  # one request at a time, alternating paths: both see the same machine load
                        res = {name: [] for name in paths}
                        for p in prompts:
                            for name, one in paths.items():
                                res[name].append(await one(p))
                        for name, rs in res.items():  # sequential, so the wall time is the sum of latencies
                            runs[name][c].append((rs, sum(r.latency for r in rs)))
                        continue
                    for name, one in paths.items():
                        runs[name][c].append(await run_level(one, prompts, c))
        aeng.shutdown()
        out = {name: {c: summarize([r for rs, _ in rr for r in rs], sum(w for _, w in rr)) for c, rr in levels.items()}
               for name, levels in runs.items()}
        per_round = [summarize(*h)["tok_s"] / summarize(*l)["tok_s"] for h, l in zip(runs["http"][hi], runs["http"][lo])]
        return out["http"], out["bare"], per_round

    try:
        return asyncio.run(main())
    finally:
        shutdown()
        ray.shutdown()


def ms(pair) -> str:
    return f"{pair[0] * 1e3:7.1f} / {pair[1] * 1e3:7.1f}"


def report(http: dict, bare: dict, per_round: list[float], args) -> None:
    print(f"\nServing benchmark: {args.n_layers}x{args.d_model} GPT (random weights), prompts {args.input_len} tokens, "
          f"{args.output_len} generated (ignore_eos, greedy), streaming; {args.replicas} replica(s), "
          f"{REPLICA_THREADS} torch thread each")
    print_load(args.load)
    head = (f"| {'path':<13} | {'conc':>4} | {'req/s':>6} | {'out tok/s':>9} | {'TTFT ms med / p99':>17} | "
            f"{'TPOT ms med / p99':>17} | {'ITL ms med / p99':>17} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, rows in (("HTTP + Serve", http), ("bare engine", bare)):
        for c, s in rows.items():
            print(f"| {name:<13} | {c:>4} | {s['req_s']:6.2f} | {s['tok_s']:9.1f} | {ms(s['ttft']):>17} | "
                  f"{ms(s['tpot']):>17} | {ms(s['itl']):>17} |")
    lo, hi = min(http), max(http)
    scale = http[hi]["tok_s"] / http[lo]["tok_s"]
    overhead = (http[lo]["ttft"][0] - bare[lo]["ttft"][0]) * 1e3
    print(f"\noutput tok/s, HTTP, concurrency {hi} / {lo}: {scale:.2f}x; per round: "
          f"{', '.join(f'{r:.2f}x' for r in per_round)}")
    print(f"TTFT overhead of HTTP + Serve at concurrency {lo} (median, over the bare engine): {overhead:.1f} ms")
    for c in http:
        print(f"  concurrency {c:>2}: HTTP / bare output tok/s = {http[c]['tok_s'] / bare[c]['tok_s']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per level, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="times every level runs, interleaved (default 4)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--slots", type=int, default=16, help="KV-cache rows (max batch) of the engine")
    parser.add_argument("--replicas", type=int, default=1, help="Serve replicas (the bare engine is always one)")
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384, help="width (heads of 64)")
    parser.add_argument("--structured", action="store_true", help="bare engine only: free vs json_schema outputs")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="bare engine only: N requests sharing a 512-token prompt, prefix caching on vs off")
    parser.add_argument("--speculative", action="store_true", help="n-gram speculative decoding on vs off")
    parser.add_argument("--workdir", type=Path, default=None, help="--speculative: keep its trained copy model here")
    args = parser.parse_args()
    args.load = os.getloadavg()[0]
    args.rounds = args.rounds or (2 if args.quick else 4)
    # Requests per level in each round (concurrency 16: one wave of 16 requests per round).
    per_level = {1: 2, 4: 4, 16: 16} if args.quick else {1: 3, 4: 6, 16: 16}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp), vocab=4096, context=1024, n_layers=args.n_layers, d_model=args.d_model)
        tok = Tokenizer(Path(tmp) / "tokenizer.model")
        if args.shared_prefix:
            chunks = make_prompts(tok, args.shared_prefix + 16, 32)  # 512 tokens of system prompt, then questions
            system, questions = sum(chunks[:16], []), chunks[16:]
            tokenizer, model = from_pretrained(ckpt)
            use_decode_layout(model)  # as the replica's engine process does (engine_process.py)
            keep_freed_memory()
            results = shared_prefix.run(model, system, questions, args.slots, REPLICA_THREADS)
            return shared_prefix.report(results, len(system) + 32, args)
        prompts = make_prompts(tok, max(per_level.values()), args.input_len)
        if args.speculative:
            _, model = from_pretrained(ckpt)
            keep_freed_memory()
            workdir = args.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            return speculative.report(speculative.run(tok, model, workdir, prompts, 8, REPLICA_THREADS), args)
        if args.structured:
            tokenizer, model = from_pretrained(ckpt)
            use_decode_layout(model)  # as the replica's engine process does (engine_process.py)
            keep_freed_memory()
            results = structured_outputs.run(tokenizer, model, prompts[:16], args.output_len, args.rounds,
                                             REPLICA_THREADS)
            return structured_outputs.report(results, args)
        prompts_at = {c: prompts[:n] for c, n in per_level.items()}
        http, bare, per_round = run_all(ckpt, prompts_at, args.output_len, args.slots, args.replicas, args.rounds)
    report(http, bare, per_round, args)


if __name__ == "__main__":
    main()
