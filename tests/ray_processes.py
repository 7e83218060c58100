"""Ray nodes started by a test with Ray's own `ray start --block`, and stopped by the test alone.

Each node is one `ray start ... --block` process in its own session (so its own process group),
on ports picked free here, with its own temp dir (`--temp-dir` and RAY_TMPDIR, so nothing is
written to /tmp/ray and no other process's `ray.init()` finds this cluster). Stopping sends
SIGTERM to that process group (ray start's own shutdown path), then SIGKILL to whatever of it and
its descendants is left; it never runs `ray stop` and never touches processes it did not start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """pid -> child pids, from /proc (Linux)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class RayNode:
    """One `ray start --block` process (a head, or a worker joining `address`)."""

    def __init__(self, temp_dir: str, *, head: bool, address: str | None = None, num_cpus: float = 1,
                 dashboard: bool = False, extra: list[str] | None = None, env: dict | None = None,
                 name: str = "head", port: int | None = None):
        self.temp_dir = temp_dir
        self.port = (port or free_port()) if head else None
        self.dashboard_port = free_port() if dashboard else None
        cmd = [RAY, "start", "--block", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        if head:
            cmd += ["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", f"--temp-dir={temp_dir}",
                    f"--ray-client-server-port={free_port()}"]
            cmd += ([f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
                    if dashboard else ["--include-dashboard=false"])
        else:
            cmd += [f"--address={address}", "--node-ip-address=127.0.0.1"]
        cmd += extra or []
        self.env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_ADDRESS": "", **(env or {})}
        self.log = open(Path(temp_dir) / f"ray_start_{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)  # its own process group, stopped by id below

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_started(self, timeout: float = 120) -> None:
        """Until `ray start` prints that the node is up (it then blocks)."""
        deadline = time.monotonic() + timeout
        path = Path(self.log.name)
        while time.monotonic() < deadline:
            if "Ray runtime started" in path.read_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{path.read_text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"ray start not up after {timeout}s:\n{path.read_text()[-3000:]}")

    def terminate(self) -> None:
        """SIGTERM our process group: `ray start --block` then shuts its node down."""
        if self.proc.poll() is None:
            self._tree = descendants(self.proc.pid)
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_stopped(self, timeout: float = 10) -> None:
        """Wait for the clean shutdown, then SIGKILL whatever of our group and descendants is left."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        for pid in [self.proc.pid, *getattr(self, "_tree", [])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()


def fake_multinode_config(gcs_address: str, head_cpus: float, worker_node_types: dict) -> dict:
    """An autoscaler config for `provider: fake_multinode` (as in Ray's fake_multi_node/example.yaml)."""
    return {
        "cluster_name": "fake_multinode",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **worker_node_types,
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


class LocalCluster:
    """A head (and optional worker nodes) on this machine; a context manager that always stops them."""

    def __init__(self, head_cpus: float = 1, worker_cpus: list[float] = (), dashboard: bool = False,
                 autoscaling_node_types: dict | None = None, env: dict | None = None):
        """`autoscaling_node_types`: worker node types for Ray's fake multi-node provider (the autoscaler
        then launches and removes worker nodes on this machine as it would cloud instances)."""
        # Unix socket paths under the temp dir must stay short (< 108 bytes): not pytest's tmp_path.
        self.temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
        # Ray 2.60 turns token auth on for local clusters when ~/.ray/auth_token exists; give this
        # cluster its own token, set on every node and driver, so it never depends on that file.
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, **(env or {})}
        port, extra = free_port(), []
        if autoscaling_node_types is not None:
            path = Path(self.temp_dir) / "autoscaling.json"
            path.write_text(json.dumps(fake_multinode_config(f"127.0.0.1:{port}", head_cpus, autoscaling_node_types)))
            extra = [f"--autoscaling-config={path}"]
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self._head_args = dict(head=True, num_cpus=head_cpus, dashboard=dashboard, extra=extra, env=env, port=port)
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []
        self._worker_cpus = list(worker_cpus)
        self._env = env

    def _start(self, name: str, attempts: int = 3, **node_args) -> RayNode:
        """Start a node, retrying: on a loaded machine a raylet can miss Ray's fixed 30 s registration
        deadline, after which that `ray start` exits (having cleaned up after itself)."""
        for attempt in range(attempts):
            node = RayNode(self.temp_dir, name=f"{name}-{attempt}", **node_args)
            try:
                node.wait_started()
                return node
            except RuntimeError:
                node.wait_stopped(5)
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def __enter__(self) -> "LocalCluster":
        try:
            self.head = self._start("head", **self._head_args)
            for i, cpus in enumerate(self._worker_cpus):  # one at a time: less contention
                self.workers.append(self._start(f"worker{i}", head=False, address=self.head.address,
                                                num_cpus=cpus, env=self._env))
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        nodes = [*self.workers, *([self.head] if self.head else [])]
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait_stopped()
        if not exc or exc[0] is None:  # keep the logs of a failed test for its report
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    @property
    def token(self) -> str:
        return self._env["RAY_AUTH_TOKEN"]

    @property
    def env(self) -> dict:
        """Environment for a driver process that should use this cluster (as `ray job submit` does)."""
        return {**os.environ, **self._env, "RAY_ADDRESS": self.head.address, "RAY_TMPDIR": self.temp_dir}


def write_pretrain_config(path: Path, data: Path, storage: Path, name: str, **sections) -> Path:
    """A debug-preset pretraining YAML on `data` (64-token rows), 2 workers of 0.5 CPU, 4 steps,
    a checkpoint every 2; `sections` override keys per section ({"scaling": {...}})."""
    import yaml

    job = {
        "model": {"preset": "debug", "max_seq_len": 64},
        "data": {"datasets": [{"path": str(data)}]},
        "optim": {"lr": 3e-3},
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "log_interval": 1,
                  "eval_interval": 2, "eval_batches": 1, "peak_flops": 1e11},
        "checkpoint": {"interval": 2, "num_to_keep": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "storage_path": str(storage), "name": name},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
