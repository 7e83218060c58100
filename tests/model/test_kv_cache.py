"""KV-cached decoding equals full recomputation, also with rows of different lengths."""

import pytest
import torch

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.model.kv_cache import KVCache


@pytest.fixture(params=["learned", "rotary"])
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=3, d_model=48, n_heads=4, max_seq_len=64, vocab_size=300, position=request.param)
    return GPT(cfg).eval()


def full_greedy(model, prompt, n):
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1, :300].argmax(-1, keepdim=True)], dim=1)
    return seq


@torch.no_grad()
def test_prefill_plus_decode_equals_full(model):
    ids = torch.randint(0, 300, (2, 24))
    full = model(ids)
    cache = KVCache.for_model(model, batch_slots=2)
    parts = [model(ids[:, :10], cache), model(ids[:, 10:11], cache), model(ids[:, 11:], cache)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5
    assert cache.lengths.tolist() == [24, 24]


@torch.no_grad()
def test_greedy_tokens_identical(model):
    prompt = torch.randint(0, 300, (3, 7))
    assert torch.equal(model.generate(prompt, 12), full_greedy(model, prompt, 12))


@torch.no_grad()
def test_rows_of_different_lengths_advance_independently(model):
    ids = torch.randint(0, 300, (3, 30))
    full = model(ids)
    cache = KVCache.for_model(model, batch_slots=4)
    # Row slots 3, 0, 1 get prompts of 5, 9 and 2 tokens, one at a time.
    for slot, row, n in ((3, 0, 5), (0, 1, 9), (1, 2, 2)):
        model(ids[row : row + 1, :n], cache, rows=[slot])
    assert cache.lengths.tolist() == [9, 2, 0, 5]
    pos = {3: 5, 0: 9, 1: 2}
    # Advance only slots 3 and 1 twice, then all three together.
    for _ in range(2):
        logits = model(torch.stack([ids[0, pos[3] : pos[3] + 1], ids[2, pos[1] : pos[1] + 1]]), cache, rows=[3, 1])
        assert (logits[0, 0] - full[0, pos[3]]).abs().max() < 1e-5
        assert (logits[1, 0] - full[2, pos[1]]).abs().max() < 1e-5
        pos[3] += 1
        pos[1] += 1
    batch = torch.stack([ids[1, pos[0] : pos[0] + 1], ids[0, pos[3] : pos[3] + 1], ids[2, pos[1] : pos[1] + 1]])
    logits = model(batch, cache, rows=[0, 3, 1])
    for i, (row, slot) in enumerate(((1, 0), (0, 3), (2, 1))):
        assert (logits[i, 0] - full[row, pos[slot]]).abs().max() < 1e-5
    assert cache.lengths.tolist() == [10, 5, 0, 8]


@torch.no_grad()
def test_ragged_generate_matches_one_by_one(model):
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    together = model.generate(prompts, 10)
    for p, out in zip(prompts, together):
        assert out == full_greedy(model, torch.tensor([p]), 10)[0].tolist()


@torch.no_grad()
def test_reset_frees_a_row_and_overflow_is_refused(model):
    cache = KVCache.for_model(model, batch_slots=2, max_len=8)
    ids = torch.randint(0, 300, (1, 6))
    first = model(ids, cache, rows=[1])
    cache.reset([1])
    assert cache.lengths.tolist() == [0, 0]
    again = model(ids, cache, rows=[1])  # stale entries are overwritten, never read
    assert torch.allclose(first, again, atol=1e-6)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.randint(0, 300, (1, 3)), cache, rows=[1])
