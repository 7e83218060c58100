"""Multi-node pretraining on one machine, on Ray clusters started with Ray's own `ray start`.

The pytest process already holds the session's local Ray, so each run is a separate driver process
(`mtnlg pretrain CONFIG` with RAY_ADDRESS set, as on a real cluster); another small driver then
reads the cluster's GCS tables to see where Ray placed the Train workers.
"""

import json
import subprocess
import sys
from pathlib import Path

from ray_processes import LocalCluster, write_pretrain_config

from mtnlg_ray.train.metrics import read_metrics

MTNLG = str(Path(sys.executable).with_name("mtnlg"))

# Prints {"nodes": {node_id: {"alive", "cpus"}}, "train_workers": [node_id, ...]} for the cluster.
PLACEMENT = """
import json, ray
ray.init(log_to_driver=False)
nodes = {n["NodeID"]: {"alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes()}
actors = ray._private.state.actors().values()
workers = [a["Address"]["NodeID"] for a in actors if a["ActorClassName"] == "RayTrainWorker"]
print("PLACEMENT " + json.dumps({"nodes": nodes, "train_workers": workers}))
"""


def run(cmd: list[str], cluster: LocalCluster, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=timeout)


def placement(cluster: LocalCluster) -> dict:
    out = run([sys.executable, "-c", PLACEMENT], cluster, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("PLACEMENT ", 1)[1])


def pretrain(cluster: LocalCluster, config: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [MTNLG, "pretrain", str(config)]
    for s in sets:
        cmd += ["--set", s]
    return run(cmd, cluster)


def test_pretraining_spreads_over_two_worker_nodes(cluster_pretrain_data, tmp_path):
    storage = tmp_path / "shared" / "runs"  # one filesystem: every "node" of this cluster sees it
    config = write_pretrain_config(tmp_path / "multinode.yaml", cluster_pretrain_data, storage, "spread",
                                   scaling={"placement_strategy": "SPREAD"})
    # Head with 0 CPUs (as in clusters/*.yaml): the two Train workers can only go to the worker nodes.
    with LocalCluster(head_cpus=0, worker_cpus=[2, 2]) as cluster:
        # The YAML's plain local path, not declared shared, on three live nodes: refused with one
        # line, before anything is written.
        refused = pretrain(cluster, config)
        assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
        assert "error: scaling.storage_path:" in refused.stderr and "the Ray cluster has 3 alive nodes" in refused.stderr
        assert not (storage / "spread").exists()

        first = pretrain(cluster, config, "scaling.shared_storage=true")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert f"run directory: {storage / 'spread'}" in first.stdout

        where = placement(cluster)
        head = [n for n, info in where["nodes"].items() if info["cpus"] == 0]
        assert len(where["train_workers"]) == 2 and len(set(where["train_workers"])) == 2  # SPREAD
        assert not set(where["train_workers"]) & set(head)

    steps, _ = read_metrics(storage / "spread")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    checkpoints = sorted(p.name[:19] for p in (storage / "spread").glob("checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_00000002", "checkpoint_00000004"]  # on the shared storage


def test_autoscaler_adds_a_node_for_workers_the_head_cannot_hold(cluster_pretrain_data, tmp_path):
    # Ray's fake multi-node provider: the autoscaler launches worker nodes on this machine as it
    # would cloud instances. The head offers 1 CPU; two Train workers of 1 CPU need another node.
    node_types = {"cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1}}
    storage = tmp_path / "runs"
    config = write_pretrain_config(tmp_path / "autoscale.yaml", cluster_pretrain_data, storage, "grow",
                                   scaling={"cpus_per_worker": 1.0, "shared_storage": True})
    with LocalCluster(head_cpus=1, autoscaling_node_types=node_types) as cluster:
        result = pretrain(cluster, config)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        after = placement(cluster)

    steps, _ = read_metrics(storage / "grow")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # The test started the head alone (1 CPU); the 2-CPU node is the one the autoscaler launched.
    by_cpus = {info["cpus"]: node for node, info in after["nodes"].items()}
    assert len(after["nodes"]) == 2 and set(by_cpus) == {1, 2}
    assert after["train_workers"] == [by_cpus[2], by_cpus[2]]
