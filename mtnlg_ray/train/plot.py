"""Loss curves of a run as PNG: `mtnlg plot RUN_DIR` (also written at the end of every run).

loss.png: training loss per step and validation loss at each evaluation (left axis: loss;
top axis: tokens seen), beside the learning-rate schedule. Read from the run's metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from mtnlg_ray.errors import UserError
from mtnlg_ray.train.metrics import METRICS_FILE, read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write `run_dir/loss.png` from `run_dir/metrics.jsonl`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    records, _ = read_metrics(run)
    if not records:
        raise UserError(f"{run / METRICS_FILE}: no training steps recorded (not a run directory, or no step done)")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    ax_loss.plot(steps, [r["loss"] for r in records], lw=1, label="train")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax_loss.plot(*zip(*val), "o-", ms=3, label="validation")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.set_title(f"{run.name}: {records[-1].get('tokens', 0):,} tokens")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], lw=1, color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]
