"""Where a training run keeps its checkpoints: a place every node of the Ray cluster can reach.

Ray Train workers write their checkpoint shards from whatever node they run on, into
`RunConfig(storage_path)`. A plain local directory only works when every worker is on the
same machine as the driver: on a multi-node cluster each node would write its shards into
its own disk, and resume (or export) would find an incomplete checkpoint.
`check_storage_path` applies one rule, before the trainer starts:

1. A URI with a scheme (`s3://`, `gs://`, `abfs://`, `hdfs://`, ... anything `pyarrow.fs`
   resolves, except `file://`) is accepted as is: cloud storage is reachable from every node.
2. A local path (or `file://`) is made absolute and accepted when one of these holds:
   a. the run stays on one node: the Ray cluster has a single alive node and it can hold all
      the workers at their maximum count (so the autoscaler has no reason to add nodes);
   b. the path lies on a network filesystem (nfs, cifs, lustre, gpfs, ceph, ...) according to
      this (the driver's) node's /proc/mounts: a shared mount, assumed mounted at the same
      path on every node, as the cluster YAMLs in clusters/ set it up;
   c. the config declares it shared: `scaling.shared_storage: true` (e.g. a shared mount of a
      type not detected, or every "node" on one machine as in the tests).
   Otherwise it is refused with a one-line `UserError` saying what to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mtnlg_ray.checkpoint.remote import is_uri
from mtnlg_ray.errors import UserError

# Filesystem types (the third field of /proc/mounts) that are shared between machines.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
    "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.mount-s3",
})


def run_location(storage_path: str, name: str) -> str:
    """Where a run's checkpoints go: `storage_path/name`, a URI or an absolute local path. Asks no
    Ray (whether a local path may be used at all is `check_storage_path`'s question)."""
    if is_uri(storage_path):
        return storage_path.rstrip("/") + "/" + name
    return os.path.join(os.path.abspath(os.path.expanduser(storage_path.removeprefix("file://"))), name)


def mount_fstype(path: str | Path, mounts_file: str = "/proc/mounts") -> str | None:
    """Filesystem type of the mount holding `path` (its nearest existing ancestor); None if unknown."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:  # not Linux: nothing detected, rule 2c still applies
        return None
    best, fstype = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces in mount points as \040
        point = fields[1].replace("\\040", " ")
        inside = str(p) == point or str(p).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def _cluster_view(need: Mapping[str, float] | None) -> tuple[int, str | None]:
    """(alive nodes, reason the run leaves this node or None), from the Ray this driver uses."""
    import ray

    if not ray.is_initialized():
        # TorchTrainer.fit() would connect (or start a local Ray) the same way a moment later.
        ray.init()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        return len(nodes), f"the Ray cluster has {len(nodes)} alive nodes"
    here = ray.get_runtime_context().get_node_id()
    have = next((n["Resources"] for n in nodes if n["NodeID"] == here), {})
    for key, amount in (need or {}).items():
        if amount > have.get(key, 0) + 1e-9:
            return len(nodes), (f"the workers need {key}={amount:g} but this node has {have.get(key, 0):g}, "
                                "so the autoscaler would add nodes")
    return len(nodes), None


def check_storage_path(storage_path: str, *, shared: bool = False,
                       need: Mapping[str, float] | None = None) -> str:
    """Return the storage path to hand to `RunConfig`, or raise `UserError` (rule: module docstring).

    `shared`: the config's `scaling.shared_storage`. `need`: the resources of all the run's workers
    at their maximum count, e.g. {"CPU": 2 * 0.5, "GPU": 0}; used to tell a run that fits on this
    node from one that makes the autoscaler add nodes.
    """
    if is_uri(storage_path):
        return storage_path
    local = os.path.abspath(os.path.expanduser(storage_path.removeprefix("file://")))
    if shared or mount_fstype(local) in NETWORK_FS:
        return local
    _, spans = _cluster_view(need)
    if spans is None:
        return local
    raise UserError(
        f"scaling.storage_path: {storage_path!r} is a local path, but this run spans nodes ({spans}): "
        "checkpoints written on the other nodes would be lost. Use cloud storage (s3://BUCKET/runs, "
        "gs://BUCKET/runs), a path on a shared filesystem (NFS), or set scaling.shared_storage: true "
        "if this path is the same shared mount on every node")
