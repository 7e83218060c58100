"""Deployment: the shipped Serve config YAMLs validate (Serve's schema + our ServeJob through Serve's own
typed-builder call), misspelled keys are refused, options reach the deployment, and `mtnlg serve`
parses its flags and really serves (its own local Ray, in a subprocess) until SIGTERM or Ctrl-C,
then finishes the request in flight and exits 0 within its bound."""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "jobs/configs/serve/serve_config.yaml"


def test_serve_configs_validate_and_misspelled_keys_are_refused():
    from pydantic import ValidationError
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from mtnlg_ray.config import ServeJob, load_job
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.serve.deploy import build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    for app_cfg in config.applications:
        job = ServeJob.model_validate(app_cfg.args)
        dep = call_user_app_builder_with_args_if_necessary(build_app, app_cfg.args)._bound_deployment
        auto = dep._deployment_config.autoscaling_config
        assert (auto.min_replicas, auto.max_replicas) == (job.serve.autoscaling.min_replicas,
                                                          job.serve.autoscaling.max_replicas)
        assert dep.max_ongoing_requests == job.serve.max_ongoing_requests
        assert dep._deployment_config.max_queued_requests == job.serve.max_queued_requests
        assert dep.ray_actor_options["num_cpus"] == job.serve.num_cpus
    load_job(ROOT / "jobs/configs/serve/debug.yaml", ServeJob)

    bad = copy.deepcopy(config.applications[0].args)
    bad["serve"]["autoscaling"]["min_replica"] = 1  # Serve itself would silently ignore this
    with pytest.raises(ValidationError, match="min_replica"):
        call_user_app_builder_with_args_if_necessary(build_app, bad)
    with pytest.raises(ConfigError, match="serve.autoscaling.min_replica: unknown key"):
        build_app(bad)
    too_many = {"serve": {"checkpoint": "x", "max_batch_slots": 2, "max_waiting": 2, "max_ongoing_requests": 8}}
    with pytest.raises(ConfigError, match="max_ongoing_requests=8 exceeds"):
        build_app(too_many)


def test_mtnlg_serve_args(tiny_checkpoint, tmp_path):
    from mtnlg_ray.cli import build_parser
    from mtnlg_ray.serve.flags import serve_job
    from mtnlg_ray.errors import ConfigError, UserError
    from mtnlg_ray.serve.deploy import check_job

    def job_of(*flags, checkpoint=str(tiny_checkpoint)):
        return serve_job(build_parser().parse_args(["serve", checkpoint, *flags]))

    flags = ["--config", str(ROOT / "jobs/configs/serve/debug.yaml"), "--host", "0.0.0.0", "--port", "9123",
             "--min-replicas", "2", "--set", "serve.max_batch_slots=4"]
    job = job_of(*flags, "--max-replicas", "3")
    cfg = job.serve
    assert (cfg.checkpoint, cfg.host, cfg.port, cfg.max_batch_slots) == (str(tiny_checkpoint), "0.0.0.0", 9123, 4)
    assert (cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas) == (2, 3)
    check_job(job)
    with pytest.raises(ConfigError, match="max_replicas=1 < min_replicas=2"):
        job_of(*flags, "--max-replicas", "1")
    with pytest.raises(UserError, match="no such checkpoint"):
        check_job(job_of(*flags, checkpoint="/no/such/dir"))
    with pytest.raises(UserError, match="no checkpoint_"):  # a directory that is not any checkpoint
        check_job(job_of(*flags, checkpoint=str(tmp_path)))
    # a Serve YAML's adapters are checked as --lora-modules are (else the replica's constructor fails forever)
    with pytest.raises(UserError, match=r"serve.lora_adapters.sql: .*not a LoRA fine-tune run"):
        check_job(job_of(*flags, "--lora-modules", f"sql={tiny_checkpoint}"))


def test_mtnlg_serve_command_serves_until_sigterm_and_drains(tiny_checkpoint, port):
    import subprocess
    import sys
    import threading

    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own local Ray, never a cluster another process started
    cmd = [sys.executable, "-m", "mtnlg_ray.cli", "serve", str(tiny_checkpoint), "--port", str(port),
           "--set", "serve.num_cpus=0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("serving ") or not line:
                break
        assert f"http://127.0.0.1:{port}/v1" in lines[-1], "".join(lines[-20:])
        body = {"model": "mtnlg", "prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}
        first, events = threading.Event(), []

        def stream():  # in flight when the signal comes: it must finish, not be cut
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    events.append(line)
                    first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        # SIGTERM (Kubernetes, systemd), then Ctrl-C's SIGINT while draining: one handler for both, and a
        # second signal does not cut the drain short. Bound: serve.graceful_shutdown_timeout_s (5 s) to
        # drain, then Serve and the local Ray stop (about 5 s idle on 2 cores).
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        took = time.time() - sent
        reader.join(10)
        out = proc.stdout.read()
        assert took < 25, f"stopped after {took:.1f} s"
        data = [e for e in events if e.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and len(data) == 101 and "error" not in "".join(data), data[-2:]
        assert "SIGTERM: finishing in-flight requests" in out and "drained in" in out, out[-2000:]
        assert "SIGTERM received" not in out and "Traceback" not in out, out[-2000:]  # Ray's handler: none
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
