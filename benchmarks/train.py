"""Training: `mtnlg pretrain` (Ray Train) vs a bare single-process PyTorch loop on all cores, in one run.

    python benchmarks/train.py                 # CPU: nanoGPT's CPU shape for 2,000 steps, quickstart shape
    python benchmarks/train.py --steps 500     # a shorter nanoGPT run
    python benchmarks/train.py --rounds 2      # ours twice on the nanoGPT shape: bare, ours, bare, ours, bare
    python benchmarks/train.py --device cuda   # GPU: the same rows in bf16, then gpt-1.3b (MFU vs 989 TFLOP/s)

Part 1, nanoGPT's CPU configuration (4 layers, 4 heads, 128 wide, block 64, batch 12, lr 1e-3
cosine to 1e-4 over the run, warmup 100, AdamW beta2 0.99, evaluation every 250 steps) on a
character-level corpus of stdlib sources: the bare loop (benchmarks/bare_loop.py, random windows,
its own process, started with the allocator a Ray Train worker gets: jemalloc, mtnlg_ray/malloc.py)
and the `mtnlg pretrain` command (one Ray Train worker, its own process: Ray start, data pipeline,
evaluations and checkpoints included) are each timed from process start to exit; their final
weights (the last run of each) are then evaluated here on the whole validation split with the
same code. The speed of a shared virtual machine drifts by 10-20% over minutes, so
the runs alternate: bare, ours, bare (`--rounds R`: R runs of ours, each between two bare runs).
The table gives the means; each round's ratio against the two bare runs around it is printed too.
Part 2, the quickstart's model and data: tokens/s of the bare loop (again in its own process with
the workers' allocator), one Ray Train worker (eager, and with `train.compile: true`: Inductor per
block), and two workers sharding with FSDP2.
Tokens/s of the Ray runs are the mean of their logged intervals after the first (the first
includes start-up); the bare loop's exclude its first step and its evaluations. MFU is against
the measured matmul peak of all the cores (or GPUs) training uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_loop import train as bare_train  # noqa: E402

from mtnlg_ray.config import ModelConfig, PretrainJob, load_job, validate  # noqa: E402
from mtnlg_ray.malloc import worker_env  # noqa: E402
from mtnlg_ray.model.gpt import lm_loss  # noqa: E402
from mtnlg_ray.train.metrics import flops_per_token, measure_matmul_flops, read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MTNLG = [sys.executable, "-m", "mtnlg_ray.cli"]
NANOGPT = dict(n_layers=4, n_heads=4, d_model=128, max_seq_len=64, dropout=0.0)


def preprocess(out: Path, sets: list[str]) -> Path:
    """`mtnlg preprocess` of the stdlib config with overrides, in its own process (its own Ray)."""
    cmd = MTNLG + ["preprocess", "stdlib", "--set", f"output_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of a command from spawn to exit (its output goes to `log`)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    return time.perf_counter() - t0


def run_bare_loop(data: Path, steps: int, log: Path, *args: str) -> float:
    """Wall seconds of benchmarks/bare_loop.py in its own process (output to `log`), started with the
    allocator a Ray Train worker gets (jemalloc preloaded, malloc.py): both sides on the same malloc."""
    return timed([sys.executable, str(ROOT / "benchmarks/bare_loop.py"), "--data", str(data), "--steps", str(steps),
                  *args], log, {**os.environ, **worker_env()})


@torch.no_grad()
def val_loss(model, data: Path) -> float:
    """Mean loss (nats / token) of `model` over every row of the validation split."""
    rows = np.concatenate([pq.read_table(f)["input_ids"].combine_chunks().flatten().to_numpy()
                           for f in sorted((data / "val").glob("*.parquet"))]).astype(np.int64)
    width = json.loads((data / "manifest.json").read_text())["seq_len"] + 1
    rows = torch.from_numpy(rows.reshape(-1, width))
    model.eval()
    total = 0.0
    for b in rows.split(64):
        total += float(lm_loss(model(b[:, :-1]), b[:, 1:])) * len(b)
    return total / len(rows)


def pretrain_job(model: dict, data: Path, storage: Path, name: str, workers: int, batch: int, micro: int,
                 steps: int, optim: dict, train: dict, use_gpu: bool = False, precision: str = "auto") -> dict:
    return {
        "model": model, "data": {"datasets": [{"path": str(data)}]},
        "parallel": {"data_parallel": "fsdp", "precision": precision}, "optim": optim,
        "train": {"global_batch_size": batch, "micro_batch_size": micro, "max_steps": steps, **train},
        "checkpoint": {"interval": 0, "num_to_keep": 1},
        "scaling": {"num_workers": workers, "use_gpu": use_gpu, "gpus_per_worker": 1 if use_gpu else 0,
                    "cpus_per_worker": 4 if use_gpu else 0.5, "storage_path": str(storage), "name": name},
    }


def start_ray() -> None:
    """RAY_ADDRESS's cluster, else a local Ray as `mtnlg pretrain` starts it; the workers' step lines stay in their logs."""
    from mtnlg_ray.train.trainer import ensure_ray

    ensure_ray(log_to_driver=False)


def logged_rate(run: Path) -> tuple[float, float, float]:
    """(tokens/s, MFU, data wait as a share of step time) of a run: the mean of its logged
    intervals after the first."""
    logged = [r for r in read_metrics(run)[0] if "tokens_per_s" in r][1:]
    return tuple(float(np.mean([r[k] for r in logged])) for k in ("tokens_per_s", "mfu", "data_wait"))


def nanogpt_part(work: Path, steps: int, peak: float, rounds: int = 1) -> list[str]:
    """Part 1 (module docstring): the rows of its table."""
    data = preprocess(work / "chars", ["corpus.max_files=80", "tokenizer.model_type=char", "pack.seq_len=64",
                                       "pack.val_fraction=0.1"])
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    cfg = ModelConfig(**NANOGPT, vocab_size=vocab)
    fpt = flops_per_token(cfg, 64)
    bare_out = work / "bare.safetensors"

    def run_bare(i: int) -> tuple[float, float]:
        """(wall s, tokens/s) of one bare run, its weights in bare_out."""
        wall = run_bare_loop(data, steps, work / f"bare{i}.log", "--out", str(bare_out))
        return wall, json.loads(bare_out.with_suffix(".json").read_text())["tokens_per_s"]

    optim = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "decay_steps": steps, "beta2": 0.99, "weight_decay": 0.1}
    bares, ours = [run_bare(0)], []
    for i in range(1, rounds + 1):  # bare, ours, bare, ours, ..., bare: each of ours between two references
        job = pretrain_job({**NANOGPT}, data, work / "runs", f"nanogpt{i}", 1, 12, 12, steps, optim,
                           {"log_interval": 10, "eval_interval": 250, "eval_batches": 20})
        job["checkpoint"] = {"interval": 1000, "num_to_keep": 1}
        config = work / f"nanogpt{i}.yaml"
        config.write_text(yaml.safe_dump(job))
        wall = timed(MTNLG + ["pretrain", str(config)], work / f"ours{i}.log")
        tps, _, wait = logged_rate(work / "runs" / f"nanogpt{i}")
        ours.append((wall, tps, wait))
        bares.append(run_bare(i))
    bare_wall, bare_tps = (float(np.mean([b[k] for b in bares])) for k in (0, 1))
    ours_wall, ours_tps, ours_wait = (float(np.mean([o[k] for o in ours])) for k in (0, 1, 2))
    # per round: ours against the mean of the bare runs just before and after it
    rounds_wall = [o[0] / ((bares[i][0] + bares[i + 1][0]) / 2) for i, o in enumerate(ours)]
    rounds_tps = [o[1] / ((bares[i][1] + bares[i + 1][1]) / 2) for i, o in enumerate(ours)]

    from safetensors.torch import load_model as load_weights

    from mtnlg_ray.api import from_pretrained
    from mtnlg_ray.model.gpt import GPT

    bare_model = GPT(cfg)
    load_weights(bare_model, str(bare_out))
    ours_model = from_pretrained(work / "runs" / f"nanogpt{rounds}")[1]  # the last run of each
    bare_val, ours_val = val_loss(bare_model, data), val_loss(ours_model, data)
    print(f"\nnanoGPT CPU shape: GPT 4x128, block 64, char vocab {vocab}, batch 12, {steps} steps "
          f"({12 * 64 * steps:,} tokens), {fpt / 1e6:.2f} MFLOP/token; val loss over the whole val split")
    rows = ["| run | wall s (process start to exit) | tokens/s | MFU | final val loss (nats/char) |",
            "|---|---:|---:|---:|---:|",
            f"| bare PyTorch loop (all cores), mean of its {len(bares)} runs | {bare_wall:.1f} | "
            f"{bare_tps:,.0f} | {fpt * bare_tps / peak:.1%} | {bare_val:.4f} |",
            f"| `mtnlg pretrain`, 1 Ray Train worker, mean of {len(ours)} runs | {ours_wall:.1f} | {ours_tps:,.0f} | "
            f"{fpt * ours_tps / peak:.1%} | {ours_val:.4f} |",
            f"| ours / bare | {ours_wall / bare_wall:.2f}x | {ours_tps / bare_tps:.2f}x | | "
            f"{ours_val - bare_val:+.4f} |"]
    print("\n".join(rows))
    print(f"data wait of ours: {ours_wait:.2%} of step time")
    print("bare runs in order: " + ", ".join(f"{w:.1f} s / {t:,.0f} tokens/s" for w, t in bares))
    print("ours / bare per round (the bare runs before and after it): wall "
          + ", ".join(f"{r:.2f}x" for r in rounds_wall) + "; tokens/s " + ", ".join(f"{r:.2f}x" for r in rounds_tps))
    return rows


def quickstart_part(work: Path, steps: int, peak: float, device: str) -> list[str]:
    """Part 2 (module docstring): tokens/s on the quickstart's model and data."""
    import ray

    from mtnlg_ray.train.trainer import run_pretrain

    data = preprocess(work / "bpe", ["corpus.max_files=120"])
    shipped = load_job("quickstart", PretrainJob, [f"data.datasets=[{{path: {data}}}]"])
    model = shipped.model.model_dump(exclude_none=True, exclude={"preset"})
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    cfg = ModelConfig(**{**model, "vocab_size": vocab})
    seq, batch, micro = cfg.max_seq_len, shipped.train.global_batch_size, shipped.train.micro_batch_size
    fpt = flops_per_token(cfg, seq)
    cuda = device == "cuda"

    def run_bare() -> float:
        if cuda:
            return bare_train(data, cfg, batch, steps, eval_interval=10**9, device=device,
                              dtype=torch.bfloat16)[1]["tokens_per_s"]
        log = work / "bare_quickstart.log"  # its own process, to start with the workers' allocator
        run_bare_loop(data, steps, log, "--batch", str(batch), "--eval-interval", str(10**9),
                      "--model", cfg.model_dump_json(exclude_none=True))
        return json.loads(log.read_text().strip().splitlines()[-1])["tokens_per_s"]

    before = run_bare()
    start_ray()
    results = []
    for i, (name, workers, compile_) in enumerate((("1 Ray Train worker", 1, False),
                                                   ("1 Ray Train worker, train.compile", 1, True),
                                                   ("2 Ray Train workers, FSDP2", 2, False))):
        if cuda and torch.cuda.device_count() < workers:
            continue
        job = pretrain_job(model, data, work / "runs", f"qs{i}", workers, batch, micro, steps,
                           shipped.optim.model_dump(), {"log_interval": 5, "eval_interval": 10**6, "peak_flops": peak,
                                                        "compile": compile_}, use_gpu=cuda)
        run_pretrain(validate(PretrainJob, job, "benchmark"))
        results.append((name, logged_rate(work / "runs" / f"qs{i}")[0]))
    ray.shutdown()
    after = run_bare()  # before and after the Ray runs, as in part 1
    bare = (before + after) / 2
    print(f"\nquickstart shape: GPT {cfg.n_layers}x{cfg.d_model}, {seq}-token rows, vocab {vocab}, global batch {batch} "
          f"(micro {micro}), {steps} steps, {fpt / 1e6:.1f} MFLOP/token")
    where = "one GPU, bf16" if cuda else "all cores"
    rows = ["| run | tokens/s | vs bare | MFU |", "|---|---:|---:|---:|",
            f"| bare PyTorch loop ({where}), mean of the runs before and after | {bare:,.0f} | 1.00x | "
            f"{fpt * bare / peak:.1%} |"]
    rows += [f"| {name} | {tps:,.0f} | {tps / bare:.2f}x | {fpt * tps / peak:.1%} |" for name, tps in results]
    print("\n".join(rows))
    print(f"bare runs before / after: {before:,.0f} / {after:,.0f} tokens/s")
    return rows


