"""Incremental decoding with the KV cache: greedy, or sampling with temperature / top-k / top-p.

The prompt is prefilled once; every later step feeds one token per row, so a token's cost
follows the model size plus its attention over the cached prefix instead of recomputing the
whole sequence. Rows of different prompt lengths are prefilled separately into their own cache
rows and then decoded together. With `speculative` (n-gram prompt lookup, model/speculative.py) a
step verifies up to k drafted tokens per row in one forward: same greedy tokens, same distribution.
"""

from __future__ import annotations

import torch

from mtnlg_ray.config.serve import SpeculativeConfig
from mtnlg_ray.model import decode_layout
from mtnlg_ray.model.kv_cache import KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; -inf the rest.

    logits: (B, V), already divided by the temperature. At least one token always survives.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Index of the largest logit along the last dimension (the first one on ties, a NaN above all,
    as torch.argmax): (..., V) -> int64 (...). A CPU float32 tensor goes through numpy, whose
    vectorized argmax takes 3-7 us for 5 rows of a 4,096-token vocabulary against torch's 28 us; a
    decode step of a small model is ~300 us, and greedy decoding takes one argmax per step."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.as_tensor(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return argmax_rows(logits)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def use_decode_layout(model, quantization: str | None = None) -> None:
    """Prepare `model` for decoding: the LM head's column-major layout and the decode plan.

    The plan (model/decode_layout.py) runs every later KV-cached eval forward with fused q/k/v
    products and fewer ops, same logits; `quantization="int8"` makes its products int8
    (model/quantize.py), None keeps the model's current choice ("none" the first time).

    The LM head weight is stored column-major, in place: same values, shape and name, strides (1, V).

    A decode step multiplies a few hidden states by the (V, d) head, a memory-bound matrix-vector
    product over the model's largest matrix. CPU BLAS streams a weight laid out as a contiguous
    (d, V) matrix 2-2.5x faster than the row-major (V, d) one (50304 x 384 on 2 cores: 6.3 -> 2.7 ms
    per token), which is what `F.linear(x, W)` gets when W is its transpose's `.t()`. A tied
    embedding shares the parameter; row lookups work on either layout. Checkpoint writers call
    `.contiguous()`. CPU only (cuBLAS reads both layouts at full speed); idempotent.
    """
    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if w is not None and w.device.type == "cpu" and type(w.data) is torch.Tensor and w.dim() == 2:
        if w.stride() != (1, w.shape[0]):
            w.data = w.data.t().contiguous().t()
    if not hasattr(model, "decode_plan"):
        return  # not a GPT (a pipeline stage's wrapper, a test double)
    plan = decode_layout.current_plan(model)
    if quantization is None:
        quantization = plan.quantization if plan is not None else "none"
    if plan is None or plan.quantization != quantization:
        decode_layout.plan_decode(model, quantization)


def cached_forward(model, cache: KVCache):
    """(ids (B, T), rows=None) -> logits (B, T, V) continuing `cache`, for the steps of one generate call.

    Calls the model's decode plan directly once use_decode_layout has checked it: the weights cannot
    change inside the call, so the per-forward staleness check (~25 us) and module call are skipped.
    """
    plan = getattr(model, "decode_plan", None)
    if plan is not None:
        return lambda ids, rows=None: plan(model, ids, cache, rows, False)
    return lambda ids, rows=None: model(ids, kv_cache=cache, rows=rows)


@torch.no_grad()
def generate(
    model,
    input_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    speculative: SpeculativeConfig | dict | None = None,
    quantization: str | None = None,
):
    """Continue prompts with incremental decoding.

    input_ids: a (B, T) tensor, or a list of B token-id sequences of any lengths.
    Returns the same kind: a (B, T + n) tensor (rows that stopped at `eos_id` are padded with
    `pad_id`, default eos), or a list of lists (prompt + generated, ending at eos if produced).
    Decoding also stops at the model's context length. `speculative`: a SpeculativeConfig (or its
    fields, e.g. {"num_speculative_tokens": 4, "prompt_lookup_max": 3}) for n-gram speculative decoding.
    `quantization`: "int8" decodes with int8 weights (model/quantize.py), "none" in float; None keeps
    the model's current choice (see `use_decode_layout`).
    """
    device = next(model.parameters()).device
    as_tensor = isinstance(input_ids, torch.Tensor)
    prompts = [list(map(int, row)) for row in (input_ids.tolist() if as_tensor else input_ids)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cfg = model.config
    B, longest = len(prompts), max(len(p) for p in prompts)
    if longest > cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens exceeds max_seq_len={cfg.max_seq_len}")
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - longest)
    was_training = model.training
    model.eval()
    use_decode_layout(model, quantization)
    cache = KVCache.for_model(model, B, max_len=longest + max(max_new_tokens, 0))

    # Prefill: all rows at once when they have one length, else row by row into their own rows.
    if all(len(p) == longest for p in prompts):
        last = model(torch.tensor(prompts, device=device), kv_cache=cache, last_only=True)[:, -1]
    else:
        last = torch.cat([model(torch.tensor([p], device=device), cache, [i], last_only=True)[:, -1]
                          for i, p in enumerate(prompts)])

    out = [[] for _ in range(B)]
    if speculative is not None and max_new_tokens > 0:
        from mtnlg_ray.model.speculative import speculative_decode  # builds on this module

        spec = SpeculativeConfig.model_validate(speculative)
        first = sample_next(last[:, : cfg.vocab_size], temperature, top_k, top_p, generator).tolist()
        out = [[t] for t in first]
        speculative_decode(model, cache, out, prompts, max_new_tokens, spec, eos_id, temperature=temperature,
                           top_k=top_k, top_p=top_p, generator=generator)
        max_new_tokens = 0  # done: skip the one-token loop
    step_forward = cached_forward(model, cache)
    going = list(range(B))  # rows that have not produced eos
    vocab = cfg.vocab_size
    for step in range(max_new_tokens):
        nxt = sample_next(last[:, :vocab], temperature, top_k, top_p, generator)  # (B,); finished rows too
        toks = nxt.tolist()
        for i in going:
            out[i].append(toks[i])
        if eos_id is not None and eos_id in toks:
            going = [i for i in going if toks[i] != eos_id]
        if not going or step == max_new_tokens - 1:
            break
        if len(going) < B:  # decode only the rows still going; finished rows stay as they are
            rows = torch.tensor(going, device=device)
            logits = step_forward(nxt[rows][:, None], rows)[:, -1]
            last = torch.zeros(B, logits.shape[-1], device=device, dtype=logits.dtype)
            last[rows] = logits
        else:
            last = step_forward(nxt[:, None])[:, -1]
    model.train(was_training)

    if not as_tensor:
        return [p + o for p, o in zip(prompts, out)]
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    n = max(len(o) for o in out)
    rows = [p + o + [fill] * (n - len(o)) for p, o in zip(prompts, out)]
    return torch.tensor(rows, device=device)
