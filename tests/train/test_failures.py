"""failures.py: a failed run is one line naming the root cause, restarts are one line each, a clean
run prints no traceback.

The Ray Train errors are built here as Ray builds them (WorkerGroupError of per-rank exceptions);
two `mtnlg pretrain` processes (a clean 2-step run, then one that fails in a worker) show what a
user's console gets, which only a process of its own shows (workers and the controller print
through Ray's log forwarding). The kill-and-restart path is in test_loop.py's elastic run.
"""

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2._internal.execution.controller.state import RestartingState
from train_jobs import make_job

from mtnlg_ray import console
from mtnlg_ray.config import ModelConfig, PretrainJob, WorkerRunConfig, dump_yaml, validate
from mtnlg_ray.errors import ConfigError
from mtnlg_ray.train.failures import ERROR_LOG, RunMonitor, TrainingFailed, failures, fit_and_report, keep_traceback
from mtnlg_ray.train.metrics import read_metrics

DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tpid: 4242\n"
        "\tip: 10.0.0.5\nThe actor is dead because its worker process has died. Worker exit type: "
        "UNEXPECTED_SYSTEM_EXIT Worker exit detail: Worker unexpectedly exits with a connection error code 2. "
        "End of file. There are some potential root causes. (1) The process is killed by SIGKILL ...")


def raised_in_our_code() -> ConfigError:
    """A worker's exception as the driver gets it: raised in mtnlg_ray/config/ under the trainer's
    train function (keep_traceback), pickled by Ray."""
    try:
        keep_traceback(lambda config: validate(PretrainJob, config, "job (worker)"), {"train": {"max_steps": -1}})
    except ConfigError as err:
        return pickle.loads(pickle.dumps(err))


def worker_group_error() -> WorkerGroupError:
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")  # rank 0's echo in rank 1
    died = WorkerHealthCheckFailedError("A worker health check failed.", RuntimeError(DIED))
    return WorkerGroupError("[Rank 0 Error Snippet]: Traceback ... [...]", {1: gloo, 0: raised_in_our_code(), 2: died})


def test_root_cause_first_with_type_message_and_our_line():
    root, died, comm = failures(worker_group_error())
    assert (root.rank, died.rank, comm.rank) == (0, 2, 1)  # the exception, the dead process, its echo
    assert re.fullmatch(r"raised ConfigError: job \(worker\): train.max_steps: .* \(mtnlg_ray/config/load\.py:\d+\)",
                        root.summary()), root.summary()
    assert "Traceback (most recent call last)" in root.report()
    assert died.summary() == ("died (RuntimeError: pid 4242, node 10.0.0.5; Worker unexpectedly exits with a "
                              "connection error code 2. End of file.)")


class FakeTrainer:
    """What fit_and_report reads of a TorchTrainer, with a fit() that fails like Ray Train's."""

    def __init__(self, run_dir: Path, error=None):
        run = WorkerRunConfig(model=ModelConfig(preset="debug", vocab_size=512), seq_len=64, tokenizer_path="t.model",
                              train_rows=64, metrics_dir=str(run_dir), start_time=time.time())
        self.train_loop_config = {"run": run.model_dump(mode="json"), "job": {"train": {"max_steps": 6}}}
        self.error = error

    def fit(self):
        if self.error:
            raise self.error
        return SimpleNamespace(metrics={"step": 6})


