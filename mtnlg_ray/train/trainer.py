"""The one place that builds Ray Train objects: `build_trainer(job)` and `run_pretrain(job)`.

    bundle   = open_datasets(job.data, planned)      blended, seeded rows: every row of the run
    trainer  = Trainer(train_loop, ...)               ScalingConfig: N or (min, max) workers, CPU/GPU each
                                                      TorchProcessGroup: gloo / nccl (train/backend.py)
                                                      RunConfig: storage_path/name, keep K, max_failures
    result   = trainer.fit()                          resumes when storage_path/name has checkpoints

Before Ray starts, `run_pretrain` runs train/preflight.py: the dataset directories, the model
against their tokenizer and rows, and --resume with its compatibility check (train/resume.py).
What needs the cluster is refused here, before any worker starts, with one line:
the parallel layout for every worker count the run may get (an elastic [min, max] run may start
with any count in the range), the micro-batch against the pipeline's chunks, the model against
the dataset's tokenizer and sequence length. Batch sizes need not divide by micro-batch x dp: the
loop deals any global batch out to any number of ranks (batching.py). The workers read their rows
themselves (data/dataset.py), so they may take every CPU of the cluster: nothing else of the run
needs one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import ray.train
from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE, get_env_vars_to_propagate
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from mtnlg_ray import console, malloc
from mtnlg_ray.checkpoint.remote import is_uri
from mtnlg_ray.config import FinetuneJob, ModelConfig, PretrainJob, WorkerRunConfig
from mtnlg_ray.data.dataset import open_datasets
from mtnlg_ray.errors import ConfigError, UserError
from mtnlg_ray.parallel.mesh import check_layout, resolve_dims
from mtnlg_ray.train.backend import TorchProcessGroup
from mtnlg_ray.train.controller import PromptController, wake_controller
from mtnlg_ray.train.failures import RunMonitor, fit_and_report, starting_step, with_traceback
from mtnlg_ray.train.local_ray import scaling_policy
from mtnlg_ray.train.plot import plot_run
from mtnlg_ray.train.preflight import Start, model_config, plan_pretrain
from mtnlg_ray.train.resume import identity
from mtnlg_ray.train.schedule import planned_samples
from mtnlg_ray.train.storage import check_storage_path
from mtnlg_ray.train.trackers import check_installed

log = logging.getLogger(__name__)


def ensure_ray(log_to_driver: bool = True) -> None:
    """Join the cluster of RAY_ADDRESS (as under `ray job submit`), else start a local Ray for
    training. `log_to_driver=False` leaves the workers' lines in their log files."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, log_to_driver=log_to_driver, **console.ray_init_args(address, prestart=False))
    console.quiet_ray_data()


def worker_range(job) -> tuple[int, int]:
    n = job.scaling.num_workers
    return (n, n) if isinstance(n, int) else tuple(n)


def check_scaling(job, model_cfg: ModelConfig, seq_len: int | None = None) -> None:
    """What every worker count the (elastic) run may get must satisfy: only structure.

    Ray Train V2 starts an elastic run with any count in [min, max] that the cluster holds (and
    restarts it with another after a failure), so every count of the range must fit the
    tp x pp layout. The global batch need not divide by anything (batching.py)."""
    lo, hi = worker_range(job)
    p, tc = job.parallel, job.train
    for world in range(lo, hi + 1):
        try:
            resolve_dims(p, world)
        except ConfigError as err:
            if lo == hi:
                raise ConfigError(f"{err} (scaling.num_workers: {world})") from None
            raise ConfigError(f"scaling.num_workers: [{lo}, {hi}] lets Ray Train run with {world} workers, which "
                              f"the layout cannot use ({err}); Ray may pick any count in an elastic range, so "
                              f"list only counts the layout fits, or a fixed num_workers") from None
    check_layout(model_cfg, p, lo)  # model against tp / pp: the same for every count
    if p.pp > 1 and tc.micro_batch_size % p.pp_microbatches:
        raise ConfigError(f"train.micro_batch_size: {tc.micro_batch_size} does not split into "
                          f"parallel.pp_microbatches={p.pp_microbatches} equal pipeline chunks")
    if p.sequence_parallel and p.tp > 1 and seq_len is not None and seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel: tp={p.tp} must divide the dataset's sequence length {seq_len}")
    smallest = min(tc.global_batch_size, tc.rampup.start if tc.rampup else tc.global_batch_size)
    most_dp = resolve_dims(p, hi)[1]
    if smallest < most_dp:
        log.warning("train: a global batch of %d rows leaves %d of the %d data-parallel ranks of %d workers "
                    "without a row (they run on padding)", smallest, most_dp - smallest, most_dp, hi)


