"""Native consolidated checkpoints: round trip, manifest checks, atomic writes."""

import json

import pytest
import torch

from mtnlg_ray.checkpoint import manifest, native
from mtnlg_ray.checkpoint.source import open_source
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.gpt import GPT


@pytest.fixture
def saved(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size, position="rotary")
    model = GPT(cfg).eval()
    path = native.save(model.state_dict(), cfg, tmp_path / "ckpt", tiny_tokenizer.path, extra={"step": 7})
    return path, model


def load(path):
    source = open_source(path)
    return source.model(), source.meta()


def test_round_trip(saved):
    path, model = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "manifest.json", "model.safetensors", "tokenizer.model"]
    loaded, meta = load(path)
    assert meta["step"] == 7 and manifest.read_config(path)[1]["format_version"] == 1
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.model", "config.json"])
def test_corrupted_file_is_refused_by_name(saved, name):
    path, _ = saved
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"{name}: sha256 does not match"):
        native.load_tensors(path)


def test_missing_file_is_refused_by_name(saved):
    path, _ = saved
    (path / "tokenizer.model").unlink()
    with pytest.raises(UserError, match=r"tokenizer.model: missing"):
        native.load_tensors(path)
    (path / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"manifest.json: missing"):
        native.load_tensors(path)


def test_wrong_shapes_are_refused(saved):
    path, _ = saved
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["d_model"] = 128
    (path / "config.json").write_text(json.dumps(meta))
    manifest.write(path)
    with pytest.raises(UserError, match="config expects"):
        load(path)


def test_failed_save_leaves_nothing(tmp_path):
    cfg = ModelConfig(preset="debug", vocab_size=100)
    with pytest.raises(FileNotFoundError):
        native.save(GPT(cfg).state_dict(), cfg, tmp_path / "out", tokenizer_path=tmp_path / "missing.model")
    assert list(tmp_path.iterdir()) == []
