"""Training throughput: our Ray Train loop vs a bare single-process PyTorch loop, in one run.

    python benchmarks/train.py                  # CPU: small GPT, 1 and 2 workers (FSDP2)
    python benchmarks/train.py --device cuda    # the same on a GPU, then gpt-1.3b in bf16 (MFU vs 989 TFLOP/s)

Rows: the machine's measured matmul FLOP/s (the peak MFU is quoted against, unless --peak-flops);
a bare loop (no Ray: the same GPT, batch, AdamW, data rows read straight from the Parquet
shards) as the ceiling; `mtnlg pretrain`'s loop with one Ray Train worker; two workers sharding
with FSDP2. Tokens/s of the Ray runs are the mean of their logged intervals after the first
(the first includes start-up); the bare loop is timed over the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mtnlg_ray.config import ModelConfig, OptimConfig, PreprocessJob, PretrainJob, validate
from mtnlg_ray.model.gpt import GPT, lm_loss
from mtnlg_ray.train.metrics import flops_per_token, measure_matmul_flops, read_metrics
from mtnlg_ray.train.optim import Optimizers

SMALL = dict(n_layers=4, d_model=256, n_heads=4, max_seq_len=256)


def make_data(workdir: Path, seq_len: int) -> Path:
    from mtnlg_ray.data.shards import run_preprocess

    job = validate(PreprocessJob, {"corpus": {"kind": "stdlib", "max_files": 40},
                                   "tokenizer": {"vocab_size": 2048, "sample_docs": 40},
                                   "pack": {"seq_len": seq_len, "num_actors": 1},
                                   "output_dir": str(workdir / "data")}, "benchmark")
    return run_preprocess(job)


def bare_loop(model_cfg: ModelConfig, data: Path, mb: int, accum: int, steps: int, device: str,
              dtype: torch.dtype) -> float:
    """Tokens/s of a plain loop: forward/backward x accum, clip, AdamW; rows from the shards."""
    rows = np.concatenate([pq.read_table(f)["input_ids"].combine_chunks().flatten().to_numpy().reshape(-1, model_cfg.max_seq_len + 1)
                           for f in sorted((data / "train").glob("*.parquet"))])
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    opts = Optimizers([model], OptimConfig(lr=1e-3))
    seq = model_cfg.max_seq_len
    i, times = 0, []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        for _ in range(accum):
            batch = torch.from_numpy(rows[np.arange(i, i + mb) % len(rows)].astype(np.int64)).to(device)
            i += mb
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up (allocator, kernels)
            times.append(time.perf_counter() - t0)
    return mb * accum * seq * len(times) / sum(times)


def ray_loop(model: dict, data: Path, storage: Path, name: str, workers: int, mb: int, global_batch: int, steps: int,
             use_gpu: bool, precision: str, log_interval: int) -> tuple[float, float]:
    """(tokens/s, MFU as the loop reports it) of `mtnlg pretrain` with `workers` Ray Train workers."""
    from mtnlg_ray.train.trainer import run_pretrain

    job = validate(PretrainJob, {
        "model": model, "data": {"datasets": [{"path": str(data)}]},
        "parallel": {"data_parallel": "fsdp", "precision": precision},
        "optim": {"lr": 1e-3},
        "train": {"global_batch_size": global_batch, "micro_batch_size": mb, "max_steps": steps,
                  "log_interval": log_interval, "eval_interval": 10**6, "peak_flops": PEAK[0]},
        "checkpoint": {"interval": 10**6, "num_to_keep": 1},
        "scaling": {"num_workers": workers, "cpus_per_worker": 0.5 if not use_gpu else 4, "use_gpu": use_gpu,
                    "gpus_per_worker": 1 if use_gpu else 0, "storage_path": str(storage), "name": name},
    }, "benchmark")
    run_pretrain(job)
    logged = [r for r in read_metrics(storage / name)[0] if "tokens_per_s" in r][1:]
    return float(np.mean([r["tokens_per_s"] for r in logged])), float(np.mean([r["mfu"] for r in logged]))


PEAK = [0.0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peak-flops", type=float, default=None, help="FLOP/s to quote MFU against (default: measured)")
    args = ap.parse_args()
    import ray

    cuda = args.device == "cuda"
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=None if cuda else (os.cpu_count() or 2) + 2,
             include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="mtnlg-bench-"))
    seq, mb, global_batch = 256, 8, 16
    data = make_data(work, seq)
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    model = {**SMALL, "vocab_size": vocab}
    cfg = ModelConfig(**model)
    fpt = flops_per_token(cfg, seq)
    dtype = torch.bfloat16 if cuda else torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if not cuda else threads)  # a 0.5-CPU Ray worker runs torch on one thread
    PEAK[0] = args.peak_flops or measure_matmul_flops(args.device, dtype, seconds=1.0)
    # (run, tokens/s, model FLOP/s, devices: threads on CPU, GPUs on CUDA)
    rows = [("matmul peak (measured, 1 thread)" if not cuda else "matmul peak (measured)", None, PEAK[0], 1)]
    bare = bare_loop(cfg, data, mb, global_batch // mb, args.steps, args.device, dtype)
    rows.append(("bare PyTorch loop, 1 process", bare, fpt * bare, 1))
    one, _ = ray_loop(model, data, work / "runs", "one", 1, mb, global_batch, args.steps, cuda, "auto", 5)
    rows.append(("Ray Train loop, 1 worker", one, fpt * one, 1))
    if not cuda or torch.cuda.device_count() >= 2:
        two, _ = ray_loop(model, data, work / "runs", "two", 2, mb, global_batch, args.steps, cuda, "auto", 5)
        rows.append(("Ray Train loop, 2 workers FSDP2", two, fpt * two, 2))
    print(f"\nGPT {SMALL['n_layers']}x{SMALL['d_model']}, {cfg.max_seq_len}-token rows, vocab {vocab}, "
          f"global batch {global_batch} (micro {mb}), {args.steps} steps, {args.device}, {dtype}, "
          f"{fpt / 1e6:.1f} MFLOP/token")
    print("| run | devices | tokens/s | vs bare | model FLOP/s | MFU |\n|---|---:|---:|---:|---:|---:|")
    for name, tps, flops, devices in rows:
        ratio = f"{tps / bare:.2f}x" if tps else ""
        mfu = flops / (PEAK[0] * devices) if tps else 1.0  # against the measured peak of the devices used
        print(f"| {name} | {devices} | {f'{tps:,.0f}' if tps else ''} | {ratio} | {flops / 1e9:.1f} G | {mfu:.1%} |")
    if cuda:
        big = {"preset": "gpt-1.3b", "vocab_size": vocab, "max_seq_len": seq}
        PEAK[0] = 989e12
        bcfg = ModelConfig(**big)
        tps = bare_loop(bcfg, data, 4, 1, 5, "cuda", torch.bfloat16)
        print(f"gpt-1.3b bf16 bare loop: {tps:,.0f} tokens/s, MFU {flops_per_token(bcfg, seq) * tps / 989e12:.1%} of 989 TFLOP/s")
        tps, mfu = ray_loop(big, data, work / "runs", "big", 1, 4, 4, 6, True, "bf16", 1)
        print(f"gpt-1.3b bf16 Ray Train 1 worker: {tps:,.0f} tokens/s, MFU {mfu:.1%} of 989 TFLOP/s")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
