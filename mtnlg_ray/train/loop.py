"""The function Ray Train runs on every worker: `train_loop(config)`.

    job   <- config["job"] (re-validated: PretrainJob or FinetuneJob, by config["kind"])
    run   <- config["run"] (re-validated: config.WorkerRunConfig, what the driver settled)
    data  <- config["data"]: {"train": BlendedRows, "val": BlendedRows | None} (data/dataset.py)
    model <- parallelize(GPT on meta, mesh from job.parallel); AdamW per part
    state <- the newest valid checkpoint (model, optimizer, step, data position, RNG), if any
    each step: G = the global batch (ramp-up: Megatron's schedule), whatever the worker count
               rows = the next G rows of the stream, dealt out to the dp ranks (batching.py)
               forward/backward of k = ceil(G / (micro_batch x dp)) micro-batches on every rank
               lr from tokens consumed; clip; AdamW; metrics; eval; checkpoint; ray.train.report

Threads: a worker computes with `scaling.threads_per_worker` torch threads, by default the CPUs
of its node shared among the training workers on it, at the driver's priority (`claim_cores`); Ray's CPU
reservation (`cpus_per_worker`) only schedules.

Data: every rank reads the SAME stream: every row of the run, each epoch in a fresh seeded
permutation (data/dataset.py), read by position from memory-mapped row matrices in the worker
itself (no Ray Data during training), and each step takes the next G rows of it;
the position is counted in rows, so G need not be a multiple of anything. `batching.deal` cuts
them, in order and as evenly as possible, into k micro-steps x dp slots, and dp rank r trains on
its slots; the ranks of one tp/pp group (same dp rank) get the same rows. So the rows of step s
depend only on the consumed samples, not on the number of workers: a resumed, restarted or
resized run trains on exactly the same tokens in the same order (Megatron's consumed-samples
sampler does the same over an indexed dataset). The cost is that each rank reads dp x the rows it
trains on, which is small next to the compute (a row of 2049 int32 ids is 8 KiB).

Elastic runs: Ray Train starts (and after a failure or resize restarts) the run with any worker
count in `scaling.num_workers: [min, max]` that the cluster can hold. The global batch, and with
it the optimisation, stays what the config says: each micro-batch's loss is scaled by its share
of the global batch's counted target tokens (batching.py), so the accumulated gradient is the
mean over exactly the G rows whatever dp is (fp32: the same to rounding), and a worker count that
does not divide G only makes some micro-batches a row shorter. The logged loss is the
token-weighted mean over the G rows. What a worker count must satisfy is only structural (the
tp x pp layout divides it): `trainer.check_scaling` checks every count of the range.

Every rank calls `ray.train.report` at the same steps (it is a barrier): each evaluation and each
checkpoint, then wakes the controller to take it (train/controller.py). Not at every log line:
each report is a barrier across the workers and a poll of each worker by the controller, which
its main thread runs beside the training thread; rank 0 writes metrics.jsonl and the step lines
itself.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from mtnlg_ray.checkpoint import manifest, remote, sharded
from mtnlg_ray.checkpoint.remote import checkpoint_dir_name
from mtnlg_ray.checkpoint.source import open_source
from mtnlg_ray.config import FinetuneJob, ModelConfig, PretrainJob, WorkerRunConfig, validate
from mtnlg_ray.data.tokenizer import Tokenizer
from mtnlg_ray.errors import UserError
from mtnlg_ray.malloc import allocator, keep_freed_memory
from mtnlg_ray.model.lora import apply_lora
from mtnlg_ray.parallel import build_mesh, parallelize
from mtnlg_ray.train.batching import accumulate, deal
from mtnlg_ray.train.controller import wake_controller
from mtnlg_ray.train.evaluate import evaluate, load_eval_set, world_mean
from mtnlg_ray.train.metrics import (METRICS_FILE, MetricsLog, flops_per_token, measure_matmul_flops,
                                     token_byte_lengths)
from mtnlg_ray.train.optim import Optimizers
from mtnlg_ray.train.schedule import global_batch_at, in_tokens, lr_at, planned_tokens
from mtnlg_ray.train.stream import TokenStream
from mtnlg_ray.train.trackers import open_trackers
from mtnlg_ray.train.trainer import node_threads

log = logging.getLogger(__name__)
JOBS = {"pretrain": PretrainJob, "finetune": FinetuneJob}
GIL_SWITCH_S = 0.1  # sys.setswitchinterval of a training worker (claim_cores)


@dataclass
class TrainState:
    """What a checkpoint needs beyond weights: the LR schedule and the data position follow from it."""

    step: int = 0
    consumed_samples: int = 0  # rows of the train stream trained on (all ranks together)
    elapsed_s: float = 0.0  # wall seconds since the run started, at the last step


# --------------------------------------------------------------------------------------- setup
def setup_model(job, model_cfg: ModelConfig, device: torch.device):
    """(ParallelDims, Parallelized, Optimizers) for this worker's share of the model."""
    world = ray.train.get_context().get_world_size()
    dims = build_mesh(job.parallel, world, device.type, model_cfg)
    init_state, transform = None, None
    if getattr(job, "init_from", None):
        init_state = open_source(job.init_from).state_dict()
    if getattr(job, "lora", None) is not None:
        transform = functools.partial(apply_lora, cfg=job.lora)
    model = parallelize(model_cfg, dims, job.parallel, device, init_state=init_state, seed=job.train.seed,
                        model_transform=transform, compile_blocks=job.train.compile)
    del init_state
    return dims, model, Optimizers(model.parts, job.optim)


