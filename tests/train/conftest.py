"""Fixtures for the training tests: one small real dataset per session, and tiny jobs.

The dataset is the built-in corpus (a few stdlib files) through the real preprocess pipeline;
jobs use the debug preset with 64-token rows, so a Ray Train run takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mtnlg_ray.config import PreprocessJob, PretrainJob, validate
from mtnlg_ray.data.shards import run_preprocess

SEQ_LEN = 64


@pytest.fixture(scope="session")
def pretrain_data(ray_session, tmp_path_factory) -> Path:
    """`mtnlg preprocess` of 12 stdlib files: a 512-piece tokenizer, rows of 64 + 1 ids (~2k train rows)."""
    job = validate(PreprocessJob, {
        "corpus": {"kind": "stdlib", "max_files": 12},
        "tokenizer": {"vocab_size": 512, "sample_docs": 12},
        "pack": {"seq_len": SEQ_LEN, "val_fraction": 0.1, "num_actors": 1, "rows_per_shard": 1024},
        "output_dir": str(tmp_path_factory.mktemp("data") / "stdlib"),
    }, "test preprocess job")
    return run_preprocess(job)


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
