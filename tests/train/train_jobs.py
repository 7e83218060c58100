"""Tiny pretraining jobs for the training tests (debug preset, 64-token rows: seconds per Ray Train run)."""

from __future__ import annotations

from pathlib import Path

from mtnlg_ray.checkpoint import remote
from mtnlg_ray.config import PretrainJob, validate

SEQ_LEN = 64


def make_job(data: Path, storage: Path, name: str, **sections) -> PretrainJob:
    """A debug-preset pretraining job on `data`, overridden by `sections` ({"train": {...}, ...})."""
    base = {
        "model": {"preset": "debug", "max_seq_len": SEQ_LEN},
        "data": {"datasets": [{"path": str(data)}]},
        "optim": {"lr": 3e-3, "warmup_tokens": 2 * 8 * SEQ_LEN},
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 6, "log_interval": 1,
                  "eval_interval": 3, "eval_batches": 2, "peak_flops": 1e11},
        "checkpoint": {"interval": 3, "num_to_keep": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "storage_path": str(storage), "name": name},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return validate(PretrainJob, base, "test job")


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint_* directories of a local run, newest first."""
    return [Path(p) for p in remote.checkpoints(*remote.open_location(run_dir))]
