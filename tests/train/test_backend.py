"""The torch process group of Ray Train's workers (mtnlg_ray/train/backend.py), on the session's Ray."""

from __future__ import annotations

from ray.train import RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from mtnlg_ray.train.backend import TorchProcessGroup


def fit(tmp_path, workers: int):
    def report_process_group() -> None:
        """What the worker sees of torch.distributed; with a group, an all-reduce across it. Nested
        (pickled by value, imports inside): the workers cannot import the test modules."""
        import os
        import tempfile
        from pathlib import Path

        import ray.train
        import torch
        import torch.distributed as dist

        ctx = ray.train.get_context()
        total = None
        if dist.is_initialized():
            t = torch.tensor([float(ctx.get_world_rank() + 1)])
            dist.all_reduce(t)
            total = float(t)
        ckpt = Path(tempfile.mkdtemp())  # Result.metrics is set only by a report that carries a checkpoint
        (ckpt / "seen").write_text("1")
        ray.train.report({"group": dist.is_initialized(), "backend": dist.get_backend() if dist.is_initialized() else None,
                          "env": [os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")],
                          "sum": total}, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)))

    trainer = DataParallelTrainer(report_process_group, backend_config=TorchProcessGroup(backend="gloo"),
                                  scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                                  run_config=RunConfig(storage_path=str(tmp_path), name=f"pg{workers}"))
    return trainer.fit()


def test_workers_join_one_gloo_group_and_a_single_worker_none(ray_session, tmp_path):
    two = fit(tmp_path, 2)
    assert two.error is None
    # rank 0's report: a gloo group of both workers, whose all-reduce sums 1 + 2
    assert two.metrics["group"] and two.metrics["backend"] == "gloo" and two.metrics["sum"] == 3.0
    assert two.metrics["env"][:3] == ["0", "2", "0"] and two.metrics["env"][3]
    one = fit(tmp_path, 1)
    assert one.error is None
    assert one.metrics["group"] is False and one.metrics["env"][:2] == ["0", "1"]