def claim_cores(job, niceness: int) -> int:
    """Set this worker's torch threads; returns their number. scaling.threads_per_worker, or the
    CPUs this process may run on shared among the training workers of its node (Ray sets one
    thread per reserved CPU, so a 0.5-CPU worker would leave the rest of the machine idle). Ray
    also starts workers at niceness 15, below every other process of the machine; a training
    worker is the job itself, so it takes the driver's niceness back when the OS allows it.

    The training thread shares the GIL with the worker's main thread, where Ray checks for
    signals every 10 ms and runs the controller's polls. With Python's 5-ms switch interval that
    thread forces the GIL away from the training thread in the middle of its Python work; with
    GIL_SWITCH_S it waits for the next torch op, which releases the GIL (600-step runs of
    nanoGPT's CPU shape, six rounds in turns: 1.06x the tokens/s, docs/benchmarks.md)."""
    n = job.scaling.threads_per_worker or node_threads(ray.train.get_context().get_local_world_size())
    torch.set_num_threads(n)
    sys.setswitchinterval(GIL_SWITCH_S)
    keep_freed_memory()  # glibc (no jemalloc preloaded): reuse the heap instead of faulting in fresh pages (malloc.py)
    # Linux nices threads one by one: every thread of the worker (torch's pool included) is set.
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tasks:
        try:
            if os.getpriority(os.PRIO_PROCESS, int(tid)) > niceness:
                os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
        except OSError:  # raising priority needs CAP_SYS_NICE (or the thread has ended): keep Ray's
            pass
    return n


def peak_flops_total(job, device: torch.device) -> float:
    """Peak FLOP/s of all devices of the run: train.peak_flops x world, or each rank's measured matmul."""
    world = ray.train.get_context().get_world_size()
    if job.train.peak_flops:
        return job.train.peak_flops * world
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dist.is_initialized() and world > 1:
        dist.barrier()  # measure together: on a shared CPU each rank then gets its own share
    return world_mean([measure_matmul_flops(device, dtype, seconds=0.3)], device)[0] * world


