"""Loss curves of a run as PNG: `mtnlg plot RUN_DIR` (also written at the end of every run).

loss.png, three panels read from the run's metrics.jsonl:
  loss per step      training loss and the validation loss at each evaluation (nats / token)
  loss per second    the same against the run's wall-clock time (time-to-loss, for comparing runs
                     and machines); records written before wall time was logged are left out
  learning rate      the schedule per step
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
    train = [r for r in records if "loss" in r]  # a step-0 record holds only an evaluation
    if not train:
        raise UserError(f"{run / METRICS_FILE}: no training steps recorded (not a run directory, or no step done)")
    val = [r for r in records if "val_loss" in r]
    fig, (ax_step, ax_time, ax_lr) = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [2, 2, 1]})
    for ax, key, label in ((ax_step, "step", "step"), (ax_time, "time", "wall time (s)")):
        pts = [r for r in train if key in r]
        ax.plot([r[key] for r in pts], [r["loss"] for r in pts], lw=1, label="train")
        vpts = [r for r in val if key in r]
        if vpts:
            ax.plot([r[key] for r in vpts], [r["val_loss"] for r in vpts], "o-", ms=3, label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
    last_val = f", val {val[-1]['val_loss']:.3f}" + (f" ({val[-1]['val_bpb']:.3f} bits/byte)"
                                                     if "val_bpb" in val[-1] else "") if val else ""
    ax_step.set_title(f"{run.name}: {train[-1].get('tokens', 0):,} tokens{last_val}")
    ax_time.set_title("time to loss")
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1, color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]
