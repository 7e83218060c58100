"""Dealing a global batch out to the data-parallel ranks (mtnlg_ray/train/batching.py), without processes.

The 2-process check that the dealt step equals one process on the same rows is
tests/parallel/test_elastic_batch.py.
"""

import pytest
import torch

from mtnlg_ray.train.batching import counted_per_row, deal, slot_rows


def rows(g: int, t: int = 5, labels: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.arange(g * (t + 1)).reshape(g, t + 1)
    out = {"input_ids": ids}
    if labels:
        out["labels"] = ids.clone()
    return out


@pytest.mark.parametrize("g, mb, dp, sizes", [
    (8, 4, 2, [4, 4]),  # divides: plain accumulation, one micro-step
    (16, 4, 2, [4, 4, 4, 4]),  # two micro-steps of 4
    (6, 4, 1, [3, 3]),  # uneven: two micro-steps of 3 instead of 4 + 2
    (6, 2, 2, [2, 2, 1, 1]),
    (5, 2, 2, [2, 1, 1, 1]),
    (256, 16, 7, [13] * 4 + [12] * 17),  # 3 micro-steps x 7 ranks
    (3, 4, 5, [1, 1, 1, 0, 0]),  # fewer rows than ranks: two slots empty
])
def test_slots_cover_the_batch_in_order_as_evenly_as_possible(g, mb, dp, sizes):
    ranges = slot_rows(g, mb, dp)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(g))
    assert len(ranges) % dp == 0 and max(sizes) <= mb


def test_every_rank_runs_the_same_micro_steps_and_the_scales_make_a_global_mean():
    g, mb, dp = 7, 2, 3
    per_rank = [deal(rows(g), mb, dp, r) for r in range(dp)]
    assert {len(b.micro) for b in per_rank} == {2}
    # each rank in order takes slots r, r + dp, ...: together every row once
    got = torch.cat([m.rows["input_ids"] for k in range(2) for b in per_rank for m in b.micro[k:k + 1]])
    assert torch.equal(got, rows(g)["input_ids"])
    assert all(b.global_tokens == g * 5 and b.padding_rows == 0 for b in per_rank)
    # sum_j n_j dp / N over all slots = dp: averaged over dp, the weights of the token losses sum to 1
    assert sum(m.loss_scale for b in per_rank for m in b.micro) == pytest.approx(dp)
    for b in per_rank:
        for m in b.micro:
            assert m.loss_scale == pytest.approx(m.tokens * dp / (g * 5))


def test_divisible_batches_are_plain_accumulation():
    for r in range(2):
        b = deal(rows(16), 4, 2, r)
        assert [m.loss_scale for m in b.micro] == pytest.approx([0.5, 0.5])  # 1 / accumulation
        assert [m.rows["input_ids"][0, 0].item() // 6 for m in b.micro] == [4 * r, 8 + 4 * r]


def test_empty_slots_run_one_padding_row_with_zero_weight():
    b = deal(rows(3), 4, 5, 4)
    (m,) = b.micro
    assert b.padding_rows == 2 and (m.tokens, m.loss_scale) == (0, 0.0)
    # a finite loss: the padding row (a copy of the batch's first row) predicts its own next ids
    assert torch.equal(m.rows["input_ids"], rows(3)["input_ids"][:1])
    assert torch.equal(m.rows["labels"], m.rows["input_ids"])


def test_masked_rows_weigh_by_their_counted_tokens():
    r = rows(4, labels=True)
    r["labels"][0, 1:4] = -100  # 2 of 5 targets left
    r["labels"][3, :] = -100  # none left
    assert counted_per_row(r).tolist() == [2, 5, 5, 0]
    b0, b1 = deal(r, 1, 2, 0), deal(r, 1, 2, 1)  # slots: rows 0, 1 | 2, 3
    assert b0.global_tokens == 12
    assert [(m.tokens, m.loss_scale) for m in b0.micro] == [(2, pytest.approx(2 * 2 / 12)), (5, pytest.approx(10 / 12))]
    assert [(m.tokens, m.loss_scale) for m in b1.micro] == [(5, pytest.approx(10 / 12)), (0, 0.0)]
    assert torch.equal(b1.micro[1].rows["labels"], r["input_ids"][3:])  # no counted token: own ids, weight 0


def test_pipeline_micro_batches_are_padded_to_one_shape():
    r = rows(5)
    b = deal(r, 4, 1, 0, pad_to_micro_batch=True)  # slots of 3 and 2 rows
    assert [tuple(m.rows["input_ids"].shape) for m in b.micro] == [(4, 6), (4, 6)] and b.padding_rows == 3
    labels = torch.cat([m.rows["labels"] for m in b.micro])
    assert (labels[3] == -100).all() and (labels[6:] == -100).all()
    assert torch.equal(torch.cat([labels[:3], labels[4:6]]), r["input_ids"])
    assert [m.tokens for m in b.micro] == [15, 10] and sum(m.loss_scale for m in b.micro) == pytest.approx(1.0)
