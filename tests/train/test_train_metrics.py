"""Model FLOPs (6N + attention), the matmul peak, and metrics.jsonl reading."""

import json

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.train.metrics import MetricsLog, flops_per_token, matmul_params, measure_matmul_flops, read_metrics


def test_flops_per_token_by_hand():
    cfg = ModelConfig(preset="debug", vocab_size=512, max_seq_len=64)  # L=2, d=64, d_mlp=256, tied head
    per_block = 4 * (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + 2 * (2 * 64)
    n = 2 * per_block + 2 * 64 + 512 * 64  # blocks, ln_f, LM head (embedding tables excluded)
    assert matmul_params(cfg) == n == 132864
    assert flops_per_token(cfg, 64) == 6 * n + 12 * 2 * 64 * 64


def test_gpt3_sized_flops_are_about_6n():
    cfg = ModelConfig(preset="gpt-1.3b")
    n = matmul_params(cfg)
    assert 1.3e9 < n < 1.45e9
    attention = 12 * 24 * 2048 * 2048  # 12 L d T
    assert flops_per_token(cfg, 2048) == 6 * n + attention
    assert 0.1 < attention / (6 * n) < 0.2  # ~15% on top of 6N at this size and context


def test_measured_matmul_peak_is_plausible():
    flops = measure_matmul_flops("cpu", n=256, seconds=0.1)
    assert 1e8 < flops < 1e14


def test_read_metrics_keeps_the_last_record_of_each_step(tmp_path):
    log = MetricsLog(tmp_path)
    for rec in ({"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"event": "resume", "from_step": 1},
                {"step": 2, "loss": 2.4}, {"step": 3, "loss": 2.0}):
        log.write(rec)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # cut short by a killed worker
    steps, events = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 3.0), (2, 2.4), (3, 2.0)]
    assert events == [{"event": "resume", "from_step": 1}]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]) == {"step": 1, "loss": 3.0}
