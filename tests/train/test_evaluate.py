"""train/evaluate.py: the eval set is the first micro-batches of the validation stream, the last one padded."""

from __future__ import annotations

import torch

from mtnlg_ray.config import DatasetConfig, TrainDataConfig
from mtnlg_ray.data.dataset import open_datasets
from mtnlg_ray.train.evaluate import load_eval_set


def test_eval_set_takes_micro_batches_and_pads_the_whole_split(make_dataset):
    val = open_datasets(TrainDataConfig(datasets=[DatasetConfig(path=str(make_dataset("v", 1, 8, n_val=23)))])).val
    ids = torch.from_numpy(val.read(0, 23)["input_ids"]).long()
    first = load_eval_set(val, 4, 3)
    assert len(first) == 3 and all(torch.equal(b["input_ids"], ids[4 * i:4 * i + 4]) for i, b in enumerate(first))
    whole = load_eval_set(val, 4, "all")  # 23 rows: 5 full micro-batches and one padded to 4
    assert len(whole) == 6 and whole[-1]["input_ids"].shape == (4, 9)
    assert torch.equal(whole[-1]["input_ids"][:3], ids[20:]) and (whole[-1]["labels"][3] == -100).all()
    assert load_eval_set(None, 4, 3) == []
