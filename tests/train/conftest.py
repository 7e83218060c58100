"""Fixtures for the training tests: one small real dataset per session, and tiny jobs.

The dataset is the built-in corpus (a few stdlib files) through the real preprocess pipeline;
jobs use the debug preset with 64-token rows, so a Ray Train run takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from train_jobs import SEQ_LEN

from mtnlg_ray.config import PreprocessJob, validate
from mtnlg_ray.data.shards import run_preprocess


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
