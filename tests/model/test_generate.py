"""Sampling: seeded reproducibility, top-k / top-p filtering, EOS stopping."""

import torch

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model.generate import argmax_rows, filter_logits, sample_next
from mtnlg_ray.model.gpt import GPT


def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layers=2, d_model=32, n_heads=4, max_seq_len=64, vocab_size=100)).eval()


def test_seeded_sampling_is_reproducible():
    m, prompt = model(), torch.randint(0, 100, (2, 5))
    a = m.generate(prompt, 20, temperature=1.0, top_p=0.9, seed=7)
    b = m.generate(prompt, 20, temperature=1.0, top_p=0.9, seed=7)
    c = m.generate(prompt, 20, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < 100  # padded vocabulary rows are never sampled


def test_argmax_rows_is_torch_argmax():
    # numpy's argmax on CPU float32: the same index as torch's on ties (the first) and NaN (above all),
    # for views, one row and a batch of positions
    x = torch.randn(3, 5, 100)
    x[0, 1, 7] = float("nan")
    x[1, 2, 3] = x[1, 2, 9] = 1e9
    for t in (x, x[:, :, :50], x[1, 2], x.double(), x.requires_grad_(True)[0]):
        got = argmax_rows(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(-1))


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.01)).sum() == 3  # one token always survives


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))


def test_stops_at_eos_and_pads():
    m = model()
    prompt = torch.randint(0, 100, (1, 4))
    greedy = m.generate(prompt, 10)[0, 4:].tolist()
    eos = greedy[2]
    out = m.generate(prompt, 10, eos_id=eos)
    first = greedy.index(eos)
    assert out.shape[1] == 4 + first + 1 and out[0, -1].item() == eos
    listed = m.generate([prompt[0].tolist()], 10, eos_id=eos)
    assert listed[0][4:] == greedy[: first + 1]


def test_stops_at_context_length():
    m = model()
    out = m.generate(torch.randint(0, 100, (1, 60)), 50)
    assert out.shape[1] == 64


def test_decode_layout_keeps_values_and_checkpoints(tmp_path):
    from mtnlg_ray.checkpoint import native
    from mtnlg_ray.model.generate import use_decode_layout

    m = model()
    ids = torch.randint(0, m.config.vocab_size, (2, 7))
    before = m(ids)
    use_decode_layout(m)
    w = m.lm_head.weight
    assert w.stride() == (1, w.shape[0]) and w is m.tok_emb.weight  # column-major, still tied
    torch.testing.assert_close(m(ids), before, rtol=1e-5, atol=1e-5)
    use_decode_layout(m)  # idempotent
    native.save(m.state_dict(), m.config, tmp_path / "ck")
    tensors = native.load_tensors(tmp_path / "ck")
    torch.testing.assert_close(tensors["tok_emb.weight"], w.detach().contiguous())
