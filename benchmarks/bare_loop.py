"""The reference of benchmarks/train.py: a bare single-process PyTorch training loop, as nanoGPT's.

    python benchmarks/bare_loop.py --data DATASET_DIR --steps 2000 --out bare.safetensors

No Ray and no data pipeline: the train split's token stream held in memory, a batch of random
windows of block + 1 tokens per step (nanoGPT's `get_batch`), the same GPT module as ours (plain
torch), torch's fused AdamW (its fastest kernel, which ours uses too) with weight decay on
matrices, linear warmup + cosine to min_lr in steps, gradient clipping at 1.0, an evaluation
every `--eval-interval` steps on `--eval-iters` random validation windows (nanoGPT's
`estimate_loss`), and all of the machine's cores (torch's default thread count): the strongest
plain loop, the one our Ray Train loop is measured against.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model.gpt import GPT, lm_loss


def token_stream(data: Path, split: str) -> np.ndarray:
    """The split's packed rows, end to end: (tokens,) int64."""
    parts = [pq.read_table(f, columns=["input_ids"])["input_ids"].combine_chunks().flatten().to_numpy()
             for f in sorted((data / split).glob("*.parquet"))]
    return np.concatenate(parts).astype(np.int64)


def lr_at(step: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """nanoGPT's get_lr, for the step about to be taken (1-based, as our loop counts)."""
    if step < warmup:
        return lr * step / warmup
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train(data: Path, model_cfg: ModelConfig, batch: int, steps: int, lr: float = 1e-3, min_lr: float = 1e-4,
          warmup: int = 100, decay: int | None = None, beta2: float = 0.99, weight_decay: float = 0.1,
          eval_interval: int = 250, eval_iters: int = 20, device: str = "cpu", dtype: torch.dtype = torch.float32,
          seed: int = 1337) -> tuple[GPT, dict]:
    """Train; returns (model, {"tokens_per_s": steady state, "train_s", "evals": [(step, val loss)]})."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    block = model_cfg.max_seq_len
    train_ids, val_ids = token_stream(data, "train"), token_stream(data, "val")

    def get_batch(ids: np.ndarray) -> torch.Tensor:
        starts = gen.integers(0, len(ids) - block - 1, size=batch)
        return torch.from_numpy(np.stack([ids[s:s + block + 1] for s in starts])).to(device)

    model = GPT(model_cfg).to(device)
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, beta2), fused=True)
    amp = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    @torch.no_grad()
    def estimate_val() -> float:
        model.eval()
        losses = []
        for _ in range(eval_iters):
            b = get_batch(val_ids)
            with amp:
                losses.append(float(lm_loss(model(b[:, :-1]), b[:, 1:])))
        model.train()
        return sum(losses) / len(losses)

    evals, step_times = [], []
    t_start = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, min_lr, warmup, decay or steps)
        b = get_batch(train_ids)
        with amp:
            loss = lm_loss(model(b[:, :-1]), b[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 1:  # the first step warms up (allocator, kernels)
            step_times.append(time.perf_counter() - t0)
        if step % eval_interval == 0 or step == steps:
            evals.append((step, estimate_val()))
    train_s = time.perf_counter() - t_start
    tps = batch * block * len(step_times) / max(sum(step_times), 1e-9)
    return model, {"tokens_per_s": tps, "train_s": train_s, "evals": evals}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a dataset directory written by mtnlg preprocess")
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--eval-iters", type=int, default=20)
    ap.add_argument("--model", type=json.loads, help="a whole ModelConfig as JSON, instead of the three shape flags")
    ap.add_argument("--out", type=Path, help="write the final weights here (safetensors) and a .json beside them")
    args = ap.parse_args()
    manifest = json.loads((args.data / "manifest.json").read_text())
    shape = args.model or {"n_layers": args.n_layers, "n_heads": args.n_heads, "d_model": args.d_model, "dropout": 0.0}
    cfg = ModelConfig(**{**shape, "max_seq_len": manifest["seq_len"], "vocab_size": manifest["vocab_size"]})
    model, stats = train(args.data, cfg, args.batch, args.steps, args.lr, args.min_lr, args.warmup,
                         eval_interval=args.eval_interval, eval_iters=args.eval_iters)
    print(json.dumps(stats))
    if args.out:
        from safetensors.torch import save_model

        save_model(model, str(args.out))  # tied embeddings: one tensor stored
        args.out.with_suffix(".json").write_text(json.dumps({"model": cfg.model_dump(mode="json"), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