def test_a_restart_is_one_line_and_an_event_and_the_end_counts_it(tmp_path, capsys, caplog):
    trainer = FakeTrainer(tmp_path)
    monitor = RunMonitor(tmp_path, trainer.train_loop_config["run"]["start_time"], max_failures=2, start_step=3)
    monitor.after_report(SimpleNamespace(checkpoint=object()), [{"step": 5}, {"step": 5}])
    monitor.after_report(SimpleNamespace(checkpoint=None), [{"step": 6}, {"step": 6}])  # an evaluation only
    monitor.after_controller_state_update(None, RestartingState(training_failed_error=worker_group_error()))
    line = capsys.readouterr().err
    assert line.startswith("restart 1 of 2: worker rank 0 raised ConfigError: job (worker): train.max_steps")
    assert line.endswith("(3 workers failed); resuming from step 5\n") and line.count("\n") == 1
    (event,) = [e for e in read_metrics(tmp_path)[1] if e["event"] == "restart"]
    assert event["from_step"] == 5 and set(event["failed"]) == {"0", "1", "2"}
    assert "Traceback" in (tmp_path / ERROR_LOG).read_text()

    caplog.set_level("INFO", logger="mtnlg_ray")
    fit_and_report(trainer)
    assert "trained to step 6/6 in" in caplog.text and "1 restart after a failure" in caplog.text


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_run_raises_one_line_and_writes_error_log(tmp_path, caplog, verbose):
    console.configure(1 if verbose else 0)
    try:
        with pytest.raises(TrainingFailed) as info:
            fit_and_report(FakeTrainer(tmp_path, worker_group_error()))
    finally:
        console.configure(0)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2  # the worker's ConfigError keeps its code
    assert message.startswith("training failed: worker rank 0 raised ConfigError: job (worker): train.max_steps")
    assert re.search(r"\(mtnlg_ray/config/load\.py:\d+\) \(3 workers failed\); traceback: .*error\.log$", message)
    log = (tmp_path / ERROR_LOG).read_text()
    assert log.count("--- worker rank") == 3 and "validate" in log and "Connection closed by peer" in log
    ours = "".join(r.getMessage() for r in caplog.records if r.name.startswith("mtnlg_ray"))
    assert ("Traceback (most recent call last)" in ours) == verbose


# ------------------------------------------------------------------ the console of `mtnlg pretrain`
def mtnlg(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    return subprocess.run([sys.executable, "-m", "mtnlg_ray.cli", *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def clean_run(pretrain_data, tmp_path_factory):
    """A 2-step run with a checkpoint at each step, beside the test session's own Ray (a second
    Ray on the machine, as with a `mtnlg serve` running)."""
    root = tmp_path_factory.mktemp("cli_runs")
    job = make_job(pretrain_data, root / "runs", "clean", train={"max_steps": 2, "eval_interval": 2},
                   checkpoint={"interval": 1})
    dump_yaml(job, root / "job.yaml")
    return root, mtnlg("pretrain", "job.yaml", cwd=root)


def test_a_clean_run_prints_no_traceback_and_writes_tensorboard(clean_run):
    root, res = clean_run
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "Error" not in out, out[-3000:]
    assert re.search(r"trained to step 2/2 in \d+ s; no restarts", res.stdout)
    assert out.count("step 1/2  loss") == 1, out[-3000:]  # each progress line once, not also via a logger
    from test_trackers import tensorboard_scalars

    scalars = tensorboard_scalars(root / "runs" / "clean")
    assert sorted(scalars["train/loss"]) == [1, 2] and list(scalars["val/loss"]) == [2]


def test_a_worker_exception_is_one_line_naming_our_file_and_line(clean_run):
    """--resume PATH to a checkpoint whose shard was altered after its manifest: the worker verifies
    it and raises UserError in loop.py; the CLI's last line says so, error.log holds the traceback."""
    import shutil

    root, _ = clean_run
    (ckpt,) = [p for p in (root / "runs" / "clean").glob("checkpoint_*") if p.name.startswith("checkpoint_00000002")]
    bad = root / "bad" / ckpt.name
    shutil.copytree(ckpt, bad)
    shard = bad / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))

    res = mtnlg("pretrain", "job.yaml", "--set", "scaling.name=failed", "--resume", str(bad), cwd=root)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: training failed: worker rank 0 raised UserError: .*bad: no valid checkpoint to "
                        r"resume from .*sha256 does not match.* \(mtnlg_ray/train/loop\.py:\d+\); traceback: "
                        r".*/runs/failed/error\.log", last), last
    log = (root / "runs" / "failed" / ERROR_LOG).read_text()
    assert "Traceback (most recent call last)" in log and "in resume" in log
