"""Multi-LoRA serving: a mixed batch (base + several adapters) gives each row its merged model's logits."""

import pytest
import torch

from mtnlg_ray.config import LoraConfig, ModelConfig
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.model.kv_cache import KVCache
from mtnlg_ray.model.lora import apply_lora, merge_lora_state
from mtnlg_ray.model.multi_lora import LoraBank, LoraWeights, MultiLoraLinear

CFG = ModelConfig(preset="debug", vocab_size=100, pad_vocab_multiple=8, max_seq_len=32)
ADAPTERS = {"sql": LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
            "chat": LoraConfig(rank=2, alpha=4.0, target_modules=["k_proj", "out_proj", "up_proj"])}


def base_model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def random_adapter(model: GPT, cfg: LoraConfig, seed: int) -> tuple[dict, LoraWeights]:
    """(the LoRA model's full state dict with nonzero A and B, the same adapter as LoraWeights)."""
    lora = GPT(CFG)
    lora.load_state_dict(model.state_dict())
    apply_lora(lora, cfg)
    g = torch.Generator().manual_seed(seed)
    weights = LoraWeights(cfg.rank, cfg.alpha)
    with torch.no_grad():
        for name, mod in lora.named_modules():
            if hasattr(mod, "lora_A"):
                mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g) * 0.3)
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.3)
                weights.layers[name] = (mod.lora_A.clone(), mod.lora_B.clone())
    return lora.state_dict(), weights


def merged_model(state: dict, cfg: LoraConfig) -> GPT:
    model = GPT(CFG).eval()
    model.load_state_dict(merge_lora_state(state, cfg))
    return model


@pytest.fixture(scope="module")
def setup():
    base = base_model()
    served = base_model()
    bank = LoraBank(served, max_loras=2)
    merged = {None: base}
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        state, weights = random_adapter(base, cfg, seed)
        bank.load(name, weights)
        merged[name] = merged_model(state, cfg)
    return served, bank, merged


@torch.no_grad()
def test_mixed_batch_matches_each_merged_model(setup):
    served, bank, merged = setup
    names = ["sql", None, "chat", "sql", None, "chat"]
    ids = torch.randint(0, CFG.vocab_size, (len(names), 12), generator=torch.Generator().manual_seed(3))
    bank.set_rows(names)
    got = served(ids)  # (6, 12, V)
    for i, name in enumerate(names):
        want = merged[name](ids[i:i + 1])[0]
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=0)
    assert (got[0] - merged[None](ids[:1])[0]).abs().max() > 1e-2  # the adapters change the logits


@torch.no_grad()
def test_mixed_batch_with_kv_cache_prefill_then_decode(setup):
    served, bank, merged = setup
    names = [None, "chat", "sql"]
    g = torch.Generator().manual_seed(4)
    prompt, step = torch.randint(0, CFG.vocab_size, (3, 7), generator=g), torch.randint(0, CFG.vocab_size, (3, 1), generator=g)
    cache = KVCache.for_model(served, 3, CFG.max_seq_len)
    bank.set_rows(names)
    served(prompt, kv_cache=cache)
    got = served(step, kv_cache=cache)[:, -1]  # (3, V): the decode step reads the adapters' own keys and values
    for i, name in enumerate(names):
        want = merged[name](torch.cat([prompt[i:i + 1], step[i:i + 1]], 1))[0, -1]
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_base_only_batch_is_the_plain_model_and_unload_clears_the_slot():
    base, served = base_model(), base_model()
    bank = LoraBank(served, max_loras=1)
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    bank.set_rows([None, None])
    assert bank.batch.rows is None
    assert not any(isinstance(m, MultiLoraLinear) for m in served.modules())  # nothing wrapped before a load
    _, weights = random_adapter(base, ADAPTERS["sql"], 0)
    bank.load("sql", weights)
    assert isinstance(served.blocks["0"].attn.q_proj, MultiLoraLinear)
    bank.set_rows([None, None])
    assert torch.equal(served(ids), base(ids))
    with pytest.raises(ValueError, match="all 1 LoRA adapter slots are taken"):
        bank.load("other", weights)
    bank.set_rows(["sql", None])
    assert not torch.equal(served(ids)[0], base(ids)[0])
    bank.unload("sql")
    assert "sql" not in bank and len(bank) == 0
    bank.load("other", weights)  # the freed slot is reused
    assert "other" in bank


def test_an_adapter_of_another_shape_is_refused_before_anything_is_written():
    served = base_model()
    bank = LoraBank(served, max_loras=2)
    bad = LoraWeights(2, 4.0, {"blocks.0.attn.q_proj": (torch.zeros(2, CFG.d_model + 1), torch.zeros(CFG.d_model, 2))})
    with pytest.raises(ValueError, match="blocks.0.attn.q_proj: adapter A"):
        bank.load("bad", bad)
    missing = LoraWeights(2, 4.0, {"blocks.9.attn.q_proj": (torch.zeros(2, 4), torch.zeros(4, 2))})
    with pytest.raises(ValueError, match="does not have"):
        bank.load("missing", missing)
    assert len(bank) == 0
