"""build_trainer: the Ray Train objects it builds, and what it refuses before any worker starts."""

import pytest
from train_jobs import make_job

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.train.trainer import build_trainer


def test_builds_scaling_and_run_config(ray_session, pretrain_data, tmp_path):
    job = make_job(pretrain_data, tmp_path / "runs", "built", scaling={"num_workers": [1, 2], "max_failures": 2},
                   checkpoint={"num_to_keep": 3})
    trainer = build_trainer(job)
    sc, rc = trainer.scaling_config, trainer.run_config
    assert sc.num_workers == (1, 2) and sc.resources_per_worker == {"CPU": 0.5} and not sc.use_gpu
    assert rc.name == "built" and rc.storage_path == str(tmp_path / "runs")
    assert rc.checkpoint_config.num_to_keep == 3 and rc.failure_config.max_failures == 2
    cfg = trainer.train_loop_config
    assert cfg["kind"] == "pretrain" and cfg["run"]["model"]["vocab_size"] == 512 and cfg["run"]["seq_len"] == 64
    assert cfg["run"]["has_val"] and cfg["job"]["train"]["global_batch_size"] == 8


@pytest.mark.parametrize("sections, message", [
    ({"parallel": {"tp": 3}}, r"parallel: tp=3 x pp=1 = 3 does not divide world size 2"),
    ({"parallel": {"tp": 2}, "scaling": {"num_workers": [1, 2]}}, r"does not divide world size 1 .*allows 1 workers"),
    ({"parallel": {"pp": 2}, "scaling": {"num_workers": 2}}, r"tied embeddings"),
    ({"train": {"global_batch_size": 12, "micro_batch_size": 4}},
     r"train.global_batch_size: 12 is not a multiple of micro_batch_size x dp = 4 x 2 = 8"),
    ({"model": {"vocab_size": 1000}}, r"model.vocab_size: the model has vocab_size 1000 but the dataset's tokenizer .* has 512"),
    ({"model": {"max_seq_len": 32}}, r"model.max_seq_len: 32 is shorter than the dataset's rows \(seq_len 64\)"),
    ({"scaling": {"num_workers": 4, "cpus_per_worker": 1.0}, "train": {"micro_batch_size": 2}}, r"leave 0 of the cluster's 4 CPUs to Ray Data"),
])
def test_refuses_before_launching(ray_session, pretrain_data, tmp_path, sections, message):
    scaling = {"num_workers": 2, **sections.pop("scaling", {})}
    job = make_job(pretrain_data, tmp_path / "runs", "bad", scaling=scaling, **sections)
    with pytest.raises(ConfigError, match=message):
        build_trainer(job)
