"""Reading a LoRA run's adapters alone (for multi-LoRA serving), and refusing what is not one."""

import pytest
import torch
from ckpt_assets import CFG, save_into, save_lora_into, trained

from mtnlg_ray.checkpoint import native
from mtnlg_ray.checkpoint.lora_adapter import check_adapter, read_adapter
from mtnlg_ray.config import LoraConfig, ModelConfig
from mtnlg_ray.errors import PathError, UserError
from mtnlg_ray.model.lora import apply_lora

LORA = {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "up_proj"]}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    model, _ = trained(steps=0)
    apply_lora(model, LoraConfig(**LORA))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    run = tmp_path_factory.mktemp("lora") / "run"
    save_lora_into(run, 3, model, LORA)
    return run, model


def test_reads_only_the_adapters_of_the_newest_checkpoint(lora_run):
    run, model = lora_run
    assert check_adapter(str(run), CFG) == LoraConfig(**LORA)
    weights = read_adapter(str(run), CFG)
    assert (weights.rank, weights.alpha) == (2, 4.0)
    assert sorted(weights.layers) == sorted(f"blocks.{i}.{m}" for i in range(CFG.n_layers)
                                            for m in ("attn.q_proj", "mlp.up_proj"))
    a, b = weights.layers["blocks.1.mlp.up_proj"]
    assert torch.equal(a, model.blocks["1"].mlp.up_proj.lora_A) and torch.equal(b, model.blocks["1"].mlp.up_proj.lora_B)


def test_refuses_what_is_not_a_lora_run_naming_the_path(lora_run, tmp_path):
    run, _ = lora_run
    other = ModelConfig(preset="debug", vocab_size=300, max_seq_len=16, d_model=32)
    with pytest.raises(UserError, match=rf"^{run}: the adapter's base model differs .*d_model 64 vs 32"):
        check_adapter(str(run), other)
    plain, opts = trained(steps=0)
    save_into(tmp_path / "pretrain", 1, plain, opts)
    with pytest.raises(UserError, match=r"pretrain: not a LoRA fine-tune run .*no lora section"):
        read_adapter(str(tmp_path / "pretrain"), CFG)
    exported = native.save(plain.state_dict(), CFG, tmp_path / "export")
    with pytest.raises(UserError, match=r"export: not a LoRA fine-tune run .*a native checkpoint"):
        check_adapter(str(exported), CFG)
    with pytest.raises(PathError, match="nowhere"):
        check_adapter(str(tmp_path / "nowhere"))
