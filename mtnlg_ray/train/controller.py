"""Ray Train's controller, woken by its workers: `PromptController` and `wake_controller`.

Ray Train 2.60's controller learns what its workers did (a report, the end of the train function,
an error) only when it polls them, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S seconds (2 by
default). So under Ray's controller a finished run waits for the next polls before `fit()`
returns (2.7 s from the last step of a 100-step run of nanoGPT's CPU shape; 0.3 s when polling
every 0.1 s), and a report's checkpoint is registered up to a poll late. Polling more often costs
the training itself: each poll is an actor call that the worker's main thread executes beside
the training thread (docs/benchmarks.md: 0.81x of the bare loop's tokens/s polling every 0.5 s,
0.90x every 2 s).

Here a worker tells the controller when there is something to collect, and the controller polls
then rather than at its next tick: right after a report (the result is queued when
`ray.train.report` returns, so one poll takes it) and when the train function ends or raises.
The worker's thread may still be running when that wake-up arrives, so after one the controller
polls every FINAL_POLL_S for FINAL_WINDOW_S before returning to Ray's interval. Between wake-ups
it polls as Ray does (the health check of a worker that died without a word).

Kept apart from train/trainer.py because the controller actor unpickles it: this imports only Ray.
"""

from __future__ import annotations

import asyncio
import time

import ray
from ray.train.v2._internal.execution.controller import TrainController

FINAL_POLL_S = 0.05  # seconds between polls after a worker's train function ended
FINAL_WINDOW_S = 2.0  # for this long


class PromptController(TrainController):
    """Ray Train's controller that polls its workers as soon as one of them calls `wake`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._woken = asyncio.Event()  # set by `wake`; binds to the actor's event loop on first wait
        self._fast_until = 0.0  # time.monotonic() until which polls come every FINAL_POLL_S

    async def wake(self, final: bool = False) -> None:
        """A worker has a report queued, or (`final`) its train function has returned or raised."""
        if final:
            self._fast_until = time.monotonic() + FINAL_WINDOW_S
        self._woken.set()

    async def _poll_workers(self):
        # TrainController._poll_workers, with its sleep cut short by a wake-up
        now = time.monotonic()
        interval = FINAL_POLL_S if now < self._fast_until else self._health_check_interval_s
        remaining = interval - (now - self._latest_poll_time)
        if remaining > 0 and not self._woken.is_set():
            try:
                await asyncio.wait_for(self._woken.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        self._woken.clear()
        if self.get_state().is_terminal():
            ray.actor.exit_actor()
        status = self._worker_group.poll_status(timeout=self._health_check_interval_s)
        self._latest_poll_time = time.monotonic()
        return status


def wake_controller(final: bool = False) -> None:
    """In a Ray Train worker: ask the run's controller to poll now (see the module doc). A hint
    only: under a controller without `wake` (or outside a worker) nothing happens."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        get_train_context().controller_actor.wake.remote(final)
    except Exception:  # noqa: BLE001 - the poll at Ray's interval still comes
        pass
