"""How the server is deployed: Serve options from a validated ServeJob, the typed app builder, `mtnlg serve`.

`build_app(ServeJob)` is what a Serve config YAML names (`import_path: mtnlg_ray.serve.deploy:build_app`):
Serve validates the YAML's `args` against the annotation, so misspelled keys (which Serve itself
would ignore in autoscaling_config) are refused. `deploy(job)` and `run_serve(job)` (`mtnlg serve`,
whose flags the CLI turns into the ServeJob) check the job, then start or join Ray (RAY_ADDRESS,
else a local instance) and run the application. No `from __future__ import annotations` here:
Serve reads build_app's annotation as a class.

Serve is started with `proxy.CONTROLLER_OPTIONS` (the YAMLs carry the same `controller_options`
block): it installs proxy.py's middleware in Serve's HTTP proxies, so a stream whose replica dies
ends with a final error event and `data: [DONE]` instead of a broken connection. Why the proxy and
not a split into an ingress deployment plus an engine deployment (Ray Serve LLM's layout, where the
ingress catches the engine's death): the proxy is the only process on the connection that
outlives any replica, so it also covers an ingress replica's death; and the split would add a
second Ray hop per streamed chunk, on a path whose per-chunk cost already limits throughput at high
concurrency (README, Results / Serving). The price: it relies on Ray's proxy callback hook, which
Serve reads only when it creates its controller.
"""

import logging
import os
import signal
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from mtnlg_ray import console
from mtnlg_ray.checkpoint.lora_adapter import check_adapters
from mtnlg_ray.checkpoint.source import open_source
from mtnlg_ray.config import ServeJob, ServeConfig, validate
from mtnlg_ray.data.chat import load_chat_template
from mtnlg_ray.errors import UserError
from mtnlg_ray.serve.app import OpenAIServer
from mtnlg_ray.serve.proxy import CONTROLLER_OPTIONS
from mtnlg_ray.serve.router import PrefixAffinityRouter

log = logging.getLogger(__name__)
APP_NAME = "mtnlg"
# Ray Serve's documented throughput setting (Performance Tuning): the replica runs our handlers on its
# own event loop instead of a second loop thread, which saves two thread hand-offs per streamed chunk.
# Safe here: every route is async and the model steps in the engine process.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
DRAIN_POLL_S = 0.5  # a stopping replica checks this often whether its in-flight requests are done (Serve: 2 s)


def deployment_options(cfg: ServeConfig) -> dict:
    """Serve options of the deployment, all from the validated ServeConfig."""
    a = cfg.autoscaling
    env = dict(REPLICA_ENV)
    if os.environ.get("MTNLG_API_KEY"):  # the builder's key reaches the replicas
        env["MTNLG_API_KEY"] = os.environ["MTNLG_API_KEY"]
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "runtime_env": {"env_vars": env}}
    return dict(
        autoscaling_config=dict(min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                                target_ongoing_requests=a.target_ongoing_requests,
                                upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": cfg.retry_after_s},
        health_check_period_s=cfg.health_check_period_s,
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        ray_actor_options=actor,
        **({"request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter)}
           if cfg.prefix_affinity_routing else {}),
    )


def build_app(args: ServeJob) -> Application:
    """Typed app builder: `serve run` / `serve deploy` validate the YAML's `args` as a ServeJob."""
    job = args if isinstance(args, ServeJob) else validate(ServeJob, dict(args), "serve args")
    if job.serve.chat_template:  # a template file is read here: replicas on other nodes need not see it
        job.serve.chat_template = load_chat_template(job.serve.chat_template)
    return OpenAIServer.options(**deployment_options(job.serve)).bind(job.serve.model_dump(mode="json"))


def check_job(job: ServeJob) -> None:
    """Refuse, in one line and before Ray starts, a checkpoint no replica could load (else Serve retries its
    constructor over and over), a LoRA adapter that is not a LoRA run of the served model, and a chat
    template that is missing or does not compile. No weights are loaded; a run's checkpoint is chosen by
    its manifest, and one on remote storage is fetched to this node."""
    path = job.serve.checkpoint
    source = open_source(path)
    if source.tokenizer_path is None:
        raise UserError(f"{path}: has no tokenizer.model; the server needs a tokenizer to read text")
    check_adapters(job.serve.lora_adapters, source.config())
    load_chat_template(job.serve.chat_template)


def deploy(job: ServeJob, name: str = APP_NAME) -> str:
    """Deploy `job` on Ray Serve (joining RAY_ADDRESS, else starting a local Ray); return the base URL.

    Serve's HTTP proxy listens on serve.host:serve.port; port 0 picks a free port. When this call
    starts Serve, its proxies get proxy.py's middleware (a Serve already running keeps its own).
    """
    check_job(job)
    start_ray()
    return _run_app(job, name)


def _run_app(job: ServeJob, name: str) -> str:
    import socket

    cfg = job.serve
    port = cfg.port
    if port == 0:
        with socket.socket() as sock:
            sock.bind((cfg.host, 0))
            port = sock.getsockname()[1]
    # Serve's controller and proxy INFO lines (and its start-up lines here) only with -v; the
    # replicas' access log is the deployment's own and stays
    logging.getLogger("ray.serve").setLevel(console.ray_log_level())
    serve.start(http_options={"host": cfg.host, "port": port}, controller_options=CONTROLLER_OPTIONS,
                logging_config={"log_level": logging.getLevelName(console.ray_log_level())})
    serve.run(build_app(job), name=name, route_prefix="/")
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{host}:{port}"


def start_ray() -> None:
    """Join RAY_ADDRESS, else start a local Ray (once per process)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", configure_logging=False)


def shutdown() -> None:
    """Remove every Serve application and Serve's proxy and controller (Ray itself keeps running)."""
    serve.shutdown()


def run_serve(job: ServeJob) -> None:
    """`mtnlg serve`: deploy, print the URL, serve until SIGINT (Ctrl-C) or SIGTERM; then drain and stop.

    On either signal the application is deleted first: Serve's proxy stays up while each replica
    finishes its in-flight requests (at most serve.graceful_shutdown_timeout_s, checked every
    DRAIN_POLL_S), then Serve and the local Ray stop and the command returns (exit 0). Our handlers
    replace Ray's, whose SIGTERM handler aborts the driver with a native stack dump. A signal during
    start-up stops at once (KeyboardInterrupt); a second one while draining changes nothing.
    """
    import ray

    check_job(job)  # before Ray starts
    start_ray()  # ray.init installs its own handlers: ours go in after it
    serving, stop = threading.Event(), threading.Event()
    received: list[str] = []  # the first signal's name

    def on_signal(signum, frame):  # main thread, between bytecodes: no logging here (its locks)
        if not serving.is_set():
            raise KeyboardInterrupt  # still starting: stop at once
        if not stop.is_set():
            received.append(signal.Signals(signum).name)
            stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = _run_app(job, APP_NAME)
        serving.set()
        log.info("serving %s from %s at %s/v1 (Ctrl-C to stop)", job.serve.model_name, job.serve.checkpoint, url)
        while not stop.wait(3600):
            pass
        log.info("%s: finishing in-flight requests (at most %g s), then shutting down", received[0],
                 job.serve.graceful_shutdown_timeout_s)
        started = time.monotonic()
        serve.delete(APP_NAME)  # returns once every replica has drained (or hit its timeout) and stopped
        log.info("drained in %.1f s", time.monotonic() - started)
    finally:
        shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
