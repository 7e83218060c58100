"""Checkpoints on any storage: URIs, listing, fetching into the node cache, verifying, falling back.

The "remote" filesystem is a pyarrow SubTreeFileSystem over a temporary directory: not a
LocalFileSystem, so the same code path as s3:// / gs:// runs (paths relative to the store,
nothing readable in place), with no network.
"""

import json

import pyarrow.fs as pafs
import pytest

from mtnlg_ray.checkpoint import remote, sharded
from mtnlg_ray.errors import UserError
from mtnlg_ray.fileio import file_sha256


def make_run(root, steps=(2, 4), corrupt=()):
    """A run directory of fake checkpoints: a payload file listed with its sha256 in manifest.json."""
    run = root / "runs" / "demo"
    for step in steps:
        d = run / f"checkpoint_{step:08d}_2026-11-29_00-00-0{step}"
        d.mkdir(parents=True)
        (d / "payload.bin").write_bytes(bytes([step]) * 100)
        (d / "manifest.json").write_text(json.dumps({"files": {"payload.bin": file_sha256(d / "payload.bin")}}))
        if step in corrupt:
            (d / "payload.bin").write_bytes(b"altered")
    return run


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "CACHE_ROOT", tmp_path / "cache")


@pytest.mark.parametrize("path, expected", [
    ("s3://bucket/runs", True), ("gs://bucket/runs", True), ("abfs://c@acct.dfs.core.windows.net/r", True),
    ("file:///tmp/runs", False), ("runs", False), ("/mnt/shared/runs", False), ("C:/runs", False),
])
def test_is_uri(path, expected):
    assert remote.is_uri(path) is expected


def test_checkpoint_names_sort_by_step(tmp_path):
    names = [remote.checkpoint_dir_name(s) for s in (3, 12, 7)]
    assert [remote.step_of(n) for n in names] == [3, 12, 7] and remote.step_of("runs/other") == -1
    for n in names:
        (tmp_path / n).mkdir()
    (tmp_path / "not_a_checkpoint").mkdir()
    assert [remote.step_of(p) for p in remote.checkpoints(*remote.open_location(tmp_path))] == [12, 7, 3]


def test_uncommitted_checkpoints_are_ignored_then_dropped(tmp_path):
    """Ray Train's snapshot names the checkpoints it committed; a directory written before a worker
    died, never committed, is invisible to readers and removed on resume."""
    names = [remote.checkpoint_dir_name(s) for s in (2, 4, 6)]
    for n in names:
        (tmp_path / n).mkdir()
    fs, path = remote.open_location(tmp_path)
    assert [remote.step_of(p) for p in remote.checkpoints(fs, path)] == [6, 4, 2]  # no snapshot: all count
    assert remote.drop_uncommitted(fs, path) == [] and len(list(tmp_path.iterdir())) == 3
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in names[:2]]}
    (tmp_path / remote.SNAPSHOT).write_text(json.dumps(snapshot))
    assert [remote.step_of(p) for p in remote.checkpoints(fs, path)] == [4, 2]
    assert remote.drop_uncommitted(fs, path) == [names[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[:2] + [remote.SNAPSHOT])


def test_resume_from_remote_checkpoint_fetches_and_verifies(tmp_path):
    make_run(tmp_path / "store")
    fs = pafs.SubTreeFileSystem(str(tmp_path / "store"), pafs.LocalFileSystem())
    local, skipped = sharded.resolve_resume(fs, "runs/demo/checkpoint_00000004_2026-11-29_00-00-04")
    assert skipped == [] and local.parent == tmp_path / "cache"
    assert (local / "payload.bin").read_bytes() == bytes([4]) * 100
    again, _ = sharded.resolve_resume(fs, "runs/demo/checkpoint_00000004_2026-11-29_00-00-04")
    assert again == local  # fetched once per node


def test_corrupted_remote_latest_falls_back_to_previous(tmp_path):
    make_run(tmp_path / "store", corrupt=(4,))
    fs = pafs.SubTreeFileSystem(str(tmp_path / "store"), pafs.LocalFileSystem())
    local, skipped = sharded.resolve_resume(fs, "runs/demo/checkpoint_00000004_2026-11-29_00-00-04")
    assert (local / "payload.bin").read_bytes() == bytes([2]) * 100
    assert len(skipped) == 1 and "runs/demo/checkpoint_00000004" in skipped[0] and "sha256" in skipped[0]


def test_pick_checkpoint_of_a_run_by_uri(tmp_path):
    run = make_run(tmp_path / "store", steps=(2, 4, 6), corrupt=(6,))
    with pytest.warns(UserWarning, match="checkpoint_00000006.*using checkpoint_00000004"):
        latest = remote.pick_checkpoint(f"file://{run}")
    assert (latest / "payload.bin").read_bytes() == bytes([4]) * 100 and latest.parent == run  # read in place
    assert (remote.pick_checkpoint(f"file://{run}", step=2) / "payload.bin").read_bytes() == bytes([2]) * 100
    with pytest.raises(UserError, match=r"no checkpoint at step 3 \(have steps \[2, 4, 6\]\)"):
        remote.pick_checkpoint(f"file://{run}", step=3)
    with pytest.raises(UserError, match="no checkpoint_"):
        remote.pick_checkpoint(f"file://{tmp_path}/store/runs/missing")
    with pytest.raises(UserError, match="cannot open this storage URI"):
        remote.pick_checkpoint("nosuchscheme://bucket/run")


def test_local_checkpoint_is_read_in_place(tmp_path):
    run = make_run(tmp_path)
    local, skipped = sharded.resolve_resume(pafs.LocalFileSystem(), str(run / "checkpoint_00000004_2026-11-29_00-00-04"))
    assert local == run / "checkpoint_00000004_2026-11-29_00-00-04" and skipped == []
