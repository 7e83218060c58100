"""The worker's reads of a blended stream: rows to LongTensors, and the train stream's row position."""

import hashlib
import subprocess
import sys

import pytest
import torch

from mtnlg_ray.config import DatasetConfig, TrainDataConfig
from mtnlg_ray.data.dataset import open_datasets
from mtnlg_ray.train.stream import TokenStream, iter_batches


def stream_of(make_dataset, n: int, **kw):
    """The train stream of a one-dataset blend of n rows (row r: [1, r, ...]), and its row numbers in order."""
    rows = open_datasets(TrainDataConfig(datasets=[DatasetConfig(path=str(make_dataset("s", 1, n_train=n, **kw)))])).train
    return rows, rows.read(0, n)["input_ids"][:, 1].tolist()


def test_dataset_module_imports_neither_torch_nor_ray():
    """The driver opens the datasets before Ray starts, and Ray Train's controller never needs torch."""
    code = "import sys, mtnlg_ray.data.dataset; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"


def test_iter_batches_reshapes_skips_and_keeps_the_tail(make_dataset):
    rows, order = stream_of(make_dataset, 10)
    full = list(iter_batches(rows, 4, drop_last=False))
    assert [len(b["input_ids"]) for b in full] == [4, 4, 2] and full[0]["input_ids"].shape == (4, 9)
    assert full[0]["input_ids"].dtype == torch.long
    assert [b["input_ids"][:, 1].tolist() for b in full] == [order[:4], order[4:8], order[8:]]
    assert [b["input_ids"][0, 1].item() for b in iter_batches(rows, 4, skip_batches=1)] == [order[4]]


def test_token_stream_counts_rows_across_batches_and_resumes(make_dataset):
    """The data position is in rows: a step's rows may start anywhere; the stream (every row of
    the run) is read to its last row, and running past it is an error."""
    rows, order = stream_of(make_dataset, 10, labels=True)
    stream = TokenStream(rows, 0)
    taken = [stream.take(3, hashlib.sha256()) for _ in range(3)]
    assert [t["input_ids"][:, 1].tolist() for t in taken] == [order[:3], order[3:6], order[6:9]] and stream.pos == 9
    assert set(taken[0]) == {"input_ids", "labels"} and (taken[0]["labels"][:, 0] == -100).all()
    resumed = TokenStream(rows, 5)
    assert resumed.take(5, hashlib.sha256())["input_ids"][:, 1].tolist() == order[5:]
    with pytest.raises(RuntimeError, match="the train stream ended after 10 rows"):
        resumed.take(1, hashlib.sha256())
