"""int8 decoding (model/quantize.py): close to float32 logits, the same greedy tokens almost always."""

import pytest
import torch
from pydantic import ValidationError

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.model import quantize
from mtnlg_ray.model.gpt import GPT
from mtnlg_ray.model.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not quantize.available(), reason="needs PyTorch's fbgemm (x86)")


def test_rows_quantize_symmetric_per_channel():
    w = torch.randn(16, 32) * torch.linspace(0.01, 3, 16)[:, None]  # rows of very different ranges
    q, scale = quantize.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert (q.abs().amax(1) == 127).all()  # each row's largest weight maps to +-127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # within half a step


@torch.no_grad()
def test_int8_logits_close_to_fp32_and_greedy_agrees():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layers=2, d_model=128, n_heads=4, max_seq_len=128, vocab_size=1000)).eval()
    prompts = torch.randint(0, 1000, (4, 8))
    seqs = m.generate(prompts, 100)  # float32 greedy: (4, 108)
    logits = {}
    for q in ("none", "int8"):
        m.generate(prompts[:1], 1, quantization=q)  # switch the decode plan
        assert m.decode_plan.quantization == q
        cache = KVCache.for_model(m, 4, 128)
        logits[q] = m(seqs[:, :-1], kv_cache=cache)[:, 7:, :1000]  # the 100 greedy steps' logits
    diff = (logits["int8"] - logits["none"]).abs().max()
    scale = logits["none"].abs().max()
    assert diff < 0.05 * scale, (diff, scale)  # measured ~1-4% of the largest logit
    agree = (logits["int8"].argmax(-1) == logits["none"].argmax(-1)).float().mean()
    assert agree >= 0.95, agree  # 400 tokens
    assert m.generate(prompts, 5, quantization="int8").shape == (4, 13)


def test_generate_rejects_unknown_quantization():
    m = GPT(ModelConfig(n_layers=1, d_model=32, n_heads=2, max_seq_len=16, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="quantization"):
        m.generate([[1, 2]], 2, quantization="int4")


def test_serve_config_quantization_key():
    from mtnlg_ray.config.serve import ServeConfig

    assert ServeConfig(checkpoint="ckpt").quantization == "none"
    assert ServeConfig(checkpoint="ckpt", quantization="int8").quantization == "int8"
    with pytest.raises(ValidationError, match="quantization"):
        ServeConfig(checkpoint="ckpt", quantization="int4")
