"""The asyncio side of the engine: submit requests, receive their outputs as they are produced.

`EngineClient` is what the HTTP app talks to. It keeps, on the event loop, the request routes, the
exact in-flight count (the queue bound), cancellation and the engine's health; the `Engine` itself
steps elsewhere, and its outputs come back in one batch per step. Two places to step it:

  * `AsyncEngine`: a background thread of this process (tests, the benchmark's bare engine). The
    thread releases the GIL inside torch ops but needs it between them (about 200 times per
    decode step), so an event loop busy with per-chunk HTTP work slows the steps down.
  * `ProcessEngine` (engine_process.py): a child process, as vLLM's engine core; what a serving
    replica uses, so nothing the server does in Python competes with the steps for the GIL.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from abc import ABC, abstractmethod
from collections import deque

from mtnlg_ray.serve.engine import Engine, EngineDead, Output, QueueFull, check_request
from mtnlg_ray.serve.sampling import SamplingParams


class Group:
    """Outputs of requests submitted together (the choices of one HTTP request), in arrival order.

    `async for index, output in group` ends when every member has finished; `cancel()` aborts the
    members still running (call it in a `finally`, e.g. when the client disconnects).
    """

    def __init__(self, engine: "EngineClient", ids: list[str]):
        self.engine, self.ids = engine, ids
        self.index = {rid: i for i, rid in enumerate(ids)}
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.open = set(ids)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Output]:
        if not self.open:
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.finished:
            self.open.discard(out.request_id)
        return self.index[out.request_id], out

    async def next_batch(self) -> list[tuple[int, Output]]:
        """Wait for the next output, then take every output already queued (one network write)."""
        batch = [await self.__anext__()]
        while self.open and not self.queue.empty():
            batch.append(await self.__anext__())
        return batch

    def cancel(self) -> None:
        for rid in self.open:
            self.engine._abort(rid)
        self.open.clear()


class EngineClient(ABC):
    """Loop side of an engine stepping elsewhere. Subclasses start the stepper (`_start`), carry
    commands to it (`_post`), report whether it still runs (`_alive`) and its load (properties),
    and hand each step's outputs to `_deliver` on the loop, and its batch shape to `on_step`.

    If the stepper fails, every open request ends with finish_reason "error", new submissions raise
    `EngineDead`, and `check_health()` raises (Serve then replaces the replica).
    """

    max_slots: int
    max_waiting: int
    max_context: int
    vocab_size: int

    def __init__(self):
        self.in_flight = 0  # submitted, final output not yet delivered (loop side: exact)
        self.error: str | None = None
        self.on_step = None  # (prefills, decode batch size) after each step, on the loop or the stepper
        self._routes: dict[str, Group] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def capacity(self) -> int:
        """Requests the engine holds at most: running rows plus the waiting queue."""
        return self.max_slots + self.max_waiting

    num_running: int  # rows busy (as of the last step)
    num_waiting: int  # queued in the engine for a row
    free_rows: int

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> Group:
        """Queue all `requests` or none: ValueError (bad request), QueueFull, or EngineDead."""
        self.check_health()
        for prompt, _ in requests:
            check_request(prompt, self.vocab_size, self.max_context)
        if self.in_flight + len(requests) > self.capacity:
            raise QueueFull(f"{self.in_flight} requests in flight; capacity {self.capacity}")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._start()
        group = Group(self, [f"req-{next(self._ids)}" for _ in requests])
        for rid, (prompt, params) in zip(group.ids, requests):
            self._routes[rid] = group
            self._post(("add", rid, prompt, params))
        self.in_flight += len(requests)
        return group

    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDead(f"engine step loop died: {self.error}")
        if not self._alive():
            raise EngineDead("engine step loop is not running")

    def _abort(self, rid: str) -> None:  # loop side
        if self._routes.pop(rid, None) is not None:
            self.in_flight -= 1
            self._post(("abort", rid))

    def _deliver(self, outs: list[Output]) -> None:  # loop side
        for out in outs:
            group = self._routes.get(out.request_id)
            if group is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._routes[out.request_id]
                self.in_flight -= 1
            group.queue.put_nowait(out)

    def _fail_open(self, error: str, outs: list[Output] = ()) -> None:  # loop side: the stepper is gone
        """Deliver its last outputs, then end every request still open with finish_reason "error"."""
        self.error = self.error or error
        self._deliver(list(outs))
        self._deliver([Output(rid, None, finish_reason="error", error=self.error) for rid in list(self._routes)])

    @abstractmethod
    def _start(self) -> None:
        """Start the stepper (thread or child process)."""

    @abstractmethod
    def _post(self, cmd: tuple) -> None:
        """Send a command to the stepper (`apply` carries it out)."""

    @abstractmethod
    def _alive(self) -> bool:
        """Whether the stepper is still running."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the stepper and release the model."""


def apply(engine: Engine, cmd: tuple) -> Output | None:
    """Carry out one command on the stepper's side; an Output when an add had to be refused."""
    if cmd[0] == "abort":
        engine.abort(cmd[1])
        return None
    try:
        engine.add(cmd[2], cmd[3], request_id=cmd[1])
    except (ValueError, QueueFull) as err:  # checked at submit; kept safe anyway
        return Output(cmd[1], None, finish_reason="error", error=str(err))
    return None


class AsyncEngine(EngineClient):
    """An `Engine` stepped by a background thread of this process.

    The thread owns the Engine; the event loop appends commands to an inbox and receives each
    step's outputs through one `loop.call_soon_threadsafe`, so a slow forward never blocks it.
    """

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.max_slots, self.max_waiting = engine.max_slots, engine.max_waiting
        self.max_context, self.vocab_size = engine.max_context, engine.vocab_size
        engine.on_step = self._on_step
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    num_running = property(lambda self: self.engine.num_running)
    num_waiting = property(lambda self: self.engine.num_waiting)
    free_rows = property(lambda self: len(self.engine.free))

    def _on_step(self, prefills: int, decode_batch: int) -> None:  # step thread
        if self.on_step is not None:
            self.on_step(prefills, decode_batch)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-steps", daemon=True)
        self._thread.start()

    def _post(self, cmd: tuple) -> None:
        self._inbox.append(cmd)
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
                refused = [out for out in (apply(engine, self._inbox.popleft()) for _ in range(len(self._inbox)))
                           if out is not None]
                if refused:
                    self._to_loop(self._deliver, refused)
                if not engine.has_work:
                    if not self._inbox:
                        self._wake.wait(timeout=1.0)
                    continue
                outs = engine.step()
            except Exception as err:  # noqa: BLE001 - every request must hear about it
                self.error = f"{type(err).__name__}: {err}"
                self._to_loop(self._fail_open, self.error, engine.fail_all(self.error))
                return
            if outs:
                self._to_loop(self._deliver, outs)

    def _to_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed (its program ended): nobody is left to tell
            self._stopping = True
