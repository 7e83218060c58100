"""What a person sees when a training run fails, restarts or ends: one line each, the rest in files.

    the run is over    error: training failed: worker rank 0 raised UserError: MESSAGE
                       (mtnlg_ray/train/loop.py:293); traceback: RUN_DIR/error.log
    Ray restarts it    restart 1 of 2: worker rank 0 died (ActorDiedError: pid 4242, node 10.0.0.5;
                       Worker unexpectedly exits ...) (2 workers failed); resuming from step 5
    the run ends       trained to step 20/20 in 41 s; 1 restart after a failure (tracebacks: RUN_DIR/error.log)

Ray Train reports a failed run as `WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]: Traceback ...`, cut before the cause, and hands the driver each worker's
bare exception. The trainer's train function is wrapped by `with_traceback`, so the exception
carries its formatted traceback across. `fit_and_report` takes the root exception of each failed
worker (its type, message and the deepest frame in this package), prefers a worker's own
exception to a dead process and both to the communication errors they cause in the other ranks,
raises `TrainingFailed` (exit 1, or the code of the worker's UserError) with that in one line, and
appends every failed worker's traceback to RUN_DIR/error.log (also shown with -v).

`RunMonitor` is a Ray Train callback (Ray passes RunConfig callbacks of its developer-API kinds
to the controller and to each worker): in the controller it prints a restart line, appends the
failure to error.log and a `restart` event to metrics.jsonl (which `fit_and_report` counts); it
follows the checkpoints as they are reported, which is where a restart resumes from. Unless -v,
it keeps three of Ray Train's console messages to its log files (QUIET): the worker's "Error in
training function" traceback (the final line says it, error.log holds it), the controller's
traceback when a crashed worker group cannot shut its backend down (expected after a crash), and
the controller's traceback when the placement-group cleaner takes longer to stop than Ray waits
(GetTimeoutError, harmless: the cleaner removes the group once the controller has exited).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import textwrap
import time
import traceback
from pathlib import Path

import ray
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback, WorkerCallback

from mtnlg_ray import console
from mtnlg_ray.config import WorkerRunConfig
from mtnlg_ray.errors import UserError

log = logging.getLogger(__name__)

ERROR_LOG = "error.log"
WORKER_LINES_S = 0.5  # seconds for the workers' last console lines to reach the driver (await_worker_lines)
TRACEBACK_ATTR = "mtnlg_traceback"  # set on a worker's exception by `keep_traceback`
PACKAGE = "mtnlg_ray"
FRAME = re.compile(r'File "([^"]+)", line (\d+), in ')
COMMUNICATION = re.compile(r"gloo|nccl|connection closed|connection reset|broken pipe|DistBackendError|"
                           r"CollectiveTimeout|timed out", re.I)
# Ray Train console messages kept to its log files unless -v (see the module doc)
QUIET = {"ray.train.v2._internal.util": "Error in training function",
         "ray.train.v2._internal.callbacks.placement_group_callback": "Failed to stop PlacementGroupCleaner",
         "ray.train.v2._internal.callbacks.backend_setup": "Graceful shutdown of backend failed"}


class TrainingFailed(UserError):
    """A training run that Ray Train gave up on; its message is the root cause in one line."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def keep_traceback(train_fn, config: dict) -> None:
    """Run the train function; an exception leaves it carrying its formatted traceback (an attribute
    travels with the pickled exception, while Ray Train hands the driver only the bare exception
    and a cut snippet of the text)."""
    try:
        train_fn(config)
    except BaseException as err:
        try:
            setattr(err, TRACEBACK_ATTR, traceback.format_exc())
        except (AttributeError, TypeError):  # an exception type without __dict__
            pass
        raise


def with_traceback(train_fn):
    """`train_fn` for TorchTrainer, its exceptions carrying their tracebacks (`keep_traceback`)."""
    wrapped = functools.partial(keep_traceback, train_fn)
    wrapped.__name__ = train_fn.__name__  # Ray Train names the function in its logs
    return wrapped


