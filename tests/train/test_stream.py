"""The worker's readers: Arrow blocks to LongTensors, and the train stream's row position."""

import hashlib
import subprocess
import sys

import pytest
import ray.data

from mtnlg_ray.train.stream import TokenStream, iter_batches


def test_dataset_module_does_not_import_torch():
    """Ray Data's read tasks import data/dataset.py: it must not pull in torch (seconds per worker)."""
    code = "import sys, mtnlg_ray.data.dataset; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_iter_batches_reshapes_skips_and_keeps_the_tail(ray_session):
    ds = ray.data.from_items([{"input_ids": [i] * 3} for i in range(10)], override_num_blocks=2)
    full = list(iter_batches(ds, 4, drop_last=False))
    assert [len(b["input_ids"]) for b in full] == [4, 4, 2] and full[0]["input_ids"].shape == (4, 3)
    assert [b["input_ids"][0, 0].item() for b in iter_batches(ds, 4, skip_batches=1)] == [4]


def test_token_stream_counts_rows_across_micro_batches_and_resumes(ray_session):
    """The data position is in rows: a step's rows may end inside a chunk read; the stream
    (every row of the run) is read to its last row, and running past it is an error."""
    ds = ray.data.from_items([{"input_ids": [i] * 3} for i in range(10)], override_num_blocks=1)
    stream = TokenStream(ds, 0, read_rows=4)  # read in chunks of 4: 4 + 4 + 2 rows
    taken = [stream.take(3, hashlib.sha256())["input_ids"][:, 0].tolist() for _ in range(3)]
    assert taken == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and stream.pos == 9
    resumed = TokenStream(ds, 5, read_rows=4)  # 5 = one chunk + 1 row
    assert resumed.take(5, hashlib.sha256())["input_ids"][:, 0].tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(RuntimeError, match="the train stream ended after 10 rows"):
        resumed.take(1, hashlib.sha256())
