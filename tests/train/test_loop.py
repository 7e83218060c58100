"""Short local Ray Train runs of the debug preset on the built-in corpus (real Ray, real DCP).

One reference run of 2N steps serves every comparison: the loss falls; N steps + stop + resume
N steps reproduce it exactly; an elastic (1, 2)-worker run whose worker is killed mid-run
recovers and trains on exactly the same tokens with the same global batch; a corrupted latest
checkpoint is detected and the previous one used.

The global batch (6 rows, micro-batches of at most 4) divides by neither 4 x 1 nor 4 x 2
workers: one worker runs two micro-batches of 3 rows, two workers one of 3 rows each, and the
checkpoints fall inside a micro-batch read (5 steps = 30 rows = 7 x 4 + 2).
"""

import math
import shutil

import pytest
import torch
from train_jobs import SEQ_LEN, make_job, run_checkpoints

from mtnlg_ray.api import from_pretrained
from mtnlg_ray.checkpoint.remote import step_of
from mtnlg_ray.checkpoint.source import open_source
from mtnlg_ray.cli import main
from mtnlg_ray.data.dataset import open_datasets
from mtnlg_ray.model.gpt import lm_loss
from mtnlg_ray.train.metrics import read_metrics
from mtnlg_ray.train.stream import iter_batches
from mtnlg_ray.train.trainer import run_pretrain

N = 10
GLOBAL = 6
RUN = dict(train={"global_batch_size": GLOBAL, "max_steps": 2 * N, "log_interval": 5, "eval_interval": 10},
           optim={"decay_tokens": 2 * N * GLOBAL * SEQ_LEN},  # the same LR curve for runs of any length
           checkpoint={"interval": 5, "num_to_keep": 2})


def pretrain(data, storage, name, max_steps=2 * N, **sections):
    merged = {k: {**v, **sections.pop(k, {})} for k, v in RUN.items()}
    merged["train"]["max_steps"] = max_steps
    run_pretrain(make_job(data, storage, name, **merged, **sections))
    steps, events = read_metrics(storage / name)
    return steps, events


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(ray_session, pretrain_data, storage):
    steps, _ = pretrain(pretrain_data, storage, "reference")
    return steps


def test_debug_run_learns_and_reports(reference, storage, tmp_path):
    assert [r["step"] for r in reference] == list(range(1, 2 * N + 1))
    first, last = reference[0], reference[-1]
    assert first["loss"] == pytest.approx(math.log(512), abs=0.3)  # uniform over the 512-token vocabulary
    assert last["loss"] < first["loss"] - 0.5
    val = [r["val_loss"] for r in reference if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] < math.log(512)
    assert all((r["batch_size"], r["accumulation"], r["padding_rows"]) == (GLOBAL, 2, 0) for r in reference)
    assert last["tokens"] == 2 * N * GLOBAL * SEQ_LEN
    logged = [r for r in reference if "mfu" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and 0 <= r["data_wait"] <= 1 for r in logged)
    assert (storage / "reference" / "loss.png").stat().st_size > 10_000
    assert [step_of(p) for p in run_checkpoints(storage / "reference")] == [20, 15]  # num_to_keep=2

    assert main(["export", str(storage / "reference"), "--out", str(tmp_path / "export")]) == 0
    tokenizer, model = from_pretrained(tmp_path / "export")
    assert tokenizer.vocab_size == model.config.vocab_size == 512


@pytest.fixture(scope="module")
def resumed(reference, pretrain_data, storage):
    pretrain(pretrain_data, storage, "resumed", max_steps=N)
    return pretrain(pretrain_data, storage, "resumed", max_steps=2 * N)


def test_stop_and_resume_is_exact(reference, resumed):
    steps, events = resumed
    assert [e["from_step"] for e in events if e["event"] == "resume"] == [N]
    assert [r["step"] for r in steps] == [r["step"] for r in reference]
    for ref, got in zip(reference, steps):
        assert got["tokens_sha"] == ref["tokens_sha"], ref["step"]  # the same tokens in the same order
        assert got["lr"] == ref["lr"] and got["tokens"] == ref["tokens"]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6), ref["step"]
    assert steps[-1]["val_loss"] == pytest.approx(reference[-1]["val_loss"], abs=1e-6)


