"""train/evaluate.py: the eval set read in the background equals the one read in place."""

from __future__ import annotations

import pytest
import ray
import torch

from mtnlg_ray.train.evaluate import EvalSet, load_eval_set


def rows_dataset(n: int, width: int = 9):
    return ray.data.from_items([{"input_ids": list(range(i, i + width))} for i in range(n)])


def test_eval_set_reads_in_the_background_what_load_eval_set_reads(ray_session):
    ds = rows_dataset(23)
    ahead = EvalSet(ds, 4, 3)
    in_place = load_eval_set(ds, 4, 3)
    assert len(ahead.rows()) == 3 and ahead.rows() is ahead.rows()  # read once
    for a, b in zip(ahead.rows(), in_place):
        assert torch.equal(a["input_ids"], b["input_ids"])
    whole = EvalSet(ds, 4, "all").rows()  # 23 rows: 5 full micro-batches and one padded to 4
    assert len(whole) == 6 and whole[-1]["input_ids"].shape == (4, 9)
    assert EvalSet(None, 4, 3).rows() == []


def test_eval_set_read_error_surfaces_at_first_use(ray_session):
    bad = ray.data.from_items([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}])  # ragged rows
    pending = EvalSet(bad, 2, 1)
    with pytest.raises(ValueError, match="reshape"):
        pending.rows()