class Failure:
    """One failed worker: its root exception, the traceback text where one exists, and where it was raised."""

    def __init__(self, rank: int | None, exc: BaseException):
        self.rank, self.traceback, self.process = rank, None, None
        if isinstance(exc, WorkerHealthCheckFailedError):  # the worker process is gone
            self.process = exc.health_check_failure
            exc = exc.health_check_failure
        if isinstance(exc, UserExceptionWithTraceback):  # raised in the train function
            self.traceback, exc = exc._traceback_str, exc._base_exc
        self.traceback = getattr(exc, TRACEBACK_ATTR, None) or self.traceback
        cause = getattr(exc, "cause", None)  # RayTaskError: the task's own exception
        if isinstance(cause, BaseException):
            self.traceback = self.traceback or str(exc)
            exc = cause
        for _ in range(20):  # raise X from Y: Y is the root
            if exc.__cause__ is None:
                break
            exc = exc.__cause__
        self.exc = exc

    @property
    def died(self) -> bool:
        return self.process is not None

    def where(self) -> str | None:
        """path:line of the deepest frame in this package (else the deepest frame) of the traceback."""
        frames = FRAME.findall(self.traceback or "")
        ours = [(f, n) for f, n in frames if f"/{PACKAGE}/" in f]
        if not (ours or frames):
            return None
        path, line = (ours or frames)[-1]
        return f"{path[path.rfind(f'/{PACKAGE}/') + 1:] if ours else path}:{line}"

    def summary(self) -> str:
        """What happened, in one line: `raised TYPE: message (path:line)`, or for a process that is
        gone `died (TYPE: pid, node: exit detail)`."""
        text = str(self.exc)
        if self.died:
            pid, ip = re.search(r"pid: (\d+)", text), re.search(r"ip: (\S+)", text)
            detail = re.search(r"Worker exit detail: (.*?)(?: Some common causes| There are some potential|$)",
                               text, re.S)
            where = ", ".join(x for x in (pid and f"pid {pid.group(1)}", ip and f"node {ip.group(1)}") if x)
            what = "; ".join(x for x in (where, detail and " ".join(detail.group(1).split())) if x)
            return f"died ({type(self.exc).__name__}{': ' + what if what else ''})"
        at = self.where()
        return f"raised {type(self.exc).__name__}: {textwrap.shorten(text, 300) or '(no message)'}" + \
            (f" ({at})" if at else "")

    def who(self) -> str:
        return f"worker rank {self.rank}" if self.rank is not None else "the Ray Train controller"

    def report(self) -> str:
        """The full text for error.log."""
        body = self.traceback or f"{type(self.exc).__name__}: {self.exc}"
        return f"--- {self.who()} {self.summary()}\n{body.rstrip()}\n"


def failures(err: BaseException) -> list[Failure]:
    """The failures in a Ray Train error, root cause first (see the module doc)."""
    found = [Failure(rank, exc) for rank, exc in sorted(getattr(err, "worker_failures", {}).items())]
    if not found:
        found = [Failure(None, getattr(err, "controller_failure", err))]

    def order(f: Failure):
        comm = bool(COMMUNICATION.search(f"{type(f.exc).__name__} {f.exc}")) and not f.died
        return (comm, f.died, f.rank or 0)

    return sorted(found, key=order)


def append_error_log(run_dir: Path, heading: str, found: list[Failure]) -> Path:
    path = Path(run_dir) / ERROR_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {heading}\n" + "".join(x.report() for x in found) + "\n")
    return path


def restarts_since(run_dir: Path, run_start: float) -> list[dict]:
    """The `restart` events the controller wrote for the command that started at `run_start`."""
    from mtnlg_ray.train.metrics import read_metrics  # torch: not at import, the driver may not need it

    return [e for e in read_metrics(run_dir)[1] if e["event"] == "restart" and e.get("run_start") == run_start]


def fit_and_report(trainer):
    """trainer.fit(), with a failed run raised as one line (TrainingFailed) and the restarts summed up."""
    from ray.train import TrainingFailedError

    run = WorkerRunConfig.model_validate(trainer.train_loop_config["run"])
    run_dir, start, max_steps = Path(run.metrics_dir), run.start_time, \
        trainer.train_loop_config["job"]["train"]["max_steps"]
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        await_worker_lines()
        found = failures(err)
        path = append_error_log(run_dir, "training failed", found)
        if console.verbose():
            log.error("%s", "".join(f.report() for f in found).rstrip())
        root = found[0]
        more = f" ({len(found)} workers failed)" if len(found) > 1 else ""
        n = len(restarts_since(run_dir, start))
        after = f" after {_count(n, 'restart')}" if n else ""
        raise TrainingFailed(f"training failed{after}: {root.who()} {root.summary()}{more}; traceback: {path}",
                             getattr(root.exc, "exit_code", 1)) from None
    await_worker_lines()
    n = len(restarts_since(run_dir, start))
    step = (result.metrics or {}).get("step")
    log.info("trained to step %s/%d in %.0f s; %s", step if step is not None else "?", max_steps,
             time.time() - start, f"{_count(n, 'restart')} after a failure (tracebacks: {run_dir / ERROR_LOG})"
             if n else "no restarts")
    return result


