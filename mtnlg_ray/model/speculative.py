"""Speculative decoding by n-gram prompt lookup: no draft model, the sequence drafts itself.

Each step, a sequence whose last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
occurred earlier in its prompt + output proposes the k tokens that followed that earlier occurrence
(the earliest one, as vLLM's NgramProposer). The model then scores the last token and the k drafts
in ONE forward over k + 1 positions of the sequence's KV-cache row, which on a memory-bound decode
step costs little more than one token. What is kept:

  greedy   the longest prefix of drafts equal to the model's argmax at each position, plus the
           model's own token after it: exactly the tokens plain greedy decoding gives;
  sampled  speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a point-mass draft:
           accept draft x with probability p(x); on rejection draw from p with x removed,
           renormalised, and stop; after k accepted drafts draw one more token from p. Every kept
           token is distributed as p given the tokens before it, so the output distribution is the
           model's own.

The row's KV entries of rejected drafts are dropped by cutting its length back (`KVCache.truncate`).
One step emits between 1 and k + 1 tokens. `generate` (model/generate.py) and the serving engine
(serve/engine.py, serve/speculative.py) share the proposer and the acceptance rules here.
"""

from __future__ import annotations

import torch

from mtnlg_ray.config.serve import SpeculativeConfig
from mtnlg_ray.model.generate import argmax_rows, cached_forward, filter_logits
from mtnlg_ray.model.kv_cache import KVCache


class NgramProposer:
    """Prompt lookup over one growing sequence; `propose` costs one dict lookup per n-gram length.

    `follows[ngram]` is where the token after that n-gram's first occurrence sits; an n-gram is
    entered once a token follows it, so the sequence's own suffix never matches itself.
    """

    def __init__(self, tokens: list[int], spec: SpeculativeConfig):
        self.k, self.n_min, self.n_max = spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        seq = self.tokens
        for t in tokens:
            seq.append(t)
            end = len(seq) - 1  # the new token follows the n-grams ending just before it
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self.follows.setdefault(tuple(seq[end - n:end]), end)

    def propose(self, limit: int) -> list[int]:
        """At most min(k, limit) draft tokens: what followed the longest matching n-gram; [] if none."""
        seq, limit = self.tokens, min(self.k, limit)
        if limit <= 0:
            return []
        for n in range(min(self.n_max, len(seq)), self.n_min - 1, -1):
            at = self.follows.get(tuple(seq[len(seq) - n:]))
            if at is not None:
                return seq[at:at + limit]
        return []


def accepted_prefix(draft: list[int], targets: list[int]) -> int:
    """How many drafts agree with the model's greedy tokens `targets` (len(draft) + 1 of them)."""
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return n


def accept_or_resample(probs: torch.Tensor, draft: int, generator: torch.Generator | None) -> int:
    """One speculative-sampling decision for a point-mass draft: `draft` with probability p(draft), else
    a token drawn from p with `draft` removed (renormalised). probs (V,): the model's distribution."""
    u = torch.rand(1, generator=generator, device=probs.device)
    if u < probs[draft]:
        return draft
    residual = probs.clone()
    residual[draft] = 0
    if not bool(residual.sum() > 0):  # p was all on the draft (then u < p(draft) up to rounding)
        return draft
    return int(torch.multinomial(residual, 1, generator=generator))


def verify(logits: torch.Tensor, draft: list[int], temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Tokens kept from one row: logits (len(draft) + 1, V) at the last token and each draft. Sampling
    as `generate.sample_next` (temperature, top-k, top-p, no penalties); temperature 0 is greedy."""
    if temperature <= 0:
        targets = argmax_rows(logits).tolist()
        n = accepted_prefix(draft, targets)
        return draft[:n] + [targets[n]]
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)  # (len(draft) + 1, V)
    kept = []
    for t, x in enumerate(draft):
        kept.append(accept_or_resample(probs[t], x, generator))
        if kept[-1] != x:
            return kept
    return kept + [int(torch.multinomial(probs[-1], 1, generator=generator))]


def draft_batch(last: list[int], drafts: list[list[int]], room: int) -> tuple[list[list[int]], list[list[int]]]:
    """One (B, T) verification batch: each row's last token and its drafts, padded to a common T.

    `room`: positions every row can still write past its last token (T - 1 <= room, so a padded row
    stays inside its KV-cache row). Returns (ids (B, T), the drafts cut to T - 1). Padding repeats the
    row's last token; it is computed and discarded like a rejected draft.
    """
    width = min(max(map(len, drafts)), room)
    drafts = [d[:width] for d in drafts]
    ids = [[t] + d + [t] * (width - len(d)) for t, d in zip(last, drafts)]
    return ids, drafts


@torch.no_grad()
def speculative_decode(model, cache: KVCache, out: list[list[int]], prompts: list[list[int]], max_new_tokens: int,
                       spec: SpeculativeConfig, eos_id: int | None = None, **sampling) -> None:
    """Continue `out` (each row holds its first token, sampled from the prefill) in place, speculatively,
    until every row has max_new_tokens tokens or ended at eos. `sampling`: verify's keywords."""
    proposers = [NgramProposer(p + o, spec) for p, o in zip(prompts, out)]
    V = model.config.vocab_size
    forward = cached_forward(model, cache)
    active = [i for i in range(len(out)) if len(out[i]) < max_new_tokens and out[i][-1] != eos_id]
    while active:
        lengths = [len(prompts[i]) + len(out[i]) - 1 for i in active]  # cached tokens of each row
        # at most max_new - len(out) tokens per row: 1 of the model's own and the rest drafts
        drafts = [proposers[i].propose(max_new_tokens - len(out[i]) - 1) for i in active]
        ids, drafts = draft_batch([out[i][-1] for i in active], drafts, cache.max_len - 1 - max(lengths))
        rows = None if active[-1] == len(active) - 1 else active  # rows 0..B-1: the cache hands out views
        logits = forward(torch.tensor(ids, device=cache.k.device), rows)[:, :, :V]
        written = [n + len(ids[0]) for n in lengths]
        for j, i in enumerate(active):
            kept = verify(logits[j, : len(drafts[j]) + 1], drafts[j], **sampling)
            if eos_id in kept:
                kept = kept[: kept.index(eos_id) + 1]
            out[i] += kept[: max_new_tokens - len(out[i])]
            proposers[i].extend(kept)
            lengths[j] += len(kept)  # the last kept token is not in the cache yet: it is the next input
        if lengths != written:
            cache.truncate(active, lengths)
        active = [i for i in active if len(out[i]) < max_new_tokens and out[i][-1] != eos_id]
