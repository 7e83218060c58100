"""The shared-storage rule for run directories (train/storage.py), on the session's one-node Ray.

The multi-node refusal itself runs on a real 3-node cluster in tests/clusters/test_multinode.py.
"""

import os

import pytest

from mtnlg_ray.errors import UserError
from mtnlg_ray.train.storage import check_storage_path, mount_fstype


def test_mount_fstype_picks_the_longest_mount_point(tmp_path):
    # Mount points exist on a real machine; here they are directories under tmp_path.
    root = tmp_path.resolve()
    for d in ("shared/scratch", "sharedother", "my efs"):
        (root / d).mkdir(parents=True)
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        f"10.0.0.5:/export {root}/shared nfs4 rw,vers=4.1 0 0\n"
        f"tmpfs {root}/shared/scratch tmpfs rw 0 0\n"
        f"fs-1:/ {root}/my\\040efs nfs4 rw 0 0\n")
    assert mount_fstype(root / "shared/runs/not/yet/created", str(mounts)) == "nfs4"
    assert mount_fstype(root / "shared/scratch/x", str(mounts)) == "tmpfs"
    assert mount_fstype(root / "sharedother/x", str(mounts)) == "ext4"
    assert mount_fstype(root / "my efs/runs", str(mounts)) == "nfs4"
    assert mount_fstype(tmp_path) is not None  # the real /proc/mounts of this machine


def test_uris_pass_unchanged_and_local_paths_become_absolute(ray_session, tmp_path, monkeypatch):
    assert check_storage_path("s3://bucket/mtnlg/runs", need={"GPU": 64}) == "s3://bucket/mtnlg/runs"
    monkeypatch.chdir(tmp_path)
    assert check_storage_path("runs", need={"CPU": 1.0}) == os.path.join(str(tmp_path), "runs")
    assert check_storage_path(f"file://{tmp_path}/r") == f"{tmp_path}/r"


def test_local_path_refused_when_the_run_leaves_this_node(ray_session, tmp_path):
    # The session Ray is one node with 4 CPUs and no GPU: 4 workers x 2 CPUs (or any GPU) would need
    # more nodes, which would each write their own local copy of the run directory.
    for need in ({"CPU": 8.0}, {"CPU": 1.0, "GPU": 8}):
        with pytest.raises(UserError) as err:
            check_storage_path(str(tmp_path / "runs"), need=need)
        line = str(err.value)
        assert line.startswith("scaling.storage_path: ") and "s3://" in line and "shared_storage" in line
        assert "\n" not in line
    # Declared shared: accepted as is (absolute).
    assert check_storage_path(str(tmp_path / "runs"), shared=True, need={"CPU": 8.0}) == str(tmp_path / "runs")
