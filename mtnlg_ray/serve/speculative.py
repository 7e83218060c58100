"""The serving engine's side of n-gram speculative decoding (the method: model/speculative.py).

`verify_rows` turns one verification forward, logits (B, T, V) over each row's last token and its
drafts, into the tokens each request keeps, with its own sampler: logit_bias and penalties are
applied position by position with the counts of the tokens kept before it (a kept token is
`observe`d before the next position is scored), so a penalized or seeded request is verified against
exactly the distribution a one-token step would sample from. Greedy rows without penalties are one
batched argmax. Requests with a structured-output grammar are not drafted (`draftable`): their token
masks would have to follow, and roll back, every draft.
"""

from __future__ import annotations

import torch

from mtnlg_ray.model.generate import argmax_rows
from mtnlg_ray.model.speculative import accept_or_resample, accepted_prefix
from mtnlg_ray.serve.sampling import RequestSampler, top_logprobs


def draftable(sampler: RequestSampler) -> bool:
    """Whether a request may be drafted for: not one held to a grammar (structured outputs)."""
    return getattr(sampler, "constraint", None) is None


def verify_row(logits: torch.Tensor, draft: list[int], sampler: RequestSampler) -> list[int]:
    """Tokens one request keeps: logits (len(draft) + 1, V) float, scored at its last token and drafts."""
    p, kept = sampler.params, []
    for t in range(len(draft) + 1):
        row = sampler.penalize(logits[t]) if p.penalized else logits[t]
        if t == len(draft):
            token = sampler.draw(row)  # every draft was accepted: one more token from the model
        elif p.greedy or (probs := sampler.probs(row)) is None:
            token = int(argmax_rows(row))
        else:
            token = accept_or_resample(probs, draft[t], sampler.generator)
        sampler.observe(token)
        kept.append(token)
        if t == len(draft) or token != draft[t]:
            break
    return kept


def verify_rows(logits: torch.Tensor, drafts: list[list[int]], samplers: list[RequestSampler]):
    """Kept tokens of each row and their logprob entries (None or (logprob, top list), as sample_batch's).

    logits (B, T, V) real-vocabulary columns; row i's drafts sit at positions 1 .. len(drafts[i]).
    """
    logits = logits.float()
    greedy = argmax_rows(logits).tolist()  # (B, T)
    kept_rows, entry_rows = [], []
    for i, (draft, s) in enumerate(zip(drafts, samplers)):
        if s.params.greedy and not s.params.penalized:
            n = accepted_prefix(draft, greedy[i])
            kept = draft[:n] + [greedy[i][n]]
            for token in kept:
                s.observe(token)
        else:
            kept = verify_row(logits[i, : len(draft) + 1], draft, s)
        entries = [None] * len(kept)
        if s.params.logprobs is not None:  # from the raw model distribution, as in sample_batch
            lp = logits[i, : len(kept)].log_softmax(-1)
            entries = [(float(lp[t, token]), top_logprobs(lp[t], s.params.logprobs)) for t, token in enumerate(kept)]
        kept_rows.append(kept)
        entry_rows.append(entries)
    return kept_rows, entry_rows
