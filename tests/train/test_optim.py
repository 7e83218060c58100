"""AdamW parameter groups (Megatron: no decay on biases and norms) and the optimizer container."""

import pytest
import torch

from mtnlg_ray.config import ModelConfig, OptimConfig
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.train.optim import Optimizers, param_groups


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(ModelConfig(preset="debug", vocab_size=300, max_seq_len=16))


def test_no_decay_on_biases_and_norms():
    model = tiny_gpt()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "tok_emb.weight" in decayed and "blocks.0.attn.q_proj.weight" in decayed  # matrices, embeddings too
    assert "blocks.0.attn.q_proj.bias" in plain and "blocks.1.ln_2.weight" in plain and "ln_f.bias" in plain
    assert all(n.endswith("weight") for n in decayed) and not decayed & plain
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_only_trainable_parameters_are_optimised():
    model = tiny_gpt()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("blocks.1."))
    opts = Optimizers([model], OptimConfig(lr=1e-2))
    params = [p for g in opts.pairs[0][1].param_groups for p in g["params"]]
    assert len(params) == sum(1 for n, _ in model.named_parameters() if n.startswith("blocks.1."))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Optimizers([model], OptimConfig())


def test_betas_lr_and_step():
    model = tiny_gpt()
    opts = Optimizers([model], OptimConfig(lr=1e-2, beta1=0.9, beta2=0.95))
    opt = opts.pairs[0][1]
    assert opt.defaults["betas"] == (0.9, 0.95)
    opts.set_lr(3e-3)
    assert all(g["lr"] == 3e-3 for g in opt.param_groups)
    before = model.ln_f.bias.detach().clone()
    model(torch.randint(0, 300, (2, 8))).float().pow(2).mean().backward()
    opts.step()
    assert not torch.equal(before, model.ln_f.bias) and model.ln_f.bias.grad is None


def test_implementations_give_the_same_updates():
    """fused (the default), foreach and for-loop AdamW: the kernel each names, the same weights
    after three steps (to float rounding)."""
    x = torch.randint(0, 300, (2, 8))
    weights = {}
    for impl in ("fused", "foreach", "for-loop"):
        model = tiny_gpt()
        opts = Optimizers([model], OptimConfig(lr=1e-2, implementation=impl))
        opt = opts.pairs[0][1]
        assert (opt.defaults["fused"], opt.defaults["foreach"]) == {"fused": (True, None), "foreach": (None, True),
                                                                   "for-loop": (None, False)}[impl]
        for _ in range(3):
            model(x).float().pow(2).mean().backward()
            opts.step()
        weights[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert OptimConfig().implementation == "fused"
    torch.testing.assert_close(weights["fused"], weights["for-loop"], rtol=1e-5, atol=2e-5)  # updates are ~1e-2
    torch.testing.assert_close(weights["foreach"], weights["for-loop"], rtol=1e-5, atol=2e-5)  # updates are ~1e-2
