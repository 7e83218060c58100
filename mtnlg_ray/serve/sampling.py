"""Per-request sampling: penalties, temperature / top-k / top-p, seeded draws, logprobs, stop strings.

Token ids and tensors only, like the engine. Every request owns a `RequestSampler` holding its
own `torch.Generator`, so a seeded request draws the same tokens whatever else shares the batch:
its row of logits is the same, and no other request consumes its random numbers.

Order of operations on one row of logits (V real tokens), as in vLLM:
    grammar mask (structured outputs) -> logit_bias -> repetition penalty (prompt + output tokens)
    -> presence / frequency penalties (output tokens) -> temperature 0: argmax | else / temperature
    -> top-k -> top-p -> draw.
Logprobs are taken from the raw model distribution (log_softmax of the unmodified logits).
A request with `structured` set samples only what its grammar (structured.py) allows next, and its
grammar state advances with every token it keeps: constraints are per row, so constrained and free
requests share a batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtnlg_ray.model.generate import argmax_rows, filter_logits
from mtnlg_ray.serve.structured import GrammarCompiler, GrammarSpec, mask_rows

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as in vLLM)


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler (validated here, so the engine is safe without HTTP)."""

    max_tokens: int = 16  # generated tokens at most; 0 = prefill only (prompt logprobs)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None or <= 0: no top-k
    top_p: float = 1.0  # nucleus mass in (0, 1]
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL-style: divide positive / multiply negative logits of seen tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # None: a random seed per request
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text (excluded from the output)
    stop_token_ids: tuple[int, ...] = ()  # stop tokens (counted in usage, excluded from the text)
    logprobs: int | None = None  # None: none; N >= 0: the chosen token's logprob and the top N
    prompt_logprobs: bool = False  # also logprobs of the prompt tokens (for echo)
    structured: GrammarSpec | None = None  # the output's grammar (JSON schema, regex, choice); None: free

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 0, f"max_tokens must be >= 0 (got {self.max_tokens})"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0 (got {self.logprobs})"),
            (all(self.stop), "stop strings must not be empty"),
            (self.structured is None or bool(self.stop_token_ids), "a structured output needs a stop token"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW  # dividing by a tinier temperature overflows to inf

    @property
    def penalized(self) -> bool:
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or bool(
            self.presence_penalty or self.frequency_penalty)


class RequestSampler:
    """Sampling state of one request: its generator and the counts its penalties need."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device,
                 grammars: GrammarCompiler | None = None):
        self.params = params
        self.constraint = None  # structured.Constraint: the grammar state of a structured output
        if params.structured is not None:
            if grammars is None:
                raise ValueError("structured outputs need an engine with a grammar compiler (Engine(grammars=...))")
            self.constraint = grammars.constraint(params.structured, params.stop_token_ids)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.counts = None  # (V,) occurrences in the generated tokens
        self.seen = None  # (V,) bool, in the prompt or the generated tokens
        if params.penalized:
            self.counts = torch.zeros(vocab_size, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt, device=device)] = True
            ids = [i for i in params.logit_bias if 0 <= i < vocab_size]
            self.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
            self.bias = torch.tensor([params.logit_bias[i] for i in ids], device=device)

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply logit_bias and the penalties to one row (V,) of float logits (returns a new row)."""
        p = self.params
        logits = logits.clone()
        if len(self.bias_ids):
            logits[self.bias_ids] += self.bias
        if p.repetition_penalty != 1.0:
            rp = torch.where(logits > 0, 1.0 / p.repetition_penalty, p.repetition_penalty)
            logits = torch.where(self.seen, logits * rp, logits)
        logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0)
        return logits

    def probs(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The distribution (V,) a sampled draw takes from a penalized row (V,) at temperature > 0
        (temperature, top-k, top-p); None when no logit is finite (a draw then takes the argmax)."""
        p = self.params
        top_k = p.top_k if p.top_k and p.top_k > 0 else None
        # Extreme penalties can overflow a logit to inf (inf - inf = NaN in softmax): clamp to finite.
        scaled = torch.nan_to_num(logits / p.temperature, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
        if not bool(torch.isfinite(scaled).any()):
            return None
        return filter_logits(scaled[None], top_k, p.top_p).softmax(-1)[0]

    def draw(self, logits: torch.Tensor) -> int:
        """One token id from a penalized row (V,): argmax at temperature 0, else a seeded draw."""
        probs = None if self.params.greedy else self.probs(logits)
        if probs is None:
            return int(argmax_rows(logits))
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def observe(self, token: int) -> None:
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, logprob) of one row (V,) of log-probabilities."""
    if n <= 0:
        return []
    vals, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]))
    return list(zip(ids.tolist(), vals.tolist()))