def test_corrupted_latest_checkpoint_is_skipped(resumed, reference, pretrain_data, storage):
    run = storage / "resumed"
    latest, previous = run_checkpoints(run)
    assert (step_of(latest), step_of(previous)) == (2 * N, 3 * N // 2)
    shard = latest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    # a checkpoint written just before a worker died, which Ray Train never committed
    stray = run / f"checkpoint_{2 * N + 1:08d}_uncommitted"
    shutil.copytree(previous, stray)
    assert run_checkpoints(run) == [latest, previous] and open_source(run).meta()["step"] != 2 * N + 1

    steps, events = pretrain(pretrain_data, storage, "resumed", max_steps=2 * N + 2)
    assert [e["checkpoint"] for e in events if e["event"] == "checkpoint_dropped"] == [stray.name]
    assert not stray.exists()
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert len(skipped) == 1 and "sha256 does not match" in skipped[0]["reason"] and latest.name in skipped[0]["reason"]
    assert events[-1]["event"] == "resume" and events[-1]["from_step"] == 3 * N // 2
    redone = {r["step"]: r for r in steps}
    for ref in reference[3 * N // 2:]:  # steps 16..20 trained again from the previous checkpoint
        assert redone[ref["step"]]["loss"] == pytest.approx(ref["loss"], abs=1e-6)
    assert steps[-1]["step"] == 2 * N + 2


def test_elastic_run_survives_a_killed_worker(reference, pretrain_data, storage):
    """Two workers holding every CPU of the session's Ray: they read their rows themselves, so
    nothing else of the run waits for a CPU (when Ray Data streamed the rows, this hung)."""
    kill_at = 7
    steps, events = pretrain(pretrain_data, storage, "elastic", train={"kill_at_step": kill_at},
                             scaling={"num_workers": [1, 2], "max_failures": 1, "cpus_per_worker": 2.0})
    run = storage / "elastic"
    assert (run / f".killed_at_step_{kill_at}").is_file()
    assert [e["from_step"] for e in events if e["event"] == "resume"] == [5]  # the checkpoint before the kill
    (restart,) = [e for e in events if e["event"] == "restart"]  # the controller's restart line, as an event
    assert restart["from_step"] == 5 and restart["failed"]["0"].startswith("died (")
    assert [r["step"] for r in steps] == list(range(1, 2 * N + 1))
    assert max(r["world_size"] for r in steps) == 2
    for ref, got in zip(reference, steps):
        # whatever the worker count: the global batch, its tokens and the LR are those of the reference
        assert (got["batch_size"], got["tokens_sha"], got["lr"]) == (ref["batch_size"], ref["tokens_sha"], ref["lr"])
        assert got["accumulation"] == math.ceil(GLOBAL / (4 * got["world_size"])) and got["padding_rows"] == 0
        assert got["loss"] == pytest.approx(ref["loss"], abs=2e-4)

    # The FSDP-sharded checkpoint consolidates in this one process and gives the reported val loss.
    source = open_source(run)
    assert source.meta()["step"] == 2 * N
    model = source.model()
    bundle = open_datasets(make_job(pretrain_data, storage, "x").data)
    with torch.no_grad():
        losses = [lm_loss(model(b["input_ids"][:, :-1]), b["input_ids"][:, 1:]).item()
                  for b, _ in zip(iter_batches(bundle.val, 4), range(2))]
    assert sum(losses) / len(losses) == pytest.approx(steps[-1]["val_loss"], abs=1e-5)
    shutil.rmtree(run)


def test_evaluation_threads_time_and_final_only_checkpoint(ray_session, pretrain_data, storage):
    """eval_at_start gives a step-0 evaluation; eval_batches: all evaluates every validation row;
    val_bpb is the loss over ln 2 x the bytes of the targets; every record carries the run's wall
    time; threads_per_worker is applied; checkpoint.interval: 0 saves only at the end."""
    from mtnlg_ray.data.tokenizer import Tokenizer
    from mtnlg_ray.train.metrics import token_byte_lengths

    steps, events = pretrain(pretrain_data, storage, "knobs", max_steps=4,
                             train={"eval_at_start": True, "eval_batches": "all", "eval_interval": 2},
                             checkpoint={"interval": 0}, scaling={"threads_per_worker": 1})
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4] and "loss" not in steps[0]
    assert steps[0]["val_loss"] == pytest.approx(math.log(512), abs=0.3)
    times = [r["time"] for r in steps]
    assert times == sorted(times) and 0 < times[0] < times[-1] < 600
    start = [e for e in events if e["event"] == "start"]
    assert len(start) == 1 and start[0]["threads_per_worker"] == 1
    assert [step_of(p) for p in run_checkpoints(storage / "knobs")] == [4]

    # bits per byte over every validation row: the same rows, ids -> UTF-8 bytes of their pieces
    val = open_datasets(make_job(pretrain_data, storage, "x").data).val
    ids = torch.cat([b["input_ids"][:, 1:] for b in iter_batches(val, 4, drop_last=False)])
    nbytes = token_byte_lengths(Tokenizer(pretrain_data / "tokenizer.model"))[ids.numpy()].sum()
    for r in (steps[0], steps[2], steps[4]):
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * ids.numel() / (math.log(2) * nbytes), rel=1e-6)


def test_default_threads_use_the_nodes_cores(reference, storage):
    """One worker on this node computes with all of its cores (Ray alone would give it one), at the
    driver's priority (Ray starts workers at niceness 15) where the OS lets it raise its priority,
    with jemalloc as its allocator (malloc.py)."""
    import os

    _, events = read_metrics(storage / "reference")
    (start,) = [e for e in events if e["event"] == "start"]
    assert start["threads_per_worker"] == len(os.sched_getaffinity(0))
    assert start["allocator"] == "jemalloc"
    if os.geteuid() == 0:  # root may lower niceness; others keep Ray's
        assert start["niceness"] == os.getpriority(os.PRIO_PROCESS, 0)
