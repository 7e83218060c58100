"""train/trainer.py: what the driver settles for the workers before Ray Train starts them."""

from __future__ import annotations

import os

from train_jobs import make_job

from mtnlg_ray.train.trainer import worker_threads_env


def test_workers_start_openmp_with_their_thread_count(ray_session, tmp_path):
    """A worker's OMP_NUM_THREADS is the count it will compute with (Ray's would be 1 for 0.5 CPU):
    scaling.threads_per_worker, else this one-node cluster's cores shared among the workers."""
    cores = len(os.sched_getaffinity(0))
    job = make_job(tmp_path, tmp_path, "t")
    assert worker_threads_env(job) == {"OMP_NUM_THREADS": str(cores)}
    two = make_job(tmp_path, tmp_path, "t", scaling={"num_workers": [1, 2]})
    assert worker_threads_env(two) == {"OMP_NUM_THREADS": str(max(1, cores // 2))}
    pinned = make_job(tmp_path, tmp_path, "t", scaling={"threads_per_worker": 3})
    assert worker_threads_env(pinned) == {"OMP_NUM_THREADS": "3"}
