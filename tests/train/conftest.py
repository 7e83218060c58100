"""Fixtures for the training tests: one small real dataset per session, and tiny jobs.

The dataset is the built-in corpus (a few stdlib files) through the real preprocess pipeline;
jobs use the debug preset with 64-token rows, so a Ray Train run takes seconds.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtnlg_ray.config import PretrainJob, validate
from mtnlg_ray.data.shards import write_manifest

SEQ_LEN = 64


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory, tiny_tokenizer) -> Path:
    """A dataset directory: 64-token rows of stdlib sources (a few thousand train rows, 5% val)."""
    root = tmp_path_factory.mktemp("data") / "stdlib"
    tok = tiny_tokenizer
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:12]
    ids = np.concatenate([np.array(tok.encode(f.read_text(encoding="utf-8")) + [tok.eod_id], np.int32) for f in files])
    rows = ids[: len(ids) // (SEQ_LEN + 1) * (SEQ_LEN + 1)].reshape(-1, SEQ_LEN + 1)
    n_val = max(8, len(rows) // 20)
    for split, part in (("train", rows[n_val:]), ("val", rows[:n_val])):
        (root / split).mkdir(parents=True)
        pq.write_table(pa.table({"input_ids": pa.array(list(part), pa.list_(pa.int32()))}),
                       root / split / "part-00000.parquet", row_group_size=1024)
    import shutil

    shutil.copy(tok.path, root / "tokenizer.model")
    write_manifest(root, tok.sha256, tok.vocab_size, tok.eod_id, SEQ_LEN)
    return root


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
