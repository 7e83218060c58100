"""manifest.json and config.json: written, extended, verified whole or by rank shares."""

import json

import pytest

from mtnlg_ray.checkpoint import manifest
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.errors import UserError


@pytest.fixture
def directory(tmp_path):
    for name in ("a.bin", "b.bin", "c.bin"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    manifest.write(tmp_path, world_size=2)
    return tmp_path


def test_write_lists_every_file_and_verifies(directory):
    body = json.loads((directory / "manifest.json").read_text())
    assert sorted(body["files"]) == ["a.bin", "b.bin", "c.bin"] and body["world_size"] == 2
    assert manifest.problem(directory) is None
    manifest.verify(directory)


def test_an_added_file_is_listed(directory):
    (directory / "metrics.jsonl").write_text("{}\n")
    manifest.add_file(directory, "metrics.jsonl")
    assert "metrics.jsonl" in json.loads((directory / "manifest.json").read_text())["files"]
    (directory / "metrics.jsonl").write_text("{}\n{}\n")
    assert "metrics.jsonl: sha256 does not match" in manifest.problem(directory)


def test_ranks_check_their_share(directory):
    (directory / "b.bin").write_bytes(b"altered")
    assert manifest.problem(directory, rank=0, world=2) is None  # a.bin, c.bin
    assert "b.bin: sha256 does not match" in manifest.problem(directory, rank=1, world=2)
    with pytest.raises(UserError, match="b.bin: sha256 does not match manifest.json"):
        manifest.verify(directory)
    (directory / "c.bin").unlink()
    assert "c.bin: missing (listed in manifest.json)" in manifest.problem(directory, rank=0, world=2)


def test_missing_or_broken_manifest(directory):
    (directory / "manifest.json").write_text("{not json")
    assert "manifest.json: missing or unreadable" in manifest.problem(directory)
    (directory / "manifest.json").unlink()
    assert "manifest.json: missing or unreadable" in manifest.problem(directory)


def test_config_round_trip_and_version(tmp_path):
    cfg = ModelConfig(preset="debug", vocab_size=300)
    manifest.write_config(tmp_path, {"model": cfg.model_dump(mode="json"), "kind": "pretrain"})
    read, meta = manifest.read_config(tmp_path)
    assert read == cfg and meta["kind"] == "pretrain" and meta["format_version"] == manifest.FORMAT_VERSION
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(UserError, match="format_version 99 \\(expected 1\\)"):
        manifest.read_config(tmp_path)
