"""Continuous batching over a fixed KV-cache pool. Token ids and tensors only: no HTTP, no Ray.

The pool is one `KVCache` of `max_slots` rows x `max_context` positions. Each running request
owns one row (slot). Every `step()`:
  1. admits waiting requests into free rows and prefills them, `model(prompts (n, T), kv_cache,
     rows=slots)`, one forward per prompt length (n choices of a prompt share one), whose last
     logits give each request's first token. With the prefix cache (prefix_cache.py, on unless
     `prefix_cache_blocks=0`) a row first receives the cached blocks of its prompt's longest known
     prefix and prefills only the rest; the prompt's new full blocks are stored after the prefill;
  2. decodes every request that was already running with ONE batched forward,
     `model(last_tokens (B, 1), kv_cache, rows=busy_slots)`, each row at its own length
     (new requests take the lowest free row, so a batch of rows 0..B-1 passes rows=None and
     attention reads cache views instead of gathered copies). With `speculative` (n-gram prompt
     lookup, model/speculative.py), rows whose prompt + output repeats an n-gram also carry up to
     k drafted tokens: one (B, 1 + k) forward verifies them, each row keeps its accepted drafts and
     one token of the model's own, and is cut back past the rest (serve/speculative.py);
  3. finished requests (stop token, stop string, max_tokens, context full) free their row at
     once (`cache.reset([slot])`), so the next step can admit a waiting request into it.
With `loras` (model/multi_lora.py) a request may name a loaded LoRA adapter: every forward first tells
the bank each row's adapter, so requests for different adapters and the base model share a batch.
Requests beyond the free rows wait in a FIFO queue of at most `max_waiting`; `add` refuses more
with `QueueFull`. `abort` frees a row immediately.

`Engine` is synchronous and single-threaded (tests and the terminal drive `step()` by hand; a serving
replica's engine process, engine_process.py, steps it in a loop). It trusts its requests: the engine
client (engine_client.py) validates them. The model's weights stay as they are while the engine has
running requests: as within one `generate` call, its forwards call the model's decode plan
(model/decode_layout.py) directly, and the plan's staleness check runs once when the engine starts
work after being idle, not before every forward (~100 us a step right after a step has streamed the
weights through the caches, 4-5% of a small model's decode step). It knows nothing of tokenizers: stop strings need a
`decode(ids) -> str` callable, structured outputs a `grammars` compiler (structured.py). Building
one changes nothing outside it: the LM head's decode layout (`model.generate.use_decode_layout`)
and the process's malloc settings (`malloc.py`) are the caller's steps.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtnlg_ray.config.serve import SpeculativeConfig
from mtnlg_ray.model.decode_layout import DecodePlan, current_plan
from mtnlg_ray.model.kv_cache import KVCache
from mtnlg_ray.model.multi_lora import LoraBank
from mtnlg_ray.model.speculative import NgramProposer, draft_batch
from mtnlg_ray.serve.prefix_cache import BLOCK, PrefixCache, block_hashes, default_blocks
from mtnlg_ray.serve.sampling import RequestSampler, SamplingParams, StopStrings, prompt_logprob_entries, sample_batch
from mtnlg_ray.serve.speculative import draftable, verify_rows


class QueueFull(Exception):
    """The pool and the waiting queue are full; retry later."""


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
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache (usage's cached_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepStats:
    """What one step did (the engine's `on_step` hook; the replica's /metrics counts it)."""

    prefills: int = 0  # requests admitted (prefilled)
    decode_batch: int = 0  # rows decoded together
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found (not computed)
    spec_draft_tokens: int = 0  # speculative tokens proposed and verified
    spec_accepted_tokens: int = 0  # of those, tokens accepted


@dataclass
class Request:
    """One sequence in the engine: a waiting or running request (its row: `slot`)."""

    id: str
    prompt: list[int]
    params: SamplingParams
    sampler: RequestSampler
    stops: StopStrings
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens the prefix cache supplied
    blocks: list[bytes] = field(default_factory=list)  # prefix-cache names of its full prompt blocks
    proposer: NgramProposer | None = None  # speculative decoding's n-gram index of prompt + output
    lora: str | None = None  # the LoRA adapter it runs with (a name in the engine's bank); None: the base model


class Engine:
    """Synchronous continuous-batching engine over `model` (a GPT in eval mode)."""

    def __init__(self, model, max_slots: int = 8, max_context: int | None = None, max_waiting: int = 64,
                 decode: Callable[[list[int]], str] | None = None,
                 on_step: Callable[[StepStats], None] | None = None, prefix_cache_blocks: int | None = None,
                 grammars=None, speculative: SpeculativeConfig | None = None, loras: LoraBank | None = None):
        """`prefix_cache_blocks`: KV blocks of 16 tokens the prefix cache keeps (None: half the rows' tokens,
        0: no prefix cache). `speculative`: n-gram speculative decoding (None: off). `loras`: the LoRA
        adapters requests may name, a bank over `model` (None: the base model only)."""
        cfg = model.config
        self.model = model.eval()
        self.vocab_size = cfg.vocab_size
        self.max_context = min(max_context or cfg.max_seq_len, cfg.max_seq_len)
        self.max_slots, self.max_waiting = max_slots, max_waiting
        self.device = next(model.parameters()).device
        self.cache = KVCache.for_model(model, max_slots, self.max_context)
        self.decode = decode
        self.grammars = grammars  # structured.GrammarCompiler over the tokenizer's vocabulary (structured outputs)
        self.on_step = on_step  # called with the step's StepStats after each step
        if prefix_cache_blocks is None:
            prefix_cache_blocks = default_blocks(max_slots, self.max_context)
        self.prefix = PrefixCache(self.cache, prefix_cache_blocks) if prefix_cache_blocks > 0 else None
        self.spec = speculative
        self.loras = loras
        self.free = list(range(max_slots))  # min-heap of free rows: busy rows stay packed at the bottom
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self._ids = itertools.count()
        self._plan: DecodePlan | None = None  # the decode plan this busy period's forwards run (None: model())

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

    def add(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
            lora: str | None = None) -> str:
        """Queue a request (a non-empty prompt, ids in the vocabulary, shorter than max_context; `lora`: an
        adapter loaded in the bank, kept loaded while the request runs); it is admitted at the next step
        that finds a free row."""
        if len(self.running) + len(self.waiting) >= self.capacity:
            raise QueueFull(f"{self.max_slots} rows busy and {self.max_waiting} requests waiting")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        sampler = RequestSampler(params, prompt, self.vocab_size, self.device, self.grammars)
        self.waiting.append(Request(rid, list(prompt), params, sampler, StopStrings(self.decode, params.stop),
                                    lora=lora))
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

    def uses_lora(self, name: str) -> bool:
        """Whether a waiting or running request runs with adapter `name` (it may not be unloaded)."""
        return any(r.lora == name for r in itertools.chain(self.waiting, self.running.values()))

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
        stats = StepStats()
        if not self.running:  # idle until now: the weights may have changed since the last request
            self._plan = current_plan(self.model) if getattr(self.model, "decode_plan", None) is not None else None
        decoding = [self.running[s] for s in sorted(self.running)]  # admitted in earlier steps, by row
        admitted = []
        while self.waiting and self.free:
            req = self.waiting.popleft()
            req.slot = heapq.heappop(self.free)
            self.running[req.slot] = req
            admitted.append(req)
            if self.prefix is not None:
                self._load_prefix(req, stats)
        stats.prefills = len(admitted)
        # Prompts of one length share a prefill forward (n choices of one prompt, templated prompts):
        # one (n, T) batch instead of n (1, T) ones, each row continuing its cached prefix (if any).
        batches: dict[tuple[int, bool], list[Request]] = {}
        for req in admitted:
            batches.setdefault((len(req.prompt) - req.cached, req.params.prompt_logprobs), []).append(req)
        for (_, want_all), reqs in batches.items():  # want_all: the LM head on every position (echo logprobs)
            ids = torch.tensor([r.prompt[r.cached:] for r in reqs], device=self.device)  # (n, T)
            logits = self._forward(ids, reqs, [r.slot for r in reqs], last_only=not want_all)
            logits = logits[:, :, : self.vocab_size]  # (n, T or 1, V)
            if self.prefix is not None:
                for r in reqs:
                    self.prefix.store(self.cache, r.slot, r.blocks)
            live = [i for i, r in enumerate(reqs) if r.params.max_tokens > 0]
            tokens, lps = sample_batch(logits[live, -1], [reqs[i].sampler for i in live]) if live else ([], [])
            sampled = dict(zip(live, zip(tokens, lps)))
            for i, req in enumerate(reqs):
                plp = prompt_logprob_entries(logits[i], req.prompt, req.params.logprobs or 0) if want_all else None
                if i in sampled:
                    out = self._accept(req, *sampled[i])
                else:  # max_tokens=0: prefill only (prompt logprobs)
                    self._release(req)
                    out = self._final(req, "length")
                out.prompt_logprobs = plp
                outs.append(out)
        drafts = self._drafts(decoding) if decoding and self.spec is not None else None
        if drafts is not None:
            outs += self._decode_speculative(decoding, drafts, stats)
        elif decoding:
            last = torch.tensor([[r.generated[-1]] for r in decoding], device=self.device)  # (B, 1)
            logits = self._forward(last, decoding, self._rows(decoding))[:, -1, : self.vocab_size]
            tokens, lps = sample_batch(logits, [r.sampler for r in decoding])  # logits (B, V)
            outs += [self._accept(r, t, lp) for r, t, lp in zip(decoding, tokens, lps)]
        stats.decode_batch = len(decoding)
        if self.on_step is not None:
            self.on_step(stats)
        return outs

    def _forward(self, ids: torch.Tensor, reqs: list[Request], rows, last_only: bool = False) -> torch.Tensor:
        """The model over `ids` (B, T), row i continuing `reqs[i]`'s cache row with its LoRA adapter."""
        if self.loras is not None:
            self.loras.set_rows([r.lora for r in reqs])
        if self._plan is not None:
            return self._plan(self.model, ids, self.cache, rows, last_only)
        return self.model(ids, kv_cache=self.cache, rows=rows, last_only=last_only)

    def _rows(self, reqs: list[Request]) -> torch.Tensor | None:
        """Cache rows of `reqs` (in row order); None for rows 0..B-1 exactly, where the cache hands
        attention views instead of gathered copies."""
        slots = [r.slot for r in reqs]
        return None if slots[-1] == len(slots) - 1 else torch.tensor(slots, device=self.device)

    def _drafts(self, decoding: list[Request]) -> list[list[int]] | None:
        """Each row's n-gram drafts, or None when this step decodes one token per row: no row has a
        draft, the batch is over disable_by_batch_size, or a row is held to a grammar."""
        limit = self.spec.disable_by_batch_size
        if (limit is not None and len(decoding) > limit) or not all(draftable(r.sampler) for r in decoding):
            return None
        drafts = []
        for r in decoding:
            if r.proposer is None:
                r.proposer = NgramProposer(r.prompt, self.spec)
            r.proposer.extend(r.generated[len(r.proposer.tokens) - len(r.prompt):])
            # one token of the model's own follows the drafts: max_tokens - 1 drafts at most
            drafts.append(r.proposer.propose(r.params.max_tokens - len(r.generated) - 1))
        return drafts if any(drafts) else None

    def _decode_speculative(self, decoding: list[Request], drafts: list[list[int]], stats: StepStats) -> list[Output]:
        """One forward over each row's last token and drafts, (B, T); keep what verification accepts,
        cut the rows back past the rejected drafts (model/speculative.py)."""
        lengths = [len(r.prompt) + len(r.generated) - 1 for r in decoding]  # cached tokens of each row
        ids, drafts = draft_batch([r.generated[-1] for r in decoding], drafts, self.max_context - 1 - max(lengths))
        logits = self._forward(torch.tensor(ids, device=self.device), decoding, self._rows(decoding))
        kept, entries = verify_rows(logits[:, :, : self.vocab_size], drafts, [r.sampler for r in decoding])
        kept_lengths = [n + len(k) for n, k in zip(lengths, kept)]
        if kept_lengths != [n + len(ids[0]) for n in lengths]:  # some row rejected a draft or was padded
            self.cache.truncate([r.slot for r in decoding], kept_lengths)
        outs = []
        for r, draft, tokens, lps in zip(decoding, drafts, kept, entries):
            stats.spec_draft_tokens += len(draft)
            stats.spec_accepted_tokens += len(tokens) - 1
            for token, lp in zip(tokens, lps):
                outs.append(self._accept(r, token, lp))
                if outs[-1].finished:  # a stop, max_tokens or the context: the rest is dropped
                    break
        return outs

    def _load_prefix(self, req: Request, stats: StepStats) -> None:
        """Start the request's row from the cached blocks of its prompt's longest known prefix."""
        req.blocks = block_hashes(req.prompt, salt=self.loras.identity[req.lora] if req.lora else b"")
        if req.params.prompt_logprobs:
            return  # prompt logprobs need the logits of every prompt position: nothing may be skipped
        hit = self.prefix.match(req.blocks, (len(req.prompt) - 1) // BLOCK)  # the last token is computed
        self.prefix.load(self.cache, req.slot, hit)
        req.cached = len(hit) * BLOCK
        stats.prefix_cache_queries += len(req.prompt)
        stats.prefix_cache_hits += req.cached

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
        return Output(req.id, token, text, logprob, finish, len(req.prompt), len(req.generated),
                      num_cached_tokens=req.cached)

    def _release(self, req: Request) -> None:
        if req.slot is not None:
            del self.running[req.slot]
            self.cache.reset([req.slot])
            heapq.heappush(self.free, req.slot)
            req.slot = None

    def _final(self, req: Request, reason: str, error: str | None = None) -> Output:
        return Output(req.id, None, req.stops.flush() if reason == "length" else "", None, reason,
                      len(req.prompt), len(req.generated), error=error, num_cached_tokens=req.cached)
