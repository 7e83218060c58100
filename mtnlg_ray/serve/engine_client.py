"""The asyncio side of an engine that steps elsewhere: submit requests, receive their outputs as they come.

`EngineClient` is what the HTTP app talks to. It is the one place a request is validated
(`validate`: the prompt against the vocabulary and the context, token ids in sampling fields); the
engine behind it trusts what it receives. On the event loop it keeps the request routes, the exact
in-flight count (the queue bound), cancellation and the engine's health; the `Engine` itself steps
elsewhere and its outputs come back in one batch per step. A serving replica's engine steps in a
child process (`ProcessEngine`, engine_process.py, as vLLM's engine core), so nothing the server
does in Python competes with the steps for the GIL.
"""

from __future__ import annotations

import asyncio
import itertools
from abc import ABC, abstractmethod
from collections import Counter
from typing import Callable, Iterable

from mtnlg_ray.serve.engine import Output, QueueFull, StepStats
from mtnlg_ray.serve.sampling import SamplingParams


class EngineDead(Exception):
    """The engine's step loop has stopped; this engine serves nothing more."""


class InvalidRequest(ValueError):
    """A request this engine can never run. `field`: "prompt", "stop_token_ids" or "logit_bias";
    `too_long`: the prompt leaves no room in the context to generate."""

    def __init__(self, field: str, message: str, too_long: bool = False):
        super().__init__(message)
        self.field, self.too_long = field, too_long


def outside_vocabulary(ids: Iterable[int], vocab_size: int) -> str | None:
    """The error message for the first token id outside [0, vocab_size), or None if all are inside."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    return None if bad is None else f"token id {bad} is outside the vocabulary [0, {vocab_size})"


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
    requests to it (`_add`, `_cancel`), report whether it still runs (`_alive`) and its load
    (properties), and hand each step's outputs to `_deliver` on the loop, its StepStats to `on_step`.

    If the stepper stops, `_fail_open` ends every open request with finish_reason "error" and the
    same `error`, new submissions raise `EngineDead(error)`, `check_health()` raises it, and
    `on_dead(error)` is called once (on the loop).
    """

    max_slots: int
    max_waiting: int
    max_context: int  # tokens per row
    vocab_size: int
    num_running: int  # rows busy (as of the last step)
    num_waiting: int  # queued in the engine for a row
    free_rows: int

    def __init__(self):
        self.in_flight = 0  # submitted, final output not yet delivered (loop side: exact)
        self.error: str | None = None  # why the stepper stopped; no process ids (it reaches clients)
        self.on_step: Callable[[StepStats], None] | None = None  # what each step did (prefills, batch, caches)
        self.on_dead: Callable[[str], None] | None = None  # the stepper stopped (on the loop, once)
        self._routes: dict[str, Group] = {}
        self._lora_of: dict[str, str] = {}  # request id -> its LoRA adapter (requests that name one)
        self.lora_in_flight: Counter[str] = Counter()  # adapter -> its requests in flight (loop side: exact)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def capacity(self) -> int:
        """Requests the engine holds at most: running rows plus the waiting queue."""
        return self.max_slots + self.max_waiting

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest (stating the numbers) if this request can never run on this engine."""
        if not prompt:
            raise InvalidRequest("prompt", "the prompt has no tokens")
        for field, ids in (("prompt", prompt), ("stop_token_ids", params.stop_token_ids),
                           ("logit_bias", params.logit_bias)):
            if (message := outside_vocabulary(ids, self.vocab_size)) is not None:
                raise InvalidRequest(field, message)
        C = self.max_context
        if len(prompt) >= C:
            raise InvalidRequest("prompt", f"This model's maximum context length is {C} tokens, but the prompt "
                                 f"has {len(prompt)} tokens (at most {C - 1} leave room to generate)", too_long=True)

    def submit(self, requests: list[tuple[list[int], SamplingParams]], lora: str | None = None) -> Group:
        """Validate every request, then queue all or none: InvalidRequest, QueueFull or EngineDead. `lora`: the
        loaded LoRA adapter they run with (None: the base model)."""
        for prompt, params in requests:
            self.validate(prompt, params)
        self.check_health()
        if self.in_flight + len(requests) > self.capacity:
            raise QueueFull(f"{self.in_flight} requests in flight; capacity {self.capacity}")
        self._ensure_started()
        group = Group(self, [f"req-{next(self._ids)}" for _ in requests])
        for rid, (prompt, params) in zip(group.ids, requests):
            self._routes[rid] = group
            if lora is not None:
                self._lora_of[rid] = lora
                self.lora_in_flight[lora] += 1
            self._add(rid, prompt, params, lora)
        self.in_flight += len(requests)
        return group

    def _ensure_started(self) -> None:
        """At the first use on the loop: start the stepper (its outputs come back on this loop)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._start()

    def _done(self, rid: str) -> None:  # loop side: a request's final output was delivered or it was aborted
        self.in_flight -= 1
        lora = self._lora_of.pop(rid, None)
        if lora is not None:
            self.lora_in_flight[lora] -= 1
            if not self.lora_in_flight[lora]:
                del self.lora_in_flight[lora]

    def check_health(self) -> None:
        """Raise EngineDead once the stepper has stopped; the first check to see it stopped (before its
        transport said so) ends the open requests (`_fail_open`). On the loop."""
        if self.error is None and not self._alive():
            self._fail_open(self._stop_reason())
        if self.error is not None:
            raise EngineDead(self.error)

    def _abort(self, rid: str) -> None:  # loop side
        if self._routes.pop(rid, None) is not None:
            self._done(rid)
            self._cancel(rid)

    def _deliver(self, outs: list[Output]) -> None:  # loop side
        for out in outs:
            group = self._routes.get(out.request_id)
            if group is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._routes[out.request_id]
                self._done(out.request_id)
            group.queue.put_nowait(out)

    def _fail_open(self, error: str, outs: list[Output] = ()) -> None:  # loop side: the stepper is gone
        """Deliver its last outputs, then end every request still open with finish_reason "error"."""
        first = self.error is None
        self.error = self.error or error
        self._deliver(list(outs))
        self._deliver([Output(rid, None, finish_reason="error", error=self.error) for rid in list(self._routes)])
        if first and self.on_dead is not None:
            self.on_dead(self.error)

    @abstractmethod
    def _start(self) -> None:
        """Start the stepper (at the first submit: outputs come back on the running loop)."""

    @abstractmethod
    def _add(self, rid: str, prompt: list[int], params: SamplingParams, lora: str | None = None) -> None:
        """Hand a validated request to the stepper (`lora`: its adapter, loaded there)."""

    @abstractmethod
    def _cancel(self, rid: str) -> None:
        """Tell the stepper to drop a request."""

    @abstractmethod
    def _alive(self) -> bool:
        """Whether the stepper is still running."""

    def _stop_reason(self) -> str:
        """Why the stepper is not running (for clients: no process ids)."""
        return "the engine is not running"

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the stepper and release the model."""
