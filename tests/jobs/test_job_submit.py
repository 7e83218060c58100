"""`ray job submit` of the debug pretraining job to a token-auth head started by this test with
`ray start --head`, with `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN` as the README says.

The head runs in its own process group on free ports (tests/ray_processes.py) and is stopped by
terminating that group, never with `ray stop`. The job is the shipped jobs/configs/pretrain/debug.yaml
with its working dir uploaded from the repository (`--working-dir .`), shortened with --set and
pointed at absolute data and run paths (a job's relative paths resolve inside its uploaded copy).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient
from ray_processes import RAY, LocalCluster

from mtnlg_ray.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_debug_pretraining_job_succeeds_and_writes_where_it_says(cluster_pretrain_data, tmp_path):
    storage = tmp_path / "runs"
    sets = [f"data.datasets=[{{path: {cluster_pretrain_data}}}]", f"scaling.storage_path={storage}",
            "scaling.name=submitted", "train.max_steps=4", "train.log_interval=1", "train.eval_interval=2",
            "checkpoint.interval=2", "train.peak_flops=1e11"]
    entrypoint = [sys.executable, "jobs/pretrain.py", "--config", "jobs/configs/pretrain/debug.yaml"]
    for s in sets:
        entrypoint += ["--set", s]
    with LocalCluster(head_cpus=2, dashboard=True) as cluster:
        address = cluster.head.dashboard_url
        # The head requires its token (as the README says): a client without one, and without a
        # ~/.ray/auth_token to fall back on, is refused; RAY_AUTH_MODE + RAY_AUTH_TOKEN get in.
        no_token = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        refused = subprocess.run([RAY, "job", "list", "--address", address], env={**no_token, "HOME": str(tmp_path)},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower(), refused.stderr[-2000:]
        submit = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", "debug-pretrain",
                                 "--working-dir", ".", "--", *entrypoint],
                                cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=400)
        client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {cluster.token}"})
        status, logs = client.get_job_status("debug-pretrain"), client.get_job_logs("debug-pretrain")
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert status == JobStatus.SUCCEEDED, logs[-4000:]

    # The job said where its outputs went; they are there.
    run_dir = Path(re.search(r"run directory: (\S+)", logs).group(1))
    assert run_dir == storage / "submitted"
    steps, _ = read_metrics(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    latest = Path(re.search(r"latest checkpoint: (\S+)", logs).group(1))
    assert latest.parent == run_dir and latest.name.startswith("checkpoint_00000004")
    assert json.loads((latest / "manifest.json").read_text())["files"]
    for written in re.findall(r"wrote (\S+)", logs):
        assert Path(written).is_file() and Path(written).parent == run_dir