# ----------------------------------------------------------------------------------- the loop
def train_loop(config: dict) -> None:
    job = validate(JOBS[config["kind"]], config["job"], f"{config['kind']} job (worker)")
    run = validate(WorkerRunConfig, config["run"], "run (worker)")
    model_cfg = run.model
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    threads = claim_cores(job, run.niceness)
    device = ray.train.torch.get_device() if job.scaling.use_gpu else torch.device("cpu")
    tc, seq_len = job.train, run.seq_len
    peak = peak_flops_total(job, device)  # first: nothing else of this run uses the cores yet
    eval_set = load_eval_set(config["data"]["val"], tc.micro_batch_size, tc.eval_batches)
    dims, model, optimizers = setup_model(job, model_cfg, device)
    optim = in_tokens(job.optim, tc, seq_len)  # warmup / decay given in steps -> tokens
    mb, dp = tc.micro_batch_size, dims.dp
    metrics_log = MetricsLog(run.metrics_dir) if rank == 0 else None

    state, clock = resume(model, optimizers, metrics_log, run)
    if metrics_log is not None:  # TensorBoard / MLflow / W&B, fed what metrics.jsonl gets (trackers.py)
        metrics_log.trackers = open_trackers(job, config["kind"], run.metrics_dir, state.step)
    torch.manual_seed(tc.seed + 1000 * dims.dp_rank + dims.pp_rank + 7919 * state.step)  # dropout; same over tp
    stream = TokenStream(config["data"]["train"], state.consumed_samples)
    token_bytes = torch.from_numpy(token_byte_lengths(Tokenizer(run.tokenizer_path)))

    total_tokens = planned_tokens(tc, seq_len)
    fpt = flops_per_token(model_cfg, seq_len)
    if metrics_log is not None and state.step == 0:
        metrics_log.write({"event": "start", "threads_per_worker": threads, "world_size": dims.world_size,
                           "niceness": os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None,
                           "allocator": allocator(),
                           "peak_flops": peak, "time": clock()})
    config_json = {"model": model_cfg.model_dump(mode="json"), "kind": config["kind"], "job": config["job"]}
    window = {"tokens": 0, "time": 0.0, "wait": 0.0}
    every = job.checkpoint.interval

    if tc.eval_at_start and state.step == 0 and eval_set:
        record = {"step": 0, "tokens": 0, "time": clock(), **evaluate(model, eval_set, dims, device, token_bytes)}
        if metrics_log is not None:
            metrics_log.write(record)
            _show(_progress_line(record, tc.max_steps))
        report(record, state, False, model, optimizers, config_json, run, metrics_log)

    while state.step < tc.max_steps:
        batch_size = global_batch_at(state.consumed_samples, tc.global_batch_size, tc.rampup)
        lr = lr_at((state.consumed_samples + batch_size) * seq_len, optim, total_tokens)
        t0 = time.perf_counter()
        stream.wait_s = 0.0
        hasher = hashlib.sha256()
        # Every rank reads the whole global batch and keeps its slots; a pipeline needs
        # micro-batches of one shape (its schedule is built per shape), so there they are padded.
        batches = deal(stream.take(batch_size, hasher), mb, dp, dims.dp_rank, pad_to_micro_batch=dims.pp > 1)
        loss_sum = accumulate(model, batches, device)
        grad_norm = model.clip_grad_norm(optim.grad_clip)
        optimizers.set_lr(lr)
        optimizers.step()
        # token-weighted mean over the global batch: sum over dp of each rank's sum / N
        loss = world_mean([float(loss_sum)], device)[0] * dp / batches.global_tokens \
            if batches.global_tokens else float("nan")
        step_time = time.perf_counter() - t0
        state.step += 1
        state.consumed_samples += batch_size
        state.elapsed_s = clock()

        window["tokens"] += batch_size * seq_len
        window["time"] += step_time
        window["wait"] += stream.wait_s
        record = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "batch_size": batch_size,
                  "accumulation": len(batches.micro), "padding_rows": batches.padding_rows,
                  "tokens": state.consumed_samples * seq_len, "epoch": state.consumed_samples / run.train_rows,
                  "world_size": dims.world_size, "tokens_sha": hasher.hexdigest()[:16], "time": state.elapsed_s}
        last = state.step == tc.max_steps
        do_log = state.step % tc.log_interval == 0 or last
        do_eval = (state.step % tc.eval_interval == 0 or last) and bool(eval_set)
        do_ckpt = (every > 0 and state.step % every == 0) or last
        if do_log:
            tps = window["tokens"] / max(window["time"], 1e-9)
            record.update(tokens_per_s=tps, mfu=fpt * tps / peak, data_wait=window["wait"] / max(window["time"], 1e-9))
            window = {"tokens": 0, "time": 0.0, "wait": 0.0}
        if do_eval:
            record.update(evaluate(model, eval_set, dims, device, token_bytes))
        if metrics_log is not None:
            metrics_log.write(record)
            if do_log:
                _show(_progress_line(record, tc.max_steps))
        if do_eval or do_ckpt:  # not every log line: a report is a barrier and a poll (module doc)
            report(record, state, do_ckpt, model, optimizers, config_json, run, metrics_log)
        if tc.kill_at_step == state.step and rank == 0:
            _kill_once(Path(run.metrics_dir), state.step)
    if metrics_log is not None:
        metrics_log.close()