def scaling_config(job) -> ScalingConfig:
    s = job.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker or 1
    workers = s.num_workers if isinstance(s.num_workers, int) else tuple(s.num_workers)
    return ScalingConfig(num_workers=workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                         placement_strategy=s.placement_strategy)


def node_threads(workers_on_node: int) -> int:
    """A worker's default torch threads: the CPUs this process may run on shared among the
    training workers of its node (loop.claim_cores applies it in the worker)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, workers_on_node))


def train_loop(config: dict) -> None:
    """Ray Train's function per worker: loop.train_loop, imported there. The driver never needs
    the loop's model, parallelism and checkpoint code (DTensor, pipelining, DCP: 1-2 s to import).
    Its end, returned or raised, wakes the controller (train/controller.py)."""
    from mtnlg_ray.train.loop import train_loop as run_loop

    try:
        run_loop(config)
    finally:
        wake_controller(final=True)


def worker_threads_env(job) -> dict[str, str]:
    """OMP_NUM_THREADS for the training workers: the thread count claim_cores (loop.py) will give
    them, known here when scaling.threads_per_worker is set or the cluster is this machine alone.
    Without it Ray starts a 0.5-CPU worker with OMP_NUM_THREADS=1, and OpenMP initialised for one
    thread runs the steps of a later torch.set_num_threads(n) 2-4% slower than when it starts with n."""
    n = job.scaling.threads_per_worker
    nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
    if n is None and nodes == [ray.get_runtime_context().get_node_id()]:
        n = node_threads(worker_range(job)[1])
    return {} if n is None else {"OMP_NUM_THREADS": str(n)}


def run_dir_of(job) -> tuple[str, Path]:
    """(storage path for RunConfig, local directory for metrics.jsonl / plots)."""
    s = job.scaling
    hi = worker_range(job)[1]
    need = {"CPU": hi * s.cpus_per_worker, "GPU": hi * ((s.gpus_per_worker or 1) if s.use_gpu else 0)}
    storage = check_storage_path(s.storage_path, shared=s.shared_storage, need=need)
    if is_uri(storage):
        return storage, Path.home() / "mtnlg_runs" / s.name  # metrics also travel inside each checkpoint
    return storage, Path(storage) / s.name


class Trainer(DataParallelTrainer):
    """Ray Train's trainer, with a controller that its workers wake (train/controller.py), without
    its placement-group cleaner on a cluster that has no dashboard, without the autoscaling
    request of a fixed-size run on a Ray this process started (train/local_ray.py), and without
    the Ray Data callback: the workers read their rows themselves (data/dataset.py), and the
    callback would start a dataset-manager actor for no dataset (a process, and about 140 wake-ups
    a second beside the training threads).

    The cleaner (an actor, Ray 2.60) asks the state API every second whether the controller is
    alive, to remove the placement group of one that died. The state API is served by the
    dashboard, so without one every query fails and the cleaner can never act, while it costs a
    process started beside the controller, about 150 wake-ups a second beside the training
    threads, and up to a second at the end of every run (its stop waits out a 1 s poll). A Ray that
    `mtnlg` starts has no dashboard unless asked (`mtnlg --dashboard`); when the driver exits, that
    Ray stops and the placement group goes with it."""

    def _create_default_callbacks(self):
        dashboard = bool(ray._private.worker.get_dashboard_url())
        return [c for c in super()._create_default_callbacks()
                if not (isinstance(c, PlacementGroupCleanerCallback) and not dashboard)
                and not (isinstance(c, DatasetsCallback) and not self.datasets)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        # DataParallelTrainer's, with a controller that polls when a worker wakes it
        # (train/controller.py) and, on a Ray started here, a fixed-size run that asks no
        # autoscaler for nodes (train/local_ray.py)
        controller_init_kwargs["scaling_policy"] = scaling_policy(controller_init_kwargs["scaling_policy"])
        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
        node = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}  # beside the driver
        actor_cls = ray.remote(num_cpus=0, label_selector=node, runtime_env={"env_vars": env_vars})(PromptController)
        controller = actor_cls.remote(**controller_init_kwargs)
        if threading.current_thread() is threading.main_thread():  # Ctrl-C aborts the run (not under Tune)
            self._register_sigint_handler(controller)
        ray.get(controller.run.remote())
        return ray.get(controller.get_result.remote())


def build_trainer(job: PretrainJob | FinetuneJob, bundle=None, callbacks=None,
                  resume_from: str | None = None) -> Trainer:
    """A Ray Train trainer running `train_loop` for `job` (datasets: `bundle`, default open_datasets(job.data)).
    `callbacks`: Ray Train callbacks (fine-tuning's Tune trials pass one that forwards reports to Tune).
    `resume_from`: a checkpoint the workers start from while the run has none of its own (--resume PATH)."""
    start_time = time.time()
    check_installed(job.train.loggers)
    ensure_ray()
    kind = "finetune" if isinstance(job, FinetuneJob) else "pretrain"
    if bundle is None and kind == "finetune":
        raise UserError("build_trainer: a fine-tuning job needs its DatasetBundle")
    planned = planned_samples(job.train)
    if bundle is None or bundle.train_samples < planned:  # the train stream holds every row of the run
        bundle = open_datasets(bundle.config if bundle is not None else job.data, planned)
    model_cfg = model_config(job, bundle.vocab_size, bundle.seq_len, bundle.tokenizer_path)
    check_scaling(job, model_cfg, bundle.seq_len)
    if job.checkpoint.interval == 0:
        log.warning("checkpoint.interval: 0 saves a checkpoint only at the end of the run; a failure before "
                    "then restarts it from scratch")
    storage, metrics_dir = run_dir_of(job)
    run = WorkerRunConfig(
        model=model_cfg, seq_len=bundle.seq_len, tokenizer_path=str(Path(bundle.tokenizer_path).resolve()),
        train_rows=bundle.train_rows, metrics_dir=str(metrics_dir),
        start_time=start_time, niceness=os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0,
        identity=identity(job, model_cfg.model_dump(mode="json"), bundle.manifests[0]["tokenizer_sha256"],
                          bundle.seq_len, bundle.manifests),
        resume_from=resume_from)
    # Ray hands it over as a dict; the worker validates both halves again (loop.py) and reads the
    # rows of the data streams itself (a few hundred bytes each until a worker builds its index)
    config = {"kind": kind, "job": job.model_dump(mode="json"), "run": run.model_dump(mode="json"),
              "data": {"train": bundle.train, "val": bundle.val}}
    run_config = RunConfig(
        name=job.scaling.name, storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.num_to_keep),
        failure_config=FailureConfig(max_failures=job.scaling.max_failures),
        # restart lines and events, quiet Ray Train consoles (train/failures.py)
        callbacks=[*(callbacks or []), RunMonitor(metrics_dir, start_time, job.scaling.max_failures,
                                                  starting_step(job, resume_from))],
        # Ray Train's own INFO lines (worker group start, one per report) only with -v
        logging_config=LoggingConfig(log_level=logging.getLevelName(console.ray_log_level())),
        # the thread count OpenMP starts with, and jemalloc as the allocator (malloc.py)
        worker_runtime_env={"env_vars": {**worker_threads_env(job), **malloc.worker_env()}},
    )
    return Trainer(with_traceback(train_loop), train_loop_config=config,
                   backend_config=TorchProcessGroup(backend="nccl" if job.scaling.use_gpu else "gloo"),
                   scaling_config=scaling_config(job), run_config=run_config)


def run_of(trainer: Trainer) -> WorkerRunConfig:
    """The run `build_trainer` settled for `trainer`."""
    return WorkerRunConfig.model_validate(trainer.train_loop_config["run"])


def run_pretrain(job: PretrainJob, resume: str | Start = "auto", stop_ray: bool = False) -> ray.train.Result:
    """Train (or resume) `job` on Ray Train; writes metrics.jsonl and loss.png in the run directory.
    `resume`: auto, never or a checkpoint path (train/resume.py), or the Start that
    `preflight.plan_pretrain` returned for it (the CLI checks before importing Ray). `stop_ray`:
    the caller is done with Ray (the CLI); it stops while the plot is drawn (about 1 s of waiting
    for Ray's processes to exit that the command would otherwise add at its end)."""
    start = resume if isinstance(resume, Start) else plan_pretrain(job, resume)
    trainer = build_trainer(job, resume_from=start.resume_from)
    metrics_dir = Path(run_of(trainer).metrics_dir)
    log.info("run directory: %s (checkpoints, metrics.jsonl, loss.png)", metrics_dir)
    result = fit_and_report(trainer)  # a failed run: one line naming the root cause
    with ThreadPoolExecutor(1) as pool:
        plotted = pool.submit(plot_run, metrics_dir)
        if stop_ray:
            ray.shutdown()
        for path in plotted.result():
            log.info("wrote %s", path)
    if result.checkpoint is not None:
        log.info("latest checkpoint: %s\nexport it with: mtnlg export %s --out %s/export", result.checkpoint.path,
                 metrics_dir, metrics_dir)
    return result
