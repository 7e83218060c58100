"""Sharded DCP checkpoints in one process: save/load round trip, consolidation, manifests,
corrupted-checkpoint fallback, and the allow-listed reading of DCP's pickled index.
(Checkpoints written by several Ray Train workers are covered in tests/train/test_loop.py.)"""

import json
import os
import pickle

import pyarrow.fs as pafs
import pytest
import torch
from ckpt_assets import CFG, save_into, trained

from mtnlg_ray.checkpoint import manifest, sharded
from mtnlg_ray.checkpoint.source import Kind, open_source
from mtnlg_ray.errors import UserError


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opts = trained()
    torch.manual_seed(123)
    path = save_into(tmp_path, 2, model, opts)
    expected_draw = torch.rand(3)
    assert manifest.problem(path) is None
    assert {".metadata", "__0_0.distcp", "trainer_state.json", "config.json", "manifest.json",
            "rng_rank0.json"} <= set(os.listdir(path))

    fresh, fresh_opts = trained(seed=1, steps=1)
    state = sharded.load(path, [fresh], fresh_opts.pairs)
    assert state["step"] == 2 and state["world_size"] == 1
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = opts.pairs[0][1].state, fresh_opts.pairs[0][1].state
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(sa[pa]["exp_avg_sq"], sb[pb]["exp_avg_sq"]) and torch.equal(sa[pa]["step"], sb[pb]["step"])
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved


def test_a_run_opens_at_its_latest_checkpoint_consolidated(tmp_path, tiny_tokenizer):
    model, opts = trained()
    save_into(tmp_path, 1, *trained(steps=1))
    save_into(tmp_path, 2, model, opts, tokenizer=tiny_tokenizer.path)
    source = open_source(tmp_path)
    meta, tensors = source.meta(), source.state_dict()
    assert source.kind is Kind.RUN and source.config() == CFG and source.tokenizer_path.name == "tokenizer.model"
    assert meta["step"] == 2 and meta["source"] == "run" and meta["kind"] == "pretrain"
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())
    older = open_source(tmp_path, step=1)
    assert older.meta()["step"] == 1 and not torch.equal(older.state_dict()["tok_emb.weight"], tensors["tok_emb.weight"])
    with pytest.raises(UserError, match=r"no checkpoint at step 7 \(have steps \[1, 2\]\)"):
        open_source(tmp_path, step=7)


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    save_into(tmp_path, 1, *trained(steps=1))
    newest = save_into(tmp_path, 2, *trained())
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "sha256 does not match" in manifest.problem(newest)
    with pytest.warns(UserWarning, match=r"skipping a corrupted checkpoint: .*__0_0.distcp.*using checkpoint_00000001"):
        assert open_source(tmp_path).meta()["step"] == 1
    path, skipped = sharded.resolve_resume(pafs.LocalFileSystem(), str(newest))  # the in-loop choice is the same
    assert path.name.startswith("checkpoint_00000001") and "__0_0.distcp" in skipped[0]
    (newest / "manifest.json").unlink()  # an interrupted upload: no manifest at all
    assert "missing or unreadable" in manifest.problem(newest)
    with pytest.raises(UserError, match="missing or unreadable"):
        open_source(newest)


def test_metadata_is_read_with_an_allow_list(tmp_path):
    path = save_into(tmp_path, 1, *trained(steps=1))

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError, match=r"posix.system is not allowed|os.system is not allowed"):
        sharded.consolidate(path)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="no checkpoint_"):
        open_source(tmp_path)
    bad = tmp_path / "checkpoint_00000003_x"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(UserError, match="missing or unreadable"):
        open_source(bad)
