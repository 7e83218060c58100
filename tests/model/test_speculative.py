"""n-gram speculative decoding: the proposer, the acceptance rules, and `generate` with it on and off."""

import pytest
import torch

from mtnlg_ray.config import ModelConfig, SpeculativeConfig
from mtnlg_ray.model.generate import generate
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.model.speculative import NgramProposer, accept_or_resample, draft_batch, verify

SPEC = dict(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layers=2, d_model=48, n_heads=4, max_seq_len=96, vocab_size=300)).eval()


def test_proposer_takes_the_longest_ngram_at_its_earliest_occurrence():
    spec = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    p = NgramProposer([1, 2, 3, 9, 5, 2, 3, 7, 8, 1, 2, 3], spec)
    assert p.propose(10) == [9, 5, 2]  # [1, 2, 3] at 0 beats [2, 3] at 5
    assert p.propose(2) == [9, 5]
    p.extend([4])
    assert p.propose(10) == []  # 4 occurs nowhere before
    p = NgramProposer([5, 6, 7, 5], spec)
    assert p.propose(10) == [6, 7, 5]  # the match's continuation may run into the suffix
    assert NgramProposer([5, 6], spec).propose(10) == []  # a suffix never matches itself
    assert SpeculativeConfig(prompt_lookup_max=3).prompt_lookup_min == 3
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig(prompt_lookup_min=4, prompt_lookup_max=2)


def test_point_mass_rejection_sampling_keeps_the_distribution():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    gen = torch.Generator().manual_seed(0)  # fixed seeds: 1,500 draws, frequencies within ~4 sigma
    for draft in (0, 3):
        counts = torch.zeros(5)
        for _ in range(1500):
            counts[accept_or_resample(probs, draft, gen)] += 1
        assert (counts / counts.sum() - probs).abs().max() < 0.05
    # two positions: the second is drawn only after the first draft was accepted; both stay distributed as p
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    firsts, seconds = torch.zeros(3), torch.zeros(3)
    for _ in range(1500):
        kept = verify(logits, [0], temperature=1.0, generator=gen)
        firsts[kept[0]] += 1
        if len(kept) == 2:
            seconds[kept[1]] += 1
    assert (firsts / firsts.sum() - torch.tensor([0.6, 0.3, 0.1])).abs().max() < 0.05
    assert (seconds / seconds.sum() - torch.tensor([0.2, 0.2, 0.6])).abs().max() < 0.07


def test_draft_batch_pads_rows_and_respects_the_room():
    ids, drafts = draft_batch([5, 6], [[1, 2, 3], []], room=2)
    assert ids == [[5, 1, 2], [6, 6, 6]] and drafts == [[1, 2], []]


def test_generate_greedy_is_identical_with_speculation(model):
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 300, (12,), generator=g).tolist()
    prompts = [base + base, base[:5], torch.randint(0, 300, (20,), generator=g).tolist()]
    for eos in (None, 7):
        plain = generate(model, prompts, 30, eos_id=eos)
        assert generate(model, prompts, 30, eos_id=eos, speculative=SPEC) == plain
    # rows near the context limit: drafts never write past it
    long = (base * 8)[:90]
    assert generate(model, [long], 20, speculative=SPEC) == generate(model, [long], 20)
    t = torch.tensor([base, base])
    assert torch.equal(generate(model, t, 30, speculative=SpeculativeConfig(**SPEC)), generate(model, t, 30))


def test_generate_sampled_with_speculation_stops_where_asked(model):
    prompt = list(range(10)) * 3
    out = generate(model, [prompt] * 3, 25, temperature=0.7, top_k=40, seed=3, speculative=SPEC)
    assert all(len(o) == len(prompt) + 25 for o in out)
    again = generate(model, [prompt] * 3, 25, temperature=0.7, top_k=40, seed=3, speculative=SPEC)
    assert out == again  # seeded
