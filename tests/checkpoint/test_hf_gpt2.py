"""GPT-2 interchange: parity with transformers on the same random tiny weights, both directions."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mtnlg_ray.checkpoint import hf_gpt2
from mtnlg_ray.checkpoint.native import build_model
from mtnlg_ray.checkpoint.source import Kind, open_source
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.gpt import GPT


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path)
    return path, model


def test_import_logits_and_greedy_match_transformers(hf_dir):
    path, ref = hf_dir
    source = open_source(path)
    assert source.kind is Kind.HF_GPT2 and source.config() == hf_gpt2.load(path)[0]
    ours = source.model()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (ours(ids)[..., :300] - ref(ids).logits).abs().max() < 1e-4
        ours_gen = ours.generate(ids[:, :6], 12)
        ref_gen = ref.generate(ids[:, :6], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_gen, ref_gen)


def test_export_loads_in_transformers(hf_dir, tmp_path):
    path, ref = hf_dir
    cfg, tensors = hf_gpt2.load(path)
    out = hf_gpt2.save(cfg, build_model(cfg, tensors).state_dict(), tmp_path / "exported")
    back = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max() < 1e-5


def test_bin_only_directory_is_refused(hf_dir, tmp_path):
    path, _ = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="convert it to model.safetensors"):
        hf_gpt2.load(tmp_path)


def test_rotary_model_cannot_be_exported_as_gpt2(tmp_path):
    cfg = ModelConfig(preset="debug", vocab_size=300, position="rotary")
    with pytest.raises(UserError, match="learned positions"):
        hf_gpt2.save(cfg, GPT(cfg).state_dict(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
