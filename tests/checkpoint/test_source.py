"""open_source: the kind of every path, the one missing-path message, steps, tokenizers, remote runs.
(Reading each kind's weights is tested beside its format: test_native, test_sharded, test_hf_gpt2.)"""

import pyarrow.fs as pafs
import pytest
import torch
from ckpt_assets import CFG, save_into, trained

from mtnlg_ray.checkpoint import native, remote
from mtnlg_ray.checkpoint.source import NOT_FOUND, Kind, check_exists, open_source
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.errors import PathError, UserError
from mtnlg_ray.model.gpt import GPT


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "runs" / "demo"
    save_into(run, 1, *trained(steps=1))
    save_into(run, 2, *trained())
    return run


def test_a_missing_path_is_one_message(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(PathError) as err:
        open_source(missing)
    assert str(err.value) == f"{missing}: {NOT_FOUND}" and err.value.exit_code == 2
    with pytest.raises(PathError, match=rf"^init_from: {missing}: no such checkpoint, run directory or GPT-2 directory$"):
        check_exists(missing, "init_from")
    check_exists("s3://bucket/run")  # a URI is checked when it is opened


def test_kinds(run, tmp_path, tiny_tokenizer):
    cfg = ModelConfig(preset="debug", vocab_size=tiny_tokenizer.vocab_size)
    exported = native.save(GPT(cfg).state_dict(), cfg, tmp_path / "export", tiny_tokenizer.path)
    newest = remote.checkpoints(*remote.open_location(run))[0]
    assert open_source(exported).kind is Kind.NATIVE and open_source(f"file://{exported}").path == exported
    assert (open_source(run).kind, open_source(run).path.name) == (Kind.RUN, newest.rpartition("/")[2])
    assert open_source(newest).kind is Kind.SHARDED and open_source(newest).config() == CFG
    with pytest.raises(UserError, match="step=1 applies to run directories"):
        open_source(exported, step=1)


def test_tokenizer_is_checked_against_the_model(tmp_path, tiny_tokenizer):
    cfg = ModelConfig(preset="debug", vocab_size=1000)
    path = native.save(GPT(cfg).state_dict(), cfg, tmp_path / "bad", tiny_tokenizer.path)
    with pytest.raises(UserError, match="tokenizer has 512 tokens but the model's vocab_size is 1000"):
        open_source(path).tokenizer()
    plain = native.save(GPT(cfg).state_dict(), cfg, tmp_path / "plain")
    assert open_source(plain).tokenizer_path is None and open_source(plain).tokenizer() is None


def test_a_run_on_remote_storage_is_fetched_and_read_like_a_local_one(run, tmp_path, monkeypatch):
    local = open_source(run, step=1).state_dict()
    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not local: fetched, as from s3://
    monkeypatch.setattr(remote, "CACHE_ROOT", tmp_path / "cache")
    monkeypatch.setattr(remote, "open_location", lambda location: (store, str(location).removeprefix("s3://bucket/")))
    source = open_source("s3://bucket/runs/demo", step=1)
    assert source.kind is Kind.REMOTE and source.path.parent == tmp_path / "cache"
    assert source.meta()["step"] == 1 and source.config() == CFG
    fetched = source.state_dict()
    assert fetched.keys() == local.keys() and all(torch.equal(v, local[k]) for k, v in fetched.items())
