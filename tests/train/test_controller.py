"""train/controller.py: a worker's wake-up makes the controller poll now, not at its next tick."""

from __future__ import annotations

import time

import pytest
import ray.train
from ray.train import RunConfig, ScalingConfig

from mtnlg_ray.train.controller import wake_controller
from mtnlg_ray.train.trainer import Trainer

SLOW_POLL_S = 20  # Ray Train's poll interval in these runs: a missed wake-up costs this much


def _run(tmp_path, name: str, fn) -> tuple[float, object]:
    trainer = Trainer(fn, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                      run_config=RunConfig(name=name, storage_path=str(tmp_path)))
    t0 = time.monotonic()
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - the failing run's error is the result
        result = err
    return time.monotonic() - t0, result


def _reports_then_ends():
    def train_fn():
        """Nested (pickled by value, imports inside): the workers cannot import the test modules."""
        import ray.train

        from mtnlg_ray.train.controller import wake_controller

        ray.train.report({"step": 1})
        wake_controller()
        # waits until the controller has taken this report: at once after a wake-up
        seen = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        assert seen == []
        wake_controller(final=True)

    return train_fn


def _raises():
    def train_fn():
        from mtnlg_ray.train.controller import wake_controller

        try:
            raise ValueError("broken on purpose")
        finally:
            wake_controller(final=True)

    return train_fn


@pytest.fixture
def slow_poll(monkeypatch, ray_session):
    # Ray Train hands the driver's RAY_TRAIN_* settings to the controller it starts
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(SLOW_POLL_S))


def test_a_finished_run_returns_without_waiting_for_the_next_poll(tmp_path, slow_poll):
    elapsed, result = _run(tmp_path, "finishes", _reports_then_ends())
    assert not isinstance(result, Exception), result
    # worker start-up takes a few seconds; one missed wake-up alone would take SLOW_POLL_S
    assert elapsed < SLOW_POLL_S, elapsed


def test_a_failed_run_raises_without_waiting_for_the_next_poll(tmp_path, slow_poll):
    elapsed, result = _run(tmp_path, "fails", _raises())
    assert isinstance(result, Exception) and "broken on purpose" in str(result)
    assert elapsed < SLOW_POLL_S, elapsed


def test_wake_outside_a_worker_is_a_no_op():
    wake_controller()
    wake_controller(final=True)
