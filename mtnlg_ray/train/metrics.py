"""Training FLOPs, MFU, the machine's matmul peak, and the run's metrics.jsonl.

Model FLOPs per token (PaLM appendix B / nanoGPT's `estimate_mfu`, Megatron-LM's formula without
recomputation):

    flops_per_token = 6 * N + 12 * L * d * T

N counts the parameters that take part in a matrix multiply: everything except the embedding
tables, plus the LM head (V_padded x d, the same matrix as the token embedding when tied).
6N is forward (2N) + backward (4N); 12 L d T is the attention score and value products
(QK^T and AV: 2 * 2 * T * d per layer per token forward, x3 with backward). Activation
recomputation is not counted: MFU measures useful model FLOPs.

MFU = flops_per_token * tokens_per_second / (peak FLOP/s of all the devices of the run).

metrics.jsonl (in the run directory, written by rank 0 only) holds one JSON object per line:
every step appends {"step", "loss", "lr", "grad_norm", "batch_size", "tokens", "tokens_sha",
"time" (wall seconds since the run started), ...} and every log interval adds throughput
("tokens_per_s", "mfu", "data_wait"); evaluations add "val_loss" (nats / token), "val_ppl" and
"val_bpb" (bits per byte of the target text: comparable across tokenizers); `train.eval_at_start`
adds a step-0 record with only the evaluation. A run appends {"event": "start", ...} and a resumed
one {"event": "resume", ...} and then repeats the steps after its checkpoint: `read_metrics`
keeps the last record of each step.

torch (and the model) load inside the functions that compute: the driver reads and plots
metrics.jsonl without them (train/backend.py says why that matters).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mtnlg_ray.config import ModelConfig

if TYPE_CHECKING:
    import torch

METRICS_FILE = "metrics.jsonl"


def matmul_params(cfg: ModelConfig) -> int:
    """N: parameters used in matrix multiplies (no embedding tables; the LM head counted once)."""
    import torch

    from mtnlg_ray.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return model.num_params(non_embedding=True) + cfg.padded_vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def measure_matmul_flops(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         n: int | None = None, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of square matmuls on `device` (the practical peak MFU is measured against):
    the fastest of the rounds of 4 products run within `seconds`, so that a slow spell of a shared
    machine during the measurement does not lower the peak (and raise every MFU after it).
    `dtype`: default float32."""
    import torch

    device, dtype = torch.device(device), dtype or torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm up (kernel selection, thread pool)
        a @ b
    sync()
    best, start = 0.0, time.perf_counter()
    while True:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        now = time.perf_counter()
        best = max(best, 2.0 * n ** 3 * 4 / (now - t0))
        if now - start >= seconds:
            return best


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(V,) int64: UTF-8 bytes of the text each token id stands for (a `data.tokenizer.Tokenizer`).

    SentencePiece's word-start mark counts as the space it stands for, a byte-fallback piece
    <0xNN> as one byte, control tokens (EOD, padding) and unknown as none."""
    sp = tokenizer.sp
    out = np.zeros(sp.get_piece_size(), np.int64)
    for i in range(len(out)):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


class MetricsLog:
    """Appends records to `run_dir/metrics.jsonl` (open per write: safe across restarts) and hands
    each to `trackers` (train/trackers.py: TensorBoard, MLflow, W&B), once the loop has opened them."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.write(record)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records sorted by step, last record of each step kept; event records in file order)."""
    path = Path(run_dir) / METRICS_FILE
    steps: dict[int, dict] = {}
    events: list[dict] = []
    if not path.is_file():
        return [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed worker
        if "event" in rec:
            events.append(rec)
        elif "step" in rec:
            steps[rec["step"]] = rec
    return [steps[k] for k in sorted(steps)], events
