"""Continuous batching over a fixed KV-cache pool. Token ids and tensors only: no HTTP, no Ray.

The pool is one `KVCache` of `max_slots` rows x `max_context` positions. Each running request
owns one row (slot). Every `step()`:
  1. admits waiting requests into free rows: one prefill `model(prompt, kv_cache, rows=[slot])`
     each, whose last logits give the request's first token;
  2. decodes every request that was already running with ONE batched forward,
     `model(last_tokens (B, 1), kv_cache, rows=busy_slots)`, each row at its own length
     (new requests take the lowest free row, so a batch of rows 0..B-1 passes rows=None and
     attention reads cache views instead of gathered copies);
  3. finished requests (stop token, stop string, max_tokens, context full) free their row at
     once (`cache.reset([slot])`), so the next step can admit a waiting request into it.
Requests beyond the free rows wait in a FIFO queue of at most `max_waiting`; `add` refuses more
with `QueueFull`. `abort` frees a row immediately.

`Engine` is synchronous and single-threaded (tests drive `step()` by hand). `AsyncEngine` runs the
step loop in a background thread and hands outputs to asyncio consumers as they are produced.
The engine knows nothing of tokenizers: stop strings need a `decode(ids) -> str` callable.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtnlg_ray.model.generate import use_decode_layout
from mtnlg_ray.model.kv_cache import KVCache
from mtnlg_ray.serve.sampling import RequestSampler, SamplingParams, StopStrings, prompt_logprob_entries, sample_batch


class QueueFull(Exception):
    """The pool and the waiting queue are full; retry later."""


class EngineDead(Exception):
    """The step loop has stopped after an error; this engine serves nothing more."""


@dataclass
class Output:
    """What a request produced in one step (or how it ended).

    token_id is None on a final output without a new token (abort, error, max_tokens=0).
    text is the newly decoded text (held back while it might still become a stop string).
    logprob entry: (chosen token logprob, [(token id, logprob), ...top-N]) when asked.
    """

    request_id: str
    token_id: int | None
    text: str = ""
    logprob: tuple[float, list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_generated: int = 0
    prompt_logprobs: list | None = None  # first output only, when params.prompt_logprobs
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    sampler: RequestSampler
    stops: StopStrings
    slot: int | None = None
    generated: list[int] = field(default_factory=list)


class Engine:
    """Synchronous continuous-batching engine over `model` (a GPT in eval mode)."""

    def __init__(self, model, max_slots: int = 8, max_context: int | None = None, max_waiting: int = 64,
                 decode: Callable[[list[int]], str] | None = None,
                 on_step: Callable[[int, int], None] | None = None):
        cfg = model.config
        self.model = model.eval()
        use_decode_layout(model)  # the LM head's fast layout for decode steps
        self.vocab_size = cfg.vocab_size
        self.max_context = min(max_context or cfg.max_seq_len, cfg.max_seq_len)
        self.max_slots, self.max_waiting = max_slots, max_waiting
        self.device = next(model.parameters()).device
        self.cache = KVCache.for_model(model, max_slots, self.max_context)
        self.decode = decode
        self.on_step = on_step  # called with (prefills, decode batch size) after each step
        self.free = list(range(max_slots))  # min-heap of free rows: busy rows stay packed at the bottom
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self._ids = itertools.count()

    @property
    def capacity(self) -> int:
        """Requests the engine holds at most: running rows plus the waiting queue."""
        return self.max_slots + self.max_waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError (stating the numbers) if this request can never run."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) >= self.max_context:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context is {self.max_context} tokens "
                             f"(at most {self.max_context - 1} leave room to generate)")

    def add(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; it is admitted at the next step that finds a free row."""
        self.check(prompt, params)
        if len(self.running) + len(self.waiting) >= self.capacity:
            raise QueueFull(f"{self.max_slots} rows busy and {self.max_waiting} requests waiting")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        sampler = RequestSampler(params, prompt, self.vocab_size, self.device)
        self.waiting.append(Request(rid, list(prompt), params, sampler, StopStrings(self.decode, params.stop)))
        return rid

    def abort(self, request_id: str) -> Output | None:
        """Drop a request now (its row is free on return); None if it is not here (already done)."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                return self._final(req, "abort")
        for slot, req in self.running.items():
            if req.id == request_id:
                self._release(req)
                return self._final(req, "abort")
        return None

    def fail_all(self, error: str) -> list[Output]:
        """End every request with finish_reason "error" (the step loop cannot go on)."""
        reqs = list(self.waiting) + list(self.running.values())
        self.waiting.clear()
        for req in list(self.running.values()):
            self._release(req)
        return [self._final(r, "error", error) for r in reqs]

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Admit into free rows (prefill), decode the running rows together; outputs of this step."""
        outs: list[Output] = []
        decoding = [self.running[s] for s in sorted(self.running)]  # admitted in earlier steps, by row
        prefills = 0
        while self.waiting and self.free:
            req = self.waiting.popleft()
            req.slot = heapq.heappop(self.free)
            self.running[req.slot] = req
            prefills += 1
            ids = torch.tensor([req.prompt], device=self.device)
            want_all = req.params.prompt_logprobs  # else the LM head runs on the last position only
            logits = self.model(ids, kv_cache=self.cache, rows=[req.slot], last_only=not want_all)
            logits = logits[0, :, : self.vocab_size]  # (T or 1, V)
            plp = prompt_logprob_entries(logits, req.prompt, req.params.logprobs or 0) if want_all else None
            if req.params.max_tokens == 0:
                self._release(req)
                out = self._final(req, "length")
            else:
                tokens, lps = sample_batch(logits[-1:], [req.sampler])
                out = self._accept(req, tokens[0], lps[0])
            out.prompt_logprobs = plp
            outs.append(out)
        if decoding:
            last = torch.tensor([[r.generated[-1]] for r in decoding], device=self.device)  # (B, 1)
            slots = [r.slot for r in decoding]
            # Rows 0..B-1 exactly: rows=None lets the cache hand out views instead of gathering copies.
            rows = None if slots[-1] == len(slots) - 1 else torch.tensor(slots, device=self.device)
            logits = self.model(last, kv_cache=self.cache, rows=rows)[:, -1, : self.vocab_size]  # (B, V)
            tokens, lps = sample_batch(logits, [r.sampler for r in decoding])
            outs += [self._accept(r, t, lp) for r, t, lp in zip(decoding, tokens, lps)]
        if self.on_step is not None:
            self.on_step(prefills, len(decoding))
        return outs

    def _accept(self, req: Request, token: int, logprob) -> Output:
        """Record a sampled token; finish the request (freeing its row) when it is done."""
        req.generated.append(token)
        if token in req.params.stop_token_ids:
            text, finish = req.stops.flush(), "stop"
        else:
            text, hit = req.stops.push(token)
            finish = "stop" if hit else None
        if finish is None and (len(req.generated) >= req.params.max_tokens
                               or len(req.prompt) + len(req.generated) >= self.max_context):
            finish = "length"  # no room for another token in this row, or max_tokens reached
            text += req.stops.flush()
        if finish is not None:
            self._release(req)
        return Output(req.id, token, text, logprob, finish, len(req.prompt), len(req.generated))

    def _release(self, req: Request) -> None:
        if req.slot is not None:
            del self.running[req.slot]
            self.cache.reset([req.slot])
            heapq.heappush(self.free, req.slot)
            req.slot = None

    def _final(self, req: Request, reason: str, error: str | None = None) -> Output:
        return Output(req.id, None, req.stops.flush() if reason == "length" else "", None, reason,
                      len(req.prompt), len(req.generated), error=error)


