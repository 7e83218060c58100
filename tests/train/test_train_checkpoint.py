"""Sharded DCP checkpoints in one process: save/load round trip, consolidation, manifests,
corrupted-checkpoint fallback, and the allow-listed reading of DCP's pickled index.
(Checkpoints written by several Ray Train workers are covered in test_loop.py.)"""

import json
import os
import pickle
import shutil

import pytest
import torch

from mtnlg_ray.config import ModelConfig, OptimConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.model.gpt import GPT, lm_loss
from mtnlg_ray.train import checkpoint as ckpt
from mtnlg_ray.train.optim import Optimizers

CFG = ModelConfig(preset="debug", vocab_size=300, max_seq_len=16)


def trained(seed=0, steps=2):
    torch.manual_seed(seed)
    model = GPT(CFG)
    opts = Optimizers([model], OptimConfig(lr=1e-2))
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 9))
        lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
        opts.step()
    return model, opts


def save_into(run_dir, step, model, opts, tokenizer=None):
    local = ckpt.save([model], opts, {"step": step, "consumed_samples": 4 * step, "epoch": 0,
                                      "samples_in_epoch": 4 * step, "tokens": 32 * step},
                      {"model": CFG.model_dump(mode="json"), "kind": "pretrain", "job": {}}, tokenizer)
    out = run_dir / ckpt.checkpoint_dir_name(step)
    shutil.move(local, out)
    return out


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opts = trained()
    torch.manual_seed(123)
    path = save_into(tmp_path, 2, model, opts)
    expected_draw = torch.rand(3)
    assert ckpt.verify_files(path) is None
    assert {".metadata", "__0_0.distcp", "trainer_state.json", "config.json", "manifest.json",
            "rng_rank0.json"} <= set(os.listdir(path))

    fresh, fresh_opts = trained(seed=1, steps=1)
    state = ckpt.load(path, [fresh], fresh_opts)
    assert state["step"] == 2 and state["world_size"] == 1
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = opts.pairs[0][1].state, fresh_opts.pairs[0][1].state
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(sa[pa]["exp_avg_sq"], sb[pb]["exp_avg_sq"]) and torch.equal(sa[pa]["step"], sb[pb]["step"])
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved


def test_load_run_state_consolidates_the_latest_checkpoint(tmp_path, tiny_tokenizer):
    model, opts = trained()
    save_into(tmp_path, 1, *trained(steps=1))
    save_into(tmp_path, 2, model, opts, tokenizer=tiny_tokenizer.path)
    cfg, tensors, tok, meta = ckpt.load_run_state(tmp_path)
    assert cfg == CFG and meta["step"] == 2 and meta["source"] == "run" and tok.name == "tokenizer.model"
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())
    _, older, _, meta1 = ckpt.load_run_state(tmp_path, step=1)
    assert meta1["step"] == 1 and not torch.equal(older["tok_emb.weight"], tensors["tok_emb.weight"])
    with pytest.raises(UserError, match=r"no checkpoint at step 7 \(have steps \[1, 2\]\)"):
        ckpt.load_run_state(tmp_path, step=7)


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    save_into(tmp_path, 1, *trained(steps=1))
    newest = save_into(tmp_path, 2, *trained())
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "sha256 does not match" in ckpt.verify_files(newest)
    with pytest.warns(UserWarning, match=r"skipping a corrupted checkpoint: .*__0_0.distcp.*using checkpoint_00000001"):
        _, _, _, meta = ckpt.load_run_state(tmp_path)
    assert meta["step"] == 1
    path, skipped = ckpt.resolve_resume(newest)  # the in-loop resolver makes the same choice
    assert path.name.startswith("checkpoint_00000001") and "__0_0.distcp" in skipped[0]
    (newest / "manifest.json").unlink()  # an interrupted upload: no manifest at all
    assert "missing or unreadable" in ckpt.verify_files(newest)
    with pytest.raises(UserError, match="sha256|missing"):
        ckpt.load_run_state(newest)


def test_metadata_is_read_with_an_allow_list(tmp_path):
    path = save_into(tmp_path, 1, *trained(steps=1))

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match=r"posix.system is not allowed|os.system is not allowed"):
        ckpt.consolidate(path)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="no checkpoint_"):
        ckpt.load_run_state(tmp_path)
    with pytest.raises(UserError, match="no such run"):
        ckpt.load_run_state(tmp_path / "missing")
    bad = tmp_path / "checkpoint_00000003_x"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(UserError, match="missing or unreadable"):
        ckpt.load_run_state(bad)