def gpu_big(work: Path) -> None:
    """gpt-1.3b in bf16 on one GPU: the bare loop and one Ray Train worker, MFU against 989 TFLOP/s."""
    import ray

    from mtnlg_ray.train.trainer import run_pretrain

    data = work / "bpe"
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    big = {"preset": "gpt-1.3b", "vocab_size": vocab, "max_seq_len": 256}
    cfg = ModelConfig(**big)
    fpt = flops_per_token(cfg, 256)
    batch, steps = 32, 20  # 8,192 tokens a step
    _, stats = bare_train(data, cfg, batch, steps, eval_interval=10**9, device="cuda", dtype=torch.bfloat16)
    print(f"gpt-1.3b bf16 bare loop: {stats['tokens_per_s']:,.0f} tokens/s, MFU {fpt * stats['tokens_per_s'] / 989e12:.1%}")
    start_ray()
    job = pretrain_job(big, data, work / "runs", "big", 1, batch, batch, steps, {"lr": 1e-4},
                       {"log_interval": 2, "eval_interval": 10**6, "peak_flops": 989e12}, use_gpu=True, precision="bf16")
    run_pretrain(validate(PretrainJob, job, "benchmark"))
    tps, mfu, _ = logged_rate(work / "runs" / "big")
    print(f"gpt-1.3b bf16 Ray Train 1 worker: {tps:,.0f} tokens/s, MFU {mfu:.1%} of 989 TFLOP/s")
    ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=2000, help="steps of the nanoGPT-shape runs")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of ours on the nanoGPT shape, each between two bare runs (the machine's speed drifts)")
    ap.add_argument("--quickstart-steps", type=int, default=200, help="steps of the quickstart-shape runs")
    ap.add_argument("--skip-nanogpt", action="store_true")
    ap.add_argument("--skip-quickstart", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mtnlg-bench-train-"))
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    # the fastest round within 3 s: a slow spell during the measurement would raise every MFU
    peak = measure_matmul_flops(args.device, dtype, seconds=3.0)
    where = f"{torch.cuda.get_device_name()}" if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"matmul peak, {where}: {peak / 1e9:,.1f} GFLOP/s ({dtype})")
    if not args.skip_nanogpt and not cuda:
        nanogpt_part(work, args.steps, peak, args.rounds)
    if not args.skip_quickstart:
        quickstart_part(work, args.quickstart_steps, peak, args.device)
    if cuda:
        gpu_big(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
