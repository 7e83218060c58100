"""`ThreadEngine`: an `Engine` stepped by a background thread of this process, behind the `EngineClient`
interface the server uses: the client side without a child process (its tests), and the serving
benchmark's bare engine (benchmarks/serve.py), which the HTTP path is measured against.

The thread owns the Engine; the event loop appends requests to an inbox and receives each step's
outputs through one `loop.call_soon_threadsafe`, so a slow forward never blocks it. The thread
releases the GIL inside torch ops but needs it between them (about 200 times per decode step), so
an event loop busy with per-chunk HTTP work slows the steps down: the server steps its engine in a
child process instead (mtnlg_ray/serve/engine_process.py).
"""

from __future__ import annotations

import threading
from collections import deque

from mtnlg_ray.serve.engine import Engine, StepStats
from mtnlg_ray.serve.engine_client import EngineClient
from mtnlg_ray.serve.messages import Abort, Add
from mtnlg_ray.serve.sampling import SamplingParams


class ThreadEngine(EngineClient):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.max_slots, self.max_waiting = engine.max_slots, engine.max_waiting
        self.max_context, self.vocab_size = engine.max_context, engine.vocab_size
        engine.on_step = self._on_step
        self._inbox: deque[Add | Abort] = deque()  # applied in order by the step thread
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    num_running = property(lambda self: self.engine.num_running)
    num_waiting = property(lambda self: self.engine.num_waiting)
    free_rows = property(lambda self: len(self.engine.free))

    def _on_step(self, stats: StepStats) -> None:  # step thread
        if self.on_step is not None:
            self.on_step(stats)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-steps", daemon=True)
        self._thread.start()

    def _add(self, rid: str, prompt: list[int], params: SamplingParams, lora: str | None = None) -> None:
        self._inbox.append(Add(rid, prompt, params, lora))
        self._wake.set()

    def _cancel(self, rid: str) -> None:
        self._inbox.append(Abort(rid))
        self._wake.set()

    def _alive(self) -> bool:  # not started yet, stopped on purpose, or running
        return self._thread is None or self._stopping or self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:  # the step thread
        engine = self.engine
        while not self._stopping:
            self._wake.clear()
            try:
                while self._inbox:
                    msg = self._inbox.popleft()
                    if isinstance(msg, Add):
                        engine.add(msg.prompt, msg.params, request_id=msg.request_id, lora=msg.lora)
                    else:
                        engine.abort(msg.request_id)
                if not engine.has_work:
                    if not self._inbox:
                        self._wake.wait(timeout=1.0)
                    continue
                outs = engine.step()
            except Exception as err:  # noqa: BLE001 - every request must hear about it
                error = f"the engine step failed: {type(err).__name__}: {err}"
                self._to_loop(self._fail_open, error, engine.fail_all(error))
                return
            if outs:
                self._to_loop(self._deliver, outs)

    def _to_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed (its program ended): nobody is left to tell
            self._stopping = True
