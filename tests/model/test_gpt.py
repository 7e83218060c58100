"""The GPT module: shapes, loss, init, positions, activation checkpointing, meta-device build, GELU."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model.gpt import GPT, gelu_tanh, lm_loss


def tiny(position="learned", **kw):
    return ModelConfig(n_layers=2, d_model=32, n_heads=4, max_seq_len=64, vocab_size=200, position=position, **kw)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_shapes_and_loss(position):
    torch.manual_seed(0)
    model = GPT(tiny(position))
    ids = torch.randint(0, 200, (3, 17))
    logits = model(ids)
    assert logits.shape == (3, 17, 256)  # vocab padded to a multiple of 128
    loss = lm_loss(logits[:, :-1], ids[:, 1:])
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(256)) < 0.5  # near-uniform at init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert (model.pos_emb is None) == (position == "rotary")


def test_causality():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    ids = torch.randint(0, 200, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 200
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])


def test_loss_ignores_minus_100():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    masked = targets.clone()
    masked[:, :2] = -100
    manual = torch.nn.functional.cross_entropy(logits[:, 2:].reshape(-1, 11), targets[:, 2:].reshape(-1))
    assert torch.allclose(lm_loss(logits, masked), manual)


def test_megatron_init_and_tying():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=8, d_model=256, n_heads=4, max_seq_len=64, vocab_size=1000, init_std=0.02)
    model = GPT(cfg)
    assert model.lm_head.weight is model.tok_emb.weight
    std = model.blocks["0"].mlp.up_proj.weight.std().item()
    resid = model.blocks["0"].mlp.down_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002 and abs(resid - 0.02 / math.sqrt(16)) < 0.001
    assert model.blocks["0"].attn.q_proj.bias.abs().sum() == 0
    untied = GPT(cfg.model_copy(update={"tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - model.num_params() == cfg.padded_vocab_size * 256


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    plain = GPT(tiny())
    ckpt = GPT(tiny(activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 200, (2, 16))
    for m in (plain, ckpt):
        lm_loss(m(ids)[:, :-1], ids[:, 1:]).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_meta_build_then_materialise():
    with torch.device("meta"):
        model = GPT(tiny("rotary"))
    assert model.tok_emb.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 200, (1, 8)))).all()


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        GPT(tiny())(torch.zeros(1, 65, dtype=torch.long))


def test_inference_gelu_is_the_tanh_gelu():
    x = torch.linspace(-12, 12, 4001).reshape(1, -1).repeat(3, 1)
    ref = F.gelu(x, approximate="tanh")
    with torch.inference_mode():
        fast = gelu_tanh(x)  # the sigmoid form, in place
    assert torch.allclose(fast, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, torch.linspace(-12, 12, 4001).reshape(1, -1).repeat(3, 1))  # input untouched
    y = gelu_tanh(x.requires_grad_())  # training: the fused kernel, differentiable
    assert type(y.grad_fn).__name__ == "GeluBackward0" and torch.equal(y, ref)
