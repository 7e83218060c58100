"""Pipeline parallel (torch.distributed.pipelining) over 2 gloo processes vs one process (mtnlg_ray/parallel/pp.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mtnlg_ray.config import ParallelConfig
from mtnlg_ray.parallel import build_mesh, parallelize
from mtnlg_ray.parallel.pp import stage_layers
from parallel_harness import assert_same_step, batch, one_step, reference_step, run_workers, tiny_model

MODEL = dict(n_layers=4, tie_embeddings=False)
CASES = {  # name -> parallel fields
    "1f1b": {"pp_schedule": "1f1b", "pp_microbatches": 2},
    "gpipe": {"pp_schedule": "gpipe", "pp_microbatches": 4},
    "interleaved_1f1b": {"pp_schedule": "interleaved_1f1b", "pp_microbatches": 2},
}


def _targets():
    """A batch whose ignored (-100) targets fall unevenly: the first pipeline chunk (rows 0-1)
    holds most of them, so a per-chunk mean would differ from the micro-batch mean."""
    ids, tgt = batch(4)
    tgt[0, :12] = -100
    tgt[1, 3:9] = -100
    tgt[3, -1] = -100
    return ids, tgt


def _pp_steps(rank: int, world_size: int):
    """Per schedule: (step result of this rank's stages, (blocks, has tok_emb, has lm_head) per stage)."""
    out = {}
    ids, tgt = _targets()
    for name, fields in CASES.items():
        cfg = ParallelConfig(pp=2, precision="fp32", **fields)
        dims = build_mesh(cfg, world_size, "cpu")
        model = parallelize(tiny_model(**MODEL), dims, cfg, torch.device("cpu"), seed=5)
        stages = [(sorted(int(k) for k in part.blocks), part.tok_emb is not None, part.lm_head is not None)
                  for part in model.parts]
        out[name] = (one_step(model, ids, tgt), stages)
    return out


@pytest.fixture(scope="module")
def pp_results():
    return run_workers(_pp_steps, 2)


@pytest.fixture(scope="module")
def reference():
    return reference_step(tiny_model(**MODEL), *_targets(), seed=5)


@pytest.mark.parametrize("case", list(CASES))
def test_pp_step_matches_single_process(case, pp_results, reference):
    # loss broadcast to both stages, grad norm summed over them, their parameters together the model
    assert_same_step([r[case][0] for r in pp_results], reference, merge=True)


def test_stage_layout(pp_results):
    rank0, rank1 = (r["1f1b"][1] for r in pp_results)
    assert rank0 == [([0, 1], True, False)] and rank1 == [([2, 3], False, True)]
    # interleaved: rank r holds stages r and r + 2 of 4
    rank0, rank1 = (r["interleaved_1f1b"][1] for r in pp_results)
    assert rank0 == [([0], True, False), ([2], False, False)]
    assert rank1 == [([1], False, False), ([3], False, True)]


def test_stage_layers_split_evenly():
    assert stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layers(105, 35) == [range(3 * s, 3 * s + 3) for s in range(35)]  # MT-NLG: 3 layers a stage
    assert [len(r) for r in stage_layers(7, 3)] == [3, 2, 2]


def test_a_worker_without_a_pipeline_leaves_pipelining_unimported():
    """torch.distributed.pipelining (and the dynamo it imports: about 1 s) loads with the first
    pipeline schedule, not with the training loop every worker imports."""
    code = "import sys, mtnlg_ray.train.loop; print('torch.distributed.pipelining' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
