"""LoRA: only adapters train, the base checkpoint loads unchanged, merged weights = base + adapters."""

import pytest
import torch

from mtnlg_ray.config import FinetuneJob, LoraConfig, ModelConfig, validate
from mtnlg_ray.errors import ConfigError
from mtnlg_ray.checkpoint.native import build_model
from mtnlg_ray.model.gpt import GPT, lm_loss
from mtnlg_ray.model.lora import LoraLinear, apply_lora, is_lora_state, lora_parameter_names, merge_lora_state

CFG = ModelConfig(preset="debug", vocab_size=100, pad_vocab_multiple=8, max_seq_len=32)
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def base_model(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG)


def test_wraps_targets_keeps_names_and_freezes_the_rest():
    model = base_model()
    base_keys = set(model.state_dict())
    apply_lora(model, LORA)
    assert isinstance(model.blocks["0"].attn.q_proj, LoraLinear)
    assert type(model.blocks["0"].attn.k_proj) is torch.nn.Linear  # not targeted
    keys = set(model.state_dict())
    assert base_keys <= keys  # base weights keep their names: a base checkpoint loads unchanged
    added = keys - base_keys
    assert added == set(lora_parameter_names(model))
    assert "blocks.1.mlp.down_proj.lora_A" in added and len(added) == 2 * 4 * CFG.n_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == added
    assert model.blocks["0"].attn.q_proj.lora_B.abs().sum() == 0  # B = 0: starts as the base model


def test_unknown_target_name_is_refused():
    with pytest.raises(ConfigError, match="lora.target_modules"):
        validate(FinetuneJob, {"init_from": "x", "lora": {"target_modules": ["qkv"]}}, "ft.yaml")


def test_meta_build_then_init_weights_initialises_adapters_and_base_loads():
    ref = base_model()
    with torch.device("meta"):
        model = GPT(CFG)
    apply_lora(model, LORA)
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    a, b = model.blocks["0"].attn.q_proj.lora_A, model.blocks["0"].attn.q_proj.lora_B
    assert torch.isfinite(a).all() and a.abs().sum() > 0 and b.abs().sum() == 0
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert set(missing) == set(lora_parameter_names(model)) and not unexpected
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), ref.eval()(ids))


def test_only_adapters_train_and_merge_gives_the_same_logits():
    model = base_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LORA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)
    ids = torch.randint(0, 100, (4, 17))
    losses = []
    for _ in range(8):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), f"{k} changed"  # base weights untouched
    assert state["blocks.0.attn.q_proj.lora_B"].abs().sum() > 0  # adapters moved

    tensors = {k: v.clone() for k, v in state.items()}
    assert is_lora_state(tensors)
    merged = merge_lora_state(tensors, LORA)
    assert not is_lora_state(merged) and set(merged) == set(frozen)
    plain = build_model(CFG, merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model.eval()(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(ids), base_model().eval()(ids), atol=1e-4)  # the update is there


def test_merge_refuses_a_rank_mismatch():
    model = base_model()
    apply_lora(model, LORA)
    with pytest.raises(ValueError, match="rank 4 does not match lora.rank=8"):
        merge_lora_state(model.state_dict(), LoraConfig(rank=8))