def _show(line: str) -> None:
    """One line to the console. Not print(): Ray Train patches print in workers to write through
    its logger as well as to stdout, so every line would reach the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _progress_line(r: dict, max_steps: int) -> str:
    line = f"step {r['step']}/{max_steps}"
    if "loss" in r:
        line += f"  loss {r['loss']:.4f}  lr {r['lr']:.3g}  grad_norm {r['grad_norm']:.3f}"
    if "tokens_per_s" in r:
        line += f"  {r['tokens_per_s']:,.0f} tok/s  mfu {r['mfu']:.1%}  data_wait {r['data_wait']:.1%}"
    if "val_loss" in r:
        line += f"  val_loss {r['val_loss']:.4f}  val_ppl {r['val_ppl']:.2f}"
        if "val_bpb" in r:
            line += f"  val_bpb {r['val_bpb']:.3f}"
    line += f"  {r['time']:.0f}s"
    return line


def report(record: dict, state: TrainState, with_checkpoint: bool, model, optimizers, config_json: dict,
           run: WorkerRunConfig, metrics_log: MetricsLog | None) -> None:
    """ray.train.report on every rank; with a checkpoint, each rank's shard goes with it. Then the
    controller is woken to take it now, not at its next poll (train/controller.py)."""
    if with_checkpoint:
        _report_checkpoint(record, state, model, optimizers, config_json, run, metrics_log)
    else:
        ray.train.report(record)
    wake_controller()


def _report_checkpoint(record: dict, state: TrainState, model, optimizers, config_json: dict,
                       run: WorkerRunConfig, metrics_log: MetricsLog | None) -> None:
    """ray.train.report with this rank's shard (and rank 0's metrics.jsonl) as the checkpoint."""
    trainer_state = {**asdict(state), "tokens": state.consumed_samples * run.seq_len,
                     "micro_batch_size": config_json["job"]["train"]["micro_batch_size"], "time": time.time(),
                     "run_start": run.start_time, "identity": run.identity}
    local = sharded.save(model.parts, optimizers.pairs, trainer_state, config_json, run.tokenizer_path)
    if metrics_log is not None and metrics_log.path.is_file():
        shutil.copyfile(metrics_log.path, local / METRICS_FILE)  # the run's history travels with it
        manifest.add_file(local, METRICS_FILE)
    try:
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=checkpoint_dir_name(state.step))
    finally:
        shutil.rmtree(local, ignore_errors=True)


def resume(model, optimizers: Optimizers, metrics_log: MetricsLog | None, run: WorkerRunConfig):
    """(TrainState, clock) from the newest valid checkpoint Ray knows of (an older one when it is
    corrupted), else from `run.resume_from` (--resume PATH), or a fresh start. clock() gives
    the run's wall seconds: since the command started (`run.start_time`), plus, when resuming
    a run an earlier command started, the seconds that one had reached at its checkpoint."""
    start = run.start_time
    ctx = ray.train.get_context()
    if metrics_log is not None:  # rank 0; no worker of this run writes a checkpoint before this returns
        storage = ctx.get_storage()
        for name in remote.drop_uncommitted(storage.storage_filesystem, storage.experiment_fs_path):
            log.warning("removed %s: written before a failure, never committed by Ray Train", name)
            metrics_log.write({"event": "checkpoint_dropped", "checkpoint": name, "time": time.time() - start})
    latest = ray.train.get_checkpoint()
    if latest is None and run.resume_from:  # --resume PATH, until the run has checkpoints of its own
        latest = ray.train.Checkpoint(run.resume_from)
    if latest is None:
        return TrainState(), lambda: time.time() - start
    path, skipped = sharded.resolve_resume(latest.filesystem, latest.path)  # remote storage: fetched here first
    for problem in skipped:
        log.warning("skipping a corrupted checkpoint: %s", problem)
        if metrics_log is not None:
            metrics_log.write({"event": "checkpoint_skipped", "reason": problem, "time": time.time() - start})
    if path is None:
        raise UserError(f"{latest.path.rstrip('/').rpartition('/')[0]}: no valid checkpoint to resume from ({'; '.join(skipped)})")
    saved = sharded.load(path, model.parts, optimizers.pairs)
    state = TrainState(step=saved["step"], consumed_samples=saved["consumed_samples"],
                       elapsed_s=saved.get("elapsed_s", 0.0))
    offset = 0.0 if saved.get("run_start") == start else state.elapsed_s

    def clock() -> float:
        return offset + time.time() - start

    if metrics_log is not None:
        metrics_log.write({"event": "resume", "from_step": state.step, "checkpoint": path.name,
                           "world_size": ctx.get_world_size(), "time": clock()})
    return state, clock


def _kill_once(run_dir: Path, step: int) -> None:
    """Fault injection (train.kill_at_step): die like a crashed worker, once per run directory.

    It first waits until Ray has committed the checkpoints reported so far (the controller
    registers a report when it polls the workers), so the recovery point is deterministic."""
    marker = run_dir / f".killed_at_step_{step}"
    if marker.exists():
        return
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
