"""The (pp, dp, tp) layout checks (mtnlg_ray/parallel/mesh.py)."""

from __future__ import annotations

import pytest

from mtnlg_ray.config import ModelConfig, ParallelConfig
from mtnlg_ray.errors import ConfigError
from mtnlg_ray.parallel import build_mesh, check_layout
from mtnlg_ray.parallel.mesh import resolve_dims
from parallel_harness import tiny_model

MTNLG = ModelConfig(preset="mtnlg-530b", tie_embeddings=False)


def test_dp_fills_the_world():
    assert resolve_dims(ParallelConfig(), 8) == (1, 8, 1)
    assert resolve_dims(ParallelConfig(tp=2, pp=2), 8) == (2, 2, 2)
    assert resolve_dims(ParallelConfig(tp=2, dp=4), 8) == (1, 4, 2)
    # MT-NLG 530B: 8-way tensor x 35-way pipeline x data parallel, on 280 GPUs per replica
    assert resolve_dims(ParallelConfig(tp=8, pp=35), 8 * 35 * 4) == (35, 4, 8)
    check_layout(MTNLG, ParallelConfig(tp=8, pp=35, pp_microbatches=70), 8 * 35 * 4)


@pytest.mark.parametrize("model, cfg, world, message", [
    ({}, dict(tp=2, pp=2, dp=1), 3, "parallel: tp=2 x pp=2 x dp=1 = 4 does not match world size 3"),
    ({}, dict(tp=2), 3, "parallel: tp=2 x pp=1 = 2 does not divide world size 3"),
    ({}, dict(tp=3, dp=1), 3, "parallel.tp: must divide model.n_heads=4 (got 3)"),
    ({}, dict(dp=0), 1, "parallel.dp: must be a positive number or -1 (got 0)"),
    ({"n_layers": 2}, dict(pp=4), 4, "parallel.pp: 4 pipeline stages need at least as many layers (model.n_layers=2)"),
    ({}, dict(pp=2), 2, "parallel.pp: tied embeddings live on the first and last stage; "
                        "set model.tie_embeddings: false for pp > 1"),
    ({"tie_embeddings": False, "n_layers": 8}, dict(pp=4, pp_schedule="interleaved_1f1b", pp_microbatches=9), 4,
     "parallel.pp_microbatches: interleaved_1f1b runs rounds of 2 (= pp_microbatches // pp=4), which must divide it (got 9)"),
    ({}, dict(tp=2, data_parallel="ddp"), 4, "parallel.data_parallel: ddp does not combine with tp > 1; use fsdp"),
])
def test_impossible_layouts_are_refused_in_one_line(model, cfg, world, message):
    with pytest.raises(ConfigError) as err:
        check_layout(tiny_model(**model), ParallelConfig(**cfg), world)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_legal_pipeline_layouts_pass():
    untied = tiny_model(n_layers=8, tie_embeddings=False)
    for schedule, microbatches in [("1f1b", 4), ("gpipe", 1), ("interleaved_1f1b", 6), ("interleaved_1f1b", 3)]:
        check_layout(untied, ParallelConfig(pp=4, pp_schedule=schedule, pp_microbatches=microbatches), 4)


def test_single_process_mesh():
    dims = build_mesh(ParallelConfig(), 1, "cpu")
    assert dims.mesh is None and dims.group("dp") is None
    assert (dims.pp_rank, dims.dp_rank, dims.tp_rank) == (0, 0, 0)
    with pytest.raises(ConfigError, match="does not match world size 1"):
        build_mesh(ParallelConfig(tp=2, dp=1), 1, "cpu")


def test_build_mesh_needs_a_process_group_for_several_ranks():
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        build_mesh(ParallelConfig(), 2, "cpu")
