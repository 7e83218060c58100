"""Preset parameter counts, on the meta device (no memory allocated)."""

import pytest
import torch

from mtnlg_ray.config import ModelConfig
from mtnlg_ray.config.presets import PRESETS
from mtnlg_ray.model.gpt import GPT


@pytest.mark.parametrize("name, expected, tol", [
    ("gpt-125m", 125e6, 0.05),
    ("gpt-350m", 355e6, 0.05),
    ("gpt-1.3b", 1.3e9, 0.05),
    ("mtnlg-530b", 530e9, 0.01),
])
def test_parameter_counts_on_meta(name, expected, tol):
    with torch.device("meta"):
        model = GPT(ModelConfig(preset=name))
    assert model.tok_emb.weight.is_meta
    assert abs(model.num_params() - expected) / expected < tol


def test_debug_preset_is_tiny_and_mtnlg_shape():
    with torch.device("meta"):
        debug = GPT(ModelConfig(preset="debug", vocab_size=4096))
    assert debug.num_params() < 1_000_000
    cfg = ModelConfig(preset="mtnlg-530b")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.max_seq_len, cfg.position) == (105, 20480, 128, 2048, "learned")
    assert cfg.padded_vocab_size == 50304 and set(PRESETS) >= {"debug", "gpt-125m", "gpt-350m", "gpt-1.3b", "mtnlg-530b"}


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'gpt-7b' \\(known: debug, gpt-125m"):
        ModelConfig(preset="gpt-7b")
