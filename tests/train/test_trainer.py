"""build_trainer: the Ray Train objects it builds, and what it refuses before any worker starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_jobs import make_job

from mtnlg_ray.config import ModelConfig, PretrainJob, validate
from mtnlg_ray.errors import ConfigError
from mtnlg_ray.train.trainer import build_trainer, check_scaling, run_of, worker_threads_env


def test_builds_scaling_and_run_config(ray_session, pretrain_data, tmp_path):
    job = make_job(pretrain_data, tmp_path / "runs", "built", scaling={"num_workers": [1, 2], "max_failures": 2},
                   checkpoint={"num_to_keep": 3})
    trainer = build_trainer(job)
    sc, rc = trainer.scaling_config, trainer.run_config
    assert sc.num_workers == (1, 2) and sc.resources_per_worker == {"CPU": 0.5} and not sc.use_gpu
    assert rc.name == "built" and rc.storage_path == str(tmp_path / "runs")
    assert rc.checkpoint_config.num_to_keep == 3 and rc.failure_config.max_failures == 2
    cfg, run = trainer.train_loop_config, run_of(trainer)  # the worker's two halves, typed
    assert cfg["kind"] == "pretrain" and run.model.vocab_size == 512 and run.seq_len == 64
    assert validate(PretrainJob, cfg["job"]).train.global_batch_size == 8
    # the workers read the rows themselves: no Ray Data datasets, the streams in the config
    assert not trainer.datasets and len(cfg["data"]["train"]) >= 8 * 6 and cfg["data"]["val"] is not None
    assert trainer.backend_config.backend == "gloo"
    # workers start with their OpenMP thread count and Ray's jemalloc preloaded (malloc.py)
    env = rc.worker_runtime_env["env_vars"]
    assert env["LD_PRELOAD"].endswith("ray/core/libjemalloc.so") and Path(env["LD_PRELOAD"]).is_file()
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1" and int(env["OMP_NUM_THREADS"]) >= 1
    # the session's Ray has no dashboard: no placement-group cleaner (it could never reach the state API)
    kinds = {type(c).__name__ for c in trainer._create_default_callbacks()}
    assert "BackendSetupCallback" in kinds and "PlacementGroupCleanerCallback" not in kinds
    assert "DatasetsCallback" not in kinds  # no Ray Data datasets: no dataset-manager actor


@pytest.mark.parametrize("sections, message", [
    ({"parallel": {"tp": 3}}, r"parallel: tp=3 x pp=1 = 3 does not divide world size 2"),
    ({"parallel": {"tp": 2}, "scaling": {"num_workers": [1, 2]}},
     r"scaling.num_workers: \[1, 2\] lets Ray Train run with 1 workers, which the layout cannot use "
     r"\(parallel: tp=2 x pp=1 = 2 does not divide world size 1\)"),
    ({"parallel": {"pp": 2}, "scaling": {"num_workers": 2}}, r"tied embeddings"),
    ({"parallel": {"pp": 2, "pp_microbatches": 3}, "model": {"tie_embeddings": False}},
     r"train.micro_batch_size: 4 does not split into parallel.pp_microbatches=3 equal pipeline chunks"),
    ({"model": {"vocab_size": 1000}}, r"model.vocab_size: the model has vocab_size 1000 but the dataset's tokenizer .* has 512"),
    ({"model": {"max_seq_len": 32}}, r"model.max_seq_len: 32 is shorter than the dataset's rows \(seq_len 64\)"),
])
def test_refuses_before_launching(ray_session, pretrain_data, tmp_path, sections, message):
    scaling = {"num_workers": 2, **sections.pop("scaling", {})}
    job = make_job(pretrain_data, tmp_path / "runs", "bad", scaling=scaling, **sections)
    with pytest.raises(ConfigError, match=message):
        build_trainer(job)


def scaled(**sections):
    """(job, its model with the test tokenizer's vocabulary) for check_scaling, which needs no Ray."""
    job = make_job(Path("data"), Path("runs"), "scaling", **sections)
    return job, ModelConfig.model_validate(job.model.model_copy(update={"vocab_size": 512}).model_dump())


def test_any_global_batch_fits_any_worker_count():
    # 7 rows over 1..5 data-parallel ranks in micro-batches of at most 4; a ramp from 3 by 2
    check_scaling(*scaled(train={"global_batch_size": 7, "micro_batch_size": 4,
                                 "rampup": {"start": 3, "increment": 2, "samples": 20}},
                          scaling={"num_workers": [1, 5]}))
    check_scaling(*scaled(parallel={"tp": 2}, scaling={"num_workers": [2, 2]}, train={"global_batch_size": 5}))


@pytest.mark.parametrize("sections, seq_len, message", [
    ({"parallel": {"tp": 2}, "scaling": {"num_workers": [2, 4]}}, None,
     r"^scaling.num_workers: \[2, 4\] lets Ray Train run with 3 workers, which the layout cannot use "
     r"\(parallel: tp=2 x pp=1 = 2 does not divide world size 3\); Ray may pick any count in an elastic range"),
    ({"parallel": {"dp": 2}, "scaling": {"num_workers": [2, 3]}}, None, r"with 3 workers.*dp=2 = 2 does not match world size 3"),
    ({"parallel": {"tp": 2, "sequence_parallel": True}, "scaling": {"num_workers": 2}}, 63,
     r"parallel.sequence_parallel: tp=2 must divide the dataset's sequence length 63"),
    ({"parallel": {"pp": 2, "pp_microbatches": 2}, "model": {"tie_embeddings": False},
      "train": {"micro_batch_size": 3}, "scaling": {"num_workers": 2}}, None,
     r"train.micro_batch_size: 3 does not split into parallel.pp_microbatches=2"),
])
def test_refuses_a_worker_count_the_layout_cannot_use(sections, seq_len, message):
    with pytest.raises(ConfigError, match=message):
        check_scaling(*scaled(**sections), seq_len=seq_len)


def test_workers_start_openmp_with_their_thread_count(ray_session, tmp_path):
    """A worker's OMP_NUM_THREADS is the count it will compute with (Ray's would be 1 for 0.5 CPU):
    scaling.threads_per_worker, else this one-node cluster's cores shared among the workers."""
    cores = len(os.sched_getaffinity(0))
    assert worker_threads_env(make_job(tmp_path, tmp_path, "t")) == {"OMP_NUM_THREADS": str(cores)}
    two = make_job(tmp_path, tmp_path, "t", scaling={"num_workers": [1, 2]})
    assert worker_threads_env(two) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    pinned = make_job(tmp_path, tmp_path, "t", scaling={"threads_per_worker": 3})
    assert worker_threads_env(pinned) == {"OMP_NUM_THREADS": "3"}


def test_the_driver_leaves_the_worker_code_unimported():
    """The driver (and Ray Train's controller, which unpickles the same modules) imports layout
    checks, a reference to the loop and a torch-free backend config, not torch or the model,
    parallelism, pipelining and checkpoint code of the workers (2-4 s of every run's start-up)."""
    code = ("import sys, mtnlg_ray.train.trainer, mtnlg_ray.train.backend; "
            "print(' '.join(m for m in ('torch', 'mtnlg_ray.train.loop', 'mtnlg_ray.parallel.parallelized', "
            "'torch.distributed.pipelining', 'torch.distributed.checkpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
    from mtnlg_ray.parallel import parallelize  # the package's names still load on first use

    assert parallelize.__module__ == "mtnlg_ray.parallel.parallelized"