def sample_batch(logits: torch.Tensor, samplers: list[RequestSampler]):
    """Next token of each row. logits (B, V) real-vocabulary columns, one sampler per row.

    Returns (tokens [B], logprob entries [B]) where an entry is None or (chosen logprob, top list).
    Constrained rows are masked first (one bitmask per row); greedy rows without penalties are one
    batched argmax; the others go row by row with their own generator (a row's draw must not depend
    on the others).
    """
    logits = scores = logits.float()
    constrained = [i for i, s in enumerate(samplers) if s.constraint is not None]
    if constrained:
        scores = logits.clone()  # `logits` stays the model's, for logprobs
        mask_rows(scores, constrained, [samplers[i].constraint for i in constrained])
    tokens = argmax_rows(scores).tolist()
    for i, s in enumerate(samplers):
        if s.params.penalized or not s.params.greedy:
            row = s.penalize(scores[i]) if s.params.penalized else scores[i]
            tokens[i] = s.draw(row)
        s.observe(tokens[i])
    entries: list = [None] * len(samplers)
    want = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    if want:
        lp = logits[want].log_softmax(-1)  # raw model distribution
        for j, i in enumerate(want):
            entries[i] = (float(lp[j, tokens[i]]), top_logprobs(lp[j], samplers[i].params.logprobs))
    return tokens, entries


def prompt_logprob_entries(logits: torch.Tensor, prompt: list[int], n: int) -> list:
    """Logprob entries of prompt tokens from prefill logits (T, V): None for the first token."""
    lp = logits[:-1].float().log_softmax(-1)  # row t predicts prompt[t + 1]
    chosen = lp.gather(-1, torch.tensor(prompt[1:], device=lp.device)[:, None])[:, 0].tolist()
    return [None] + [(chosen[t], top_logprobs(lp[t], n)) for t in range(len(prompt) - 1)]


class StopStrings:
    """Incremental detokenization that holds back text which may still become a stop string.

    `decode` maps token ids to text (the tokenizer's). Each new token decodes only a short window
    (as vLLM and TGI do): ids[prefix:read] were decoded before, so the new text is what
    decode(ids[prefix:]) adds to decode(ids[prefix:read]); both start at the same token, so a
    tokenizer's context-dependent spacing cancels out. Decoding the whole output for every token
    instead costs O(n) per token (16 us at 128 tokens, 105 us at 1,000 with our SentencePiece
    models: 1.7 ms per step for a batch of 16 long generations). While the window ends in a
    partial UTF-8 character (U+FFFD from an incomplete byte sequence) nothing is added until the
    next token completes it. A stop string can span token boundaries: the text is searched from
    just before the last emitted character, so "foo" + "bar" matches stop "ob". Text that is a
    prefix of a stop string is not emitted until the next token settles it.
    """

    def __init__(self, decode: Callable[[list[int]], str] | None, stop: tuple[str, ...]):
        self.decode = decode
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already returned
        self.prefix = self.read = 0  # ids[prefix:read]: the window's already-counted start

    def push(self, token: int) -> tuple[str, bool]:
        """Add a generated token; return (newly safe text, True if a stop string was reached)."""
        if self.decode is None:
            return "", False
        self.ids.append(token)
        self.text += self._window_text(complete_only=True)
        if self.stop:
            start = max(0, self.emitted - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._take(len(self.text)), True
        safe = len(self.text)
        hold = 0  # longest unemitted suffix that starts some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, safe - self.emitted), hold, -1):
                if self.text[safe - k: safe] == s[:k]:
                    hold = k
                    break
        return self._take(safe - hold), False

    def _window_text(self, complete_only: bool) -> str:
        """Text the ids after `read` add; advances the window when there is some."""
        before = self.decode(self.ids[self.prefix: self.read])
        window = self.decode(self.ids[self.prefix:])
        if len(window) <= len(before) or (complete_only and window.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return window[len(before):]

    def flush(self) -> str:
        """All text not yet returned (the request is over), an unfinished UTF-8 character included."""
        if self.decode is not None and self.read < len(self.ids):
            self.text += self._window_text(complete_only=False)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted: end], end
        return delta