def await_worker_lines() -> None:
    """Let the workers' last console lines reach this driver before its own closing line. Ray
    forwards them through its log monitor, which reads the workers' log files every 0.1 s, while
    `fit()` returns as soon as the train function has ended (train/controller.py). Nothing to wait
    for when the driver does not print the workers' output (ray.init(log_to_driver=False))."""
    printer = getattr(ray._private.worker.global_worker, "logger_thread", None)
    if printer is not None and printer.is_alive():
        time.sleep(WORKER_LINES_S)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def starting_step(job, resume_from: str | None) -> int:
    """The step of the checkpoint a run starts from (0: none), as --resume found it before Ray started."""
    from mtnlg_ray.train.resume import resume_target

    try:
        saved, _ = resume_target(job, resume_from or "auto")
    except Exception:  # noqa: BLE001 - only the restart lines use it
        return 0
    return saved.step if saved is not None else 0


class _Hide(logging.Filter):
    """Drops the QUIET messages from a console handler (the file handlers keep them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        start = QUIET.get(record.name)
        return start is None or not str(record.msg).startswith(start)


def _quiet_console() -> None:
    for handler in logging.getLogger("ray.train").handlers:
        if type(handler).__name__ == "PlainRayHandler" and not any(isinstance(f, _Hide) for f in handler.filters):
            handler.addFilter(_Hide())


class RunMonitor(ControllerCallback, ReportCallback, WorkerCallback):
    """Restart lines and events in the controller; quiet Ray Train consoles (see the module doc)."""

    def __init__(self, run_dir: str | Path, run_start: float, max_failures: int, start_step: int = 0):
        self.run_dir, self.run_start, self.max_failures = Path(run_dir), run_start, max_failures
        self.step = start_step  # of the checkpoint a restart resumes from
        self.verbose = console.verbose()
        self.restarts = 0

    # -- worker and controller: after Ray Train configured their loggers
    def after_init_train_context(self):
        if not self.verbose:
            _quiet_console()

    def after_controller_start(self, train_run_context):
        if not self.verbose:
            _quiet_console()

    # -- controller
    def after_report(self, training_report, metrics):
        if training_report.checkpoint is not None and metrics and "step" in metrics[0]:
            self.step = metrics[0]["step"]

    def after_controller_state_update(self, previous_state, current_state):
        err = getattr(current_state, "training_failed_error", None)
        if err is None or type(current_state).__name__ not in ("RestartingState", "ReschedulingState"):
            return
        self.restarts += 1
        try:  # an exception here would fail the controller, and the run with it
            self._report_restart(err)
        except Exception as report_err:  # noqa: BLE001
            sys.stderr.write(f"restart {self.restarts}: could not report it ({type(report_err).__name__}: "
                             f"{report_err})\n")

    def _report_restart(self, err) -> None:
        found = failures(err)
        append_error_log(self.run_dir, f"restart {self.restarts}", found)
        of = f" of {self.max_failures}" if self.max_failures > 0 else ""
        where = f"step {self.step}" if self.step else "the start (no checkpoint yet)"
        sys.stderr.write(f"restart {self.restarts}{of}: {found[0].who()} {found[0].summary()}"
                         f"{' (' + str(len(found)) + ' workers failed)' if len(found) > 1 else ''}; "
                         f"resuming from {where}\n")
        sys.stderr.flush()
        event = {"event": "restart", "restart": self.restarts, "from_step": self.step, "run_start": self.run_start,
                 "failed": {str(f.rank): f.summary() for f in found}, "time": time.time() - self.run_start}
        with open(self.run_dir / "metrics.jsonl", "a") as f:  # metrics.METRICS_FILE (which imports torch)
            f.write(json.dumps(event) + "\n")
