"""The public Python API: from_pretrained, export, generate_text."""

import os

import pytest
import torch

import mtnlg_ray
from mtnlg_ray.api import export, from_pretrained, generate_text
from mtnlg_ray.checkpoint import native
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.gpt import GPT


@pytest.fixture
def ckpt(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size)
    return native.save(GPT(cfg).state_dict(), cfg, tmp_path / "ckpt", tiny_tokenizer.path)


def test_from_pretrained_generate_decode(ckpt):
    tokenizer, model = mtnlg_ray.from_pretrained(ckpt)
    ids = tokenizer.encode("def heappush(heap, item):", return_tensors="pt")
    out = model.generate(ids, max_new_tokens=8)
    assert out.shape == (1, ids.shape[1] + 8)
    assert tokenizer.decode(out[0]).startswith("def heappush(heap, item):")
    assert generate_text(ckpt, "def heappush(heap, item):", max_tokens=8) == tokenizer.decode(out[0])


def test_export_hf_and_back_keeps_weights(ckpt, tmp_path):
    hf = export(ckpt, tmp_path / "hf", fmt="hf")
    assert (hf / "tokenizer.model").is_file()
    back = export(hf, tmp_path / "native")
    (tok_a, a), (tok_b, b) = from_pretrained(ckpt), from_pretrained(back)
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        assert torch.allclose(a(ids)[..., :512], b(ids)[..., :512], atol=1e-6)
    assert tok_b.sha256 == tok_a.sha256


def test_vocab_mismatch_is_refused(tmp_path, tiny_tokenizer):
    cfg = ModelConfig(preset="debug", vocab_size=1000)
    path = native.save(GPT(cfg).state_dict(), cfg, tmp_path / "bad", tiny_tokenizer.path)
    with pytest.raises(UserError, match="tokenizer has 512 tokens but the model's vocab_size is 1000"):
        from_pretrained(path)
    with pytest.raises(UserError, match="tokenizer has 512 tokens but the model's vocab_size is 1000"):
        export(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_path(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        from_pretrained(tmp_path / "nope")


def test_from_pretrained_gpt2_directory_with_its_tokenizer(tmp_path):
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from mtnlg_ray.data.gpt2_bpe import GPT2BPETokenizer, bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tokenizer, model = mtnlg_ray.from_pretrained(tmp_path)
    assert isinstance(tokenizer, GPT2BPETokenizer) and tokenizer.eod_id == 256
    out = model.generate(tokenizer.encode("hello", return_tensors="pt"), max_new_tokens=4)
    assert tokenizer.decode(out[0]).startswith("hello")


@pytest.mark.parametrize("fmt", ["native", "hf"])
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_exports_carry_the_umask(ckpt, tmp_path, fmt, mask):
    """An export is created as the user's other files are (not 0700 / 0600), so it can be shared."""
    old = os.umask(mask)
    try:
        out = export(ckpt, tmp_path / "out", fmt=fmt)
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~mask)}, modes