class Group:
    """Outputs of requests submitted together (the choices of one HTTP request), in arrival order.

    `async for index, output in group` ends when every member has finished; `cancel()` aborts the
    members still running (call it in a `finally`, e.g. when the client disconnects).
    """

    def __init__(self, engine: "AsyncEngine", ids: list[str]):
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


class AsyncEngine:
    """An `Engine` stepped by a background thread, for asyncio servers.

    The thread owns the Engine; the event loop only appends commands to an inbox and receives
    outputs through `loop.call_soon_threadsafe`, so a slow forward never blocks the server, and
    the queue bound is exact on the loop side (`in_flight` counts until the final output arrives).
    If a step raises, every request ends with finish_reason "error", new submissions raise
    `EngineDead`, and `check_health()` raises (Serve then replaces the replica).
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.in_flight = 0
        self.error: str | None = None
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._routes: dict[str, Group] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> Group:
        """Queue all `requests` or none: ValueError (bad request), QueueFull, or EngineDead."""
        self.check_health()
        for prompt, params in requests:
            self.engine.check(prompt, params)
        if self.in_flight + len(requests) > self.engine.capacity:
            raise QueueFull(f"{self.in_flight} requests in flight; capacity {self.engine.capacity}")
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="engine-steps", daemon=True)
            self._thread.start()
        group = Group(self, [f"req-{next(self._ids)}" for _ in requests])
        for rid, (prompt, params) in zip(group.ids, requests):
            self._routes[rid] = group
            self._inbox.append(("add", rid, prompt, params))
        self.in_flight += len(requests)
        self._wake.set()
        return group

    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDead(f"engine step loop died: {self.error}")
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            raise EngineDead("engine step loop is not running")

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _abort(self, rid: str) -> None:  # loop side
        if self._routes.pop(rid, None) is not None:
            self.in_flight -= 1
            self._inbox.append(("abort", rid))
            self._wake.set()

    def _deliver(self, outs: list[Output]) -> None:  # loop side
        for out in outs:
            group = self._routes.get(out.request_id)
            if group is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._routes[out.request_id]
                self.in_flight -= 1
            group.queue.put_nowait(out)

    def _run(self) -> None:  # the step thread
        engine = self.engine
        while not self._stopping:
            self._wake.clear()
            try:
                refused = []
                while self._inbox:
                    cmd = self._inbox.popleft()
                    if cmd[0] == "abort":
                        engine.abort(cmd[1])
                        continue
                    try:
                        engine.add(cmd[2], cmd[3], request_id=cmd[1])
                    except (ValueError, QueueFull) as err:  # checked at submit; kept safe anyway
                        refused.append(Output(cmd[1], None, finish_reason="error", error=str(err)))
                if refused:
                    self._loop.call_soon_threadsafe(self._deliver, refused)
                if not engine.has_work:
                    self._wake.wait(timeout=1.0)
                    continue
                outs = engine.step()
            except Exception as err:  # noqa: BLE001 - every request must hear about it
                self.error = f"{type(err).__name__}: {err}"
                outs = engine.fail_all(self.error)
                outs += [Output(c[1], None, finish_reason="error", error=self.error)
                         for c in self._inbox if c[0] == "add"]
                self._inbox.clear()
                self._loop.call_soon_threadsafe(self._deliver, outs)
                return
            if outs:
                self._loop.call_soon_threadsafe(self._deliver, outs)
