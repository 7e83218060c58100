"""What a person sees: the library's status lines through `logging`, Ray's own output kept quiet.

Every module reports through `log = logging.getLogger(__name__)` and never prints (the exceptions:
a Ray Train worker's step line, and a command's result such as generated text). `configure` (the
CLI and the job entrypoints call it once) shows the `mtnlg_ray` records as plain lines, as print
did: below WARNING on stdout, warnings and errors on stderr.

    verbosity  -1  -q   warnings and errors only
                0       what each stage does and what it wrote (INFO)
                1  -v   + DEBUG lines, Ray's and Ray Train's INFO lines, Ray Data's progress reports

Ray Data reports every execution (its plan, a start line and, with stdout not a terminal, a
progress log line every few seconds per operator): thousands of lines for one preprocess. Unless
verbose, `quiet_ray_data` turns that off in this process and the environment set by `configure`
turns it off in the workers a local Ray starts (they inherit the driver's environment; workers of
a cluster started elsewhere keep that cluster's settings). A Dataset captures the current
DataContext when it is created (`ds.context`), and Ray Train the driver's when the trainer is
built, so `quiet_ray_data` runs right after Ray starts, before either. Ray itself, Ray Train
(RunConfig's LoggingConfig, train/trainer.py) and Serve's controller and proxy (serve/deploy.py)
log at `ray_log_level()`: warnings unless verbose.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "mtnlg_ray"  # the package's logger: every module's logger is below it
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
# Read by Ray Data at import in every process that inherits them: no progress reports, and only
# errors (a worker would otherwise warn once that progress bars are off; the driver, where
# quiet_ray_data runs, shows warnings).
QUIET_RAY_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "ERROR"}
# Settings of a local Ray (one machine, often a laptop) started here, in the environment its
# processes inherit. Every periodic wake-up of a Ray process preempts a training thread on a machine
# whose cores all train, and an OpenMP step waits for its slowest thread: Ray's log monitor globs
# its log directory 10 times a second (here: once a second, new workers' lines still reach the
# console within a second) and the raylet checks for garbage 10 times a second (here: 1). No
# preemption watcher (an autoscaler drains cloud nodes, never this one). Ray Train's controller
# keeps its default poll of the workers every 2 s (a worker's report or its end waits for the next
# poll): each poll runs an actor method in the training worker beside the training thread, and
# polling every 0.5 s cost 10% of the nanoGPT shape's tokens/s (docs/benchmarks.md).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                 "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "1",
                 "RAY_raylet_check_gc_period_milliseconds": "1000", "RAY_kill_idle_workers_interval_ms": "1000"}
# Whether a local Ray starts its dashboard (`mtnlg --dashboard`). Off by default: its half-dozen
# processes take seconds of a 2-core machine's start-up and a steady share of its CPU while
# training; without it, nothing collects Ray's and Ray Train's metrics either (NO_DASHBOARD_ENV).
dashboard = False
NO_DASHBOARD_ENV = {"RAY_enable_metrics_collection": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
# A local Ray for training starts no idle workers for the driver's first tasks: Ray prestarts one
# per CPU with the job's runtime environment, but Ray Train's controller and workers each carry one
# of their own (their environment variables), so Ray starts fresh processes for them and the
# prestarted ones only import Ray beside the start-up and then wake ~140 times a second each.
NO_PRESTART_ENV = {"RAY_prestart_worker_first_driver": "0"}


class ConsoleHandler(logging.StreamHandler):
    """Plain `%(message)s` lines to the current sys.stdout (below WARNING) or sys.stderr, looked
    up per record so that redirections made later (pytest's capture, contextlib) see them."""

    def __init__(self):
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        super().emit(record)


def configure(verbosity: int = 0) -> None:
    """Show the library's records at `LEVELS[verbosity]` (idempotent: one handler however often called)."""
    log = logging.getLogger(ROOT)
    log.setLevel(LEVELS[max(-1, min(1, verbosity))])
    for handler in [h for h in log.handlers if isinstance(h, ConsoleHandler)]:
        log.removeHandler(handler)
    log.addHandler(ConsoleHandler())
    if verbosity < 1:
        for key, value in QUIET_RAY_ENV.items():
            os.environ.setdefault(key, value)  # a value the user set wins


def verbose() -> bool:
    """True under -v (the package logs DEBUG): Ray and Ray Data report as they do by default."""
    return logging.getLogger(ROOT).isEnabledFor(logging.DEBUG)


def ray_log_level() -> int:
    """The level of Ray's own loggers (`ray`, Ray Train's): INFO only when verbose."""
    return logging.INFO if verbose() else logging.WARNING


def ray_init_args(address: str | None = None, prestart: bool = True) -> dict:
    """`ray.init` keyword arguments: Ray's own INFO start-up lines only when verbose. A Ray this
    process starts (`address` "local") runs `quiet_worker` (verbose: `pin_address`) in each of its
    workers, has the dashboard only with `--dashboard` (`dashboard`), and runs Ray with the settings
    of LOCAL_RAY_ENV; with `prestart=False` (training) it starts no idle workers
    (NO_PRESTART_ENV). (A cluster's job may carry a runtime_env of its own, which a second one in
    ray.init would conflict with, and a cluster keeps its own settings.)"""
    args = {"logging_level": ray_log_level()}
    if address == "local":
        args["include_dashboard"] = dashboard
        env = {**LOCAL_RAY_ENV, **({} if dashboard else NO_DASHBOARD_ENV), **({} if prestart else NO_PRESTART_ENV)}
        for key, value in env.items():
            os.environ.setdefault(key, value)  # the processes of the Ray started here inherit it
        hook = "pin_address" if verbose() else "quiet_worker"
        args["runtime_env"] = {"worker_process_setup_hook": f"{__name__}.{hook}"}
    return args


def pin_address() -> None:
    """In a worker of a Ray this process started: RAY_ADDRESS names that Ray. Ray's state API (Ray
    Train's placement-group cleaner asks it whether the controller is alive) otherwise looks for
    the Ray of this machine, and with a second one running (another run, `mtnlg serve`) its thread
    dies with a ConnectionError traceback "Found multiple active Ray instances"."""
    import ray

    if "RAY_ADDRESS" not in os.environ and ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def quiet_worker() -> None:
    """In a Ray worker: Ray Train logs its line per report ("Reporting training result ...") under
    its file's path (ray/train/v2/_internal/execution/context.py: `getLogger(__file__)`), outside
    the `ray.train` logger that RunConfig's LoggingConfig filters; this lowers that one logger.
    Also `pin_address`."""
    import ray

    pin_address()
    path = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(path).setLevel(logging.WARNING)
    # Ray Train's placement-group cleaner asks the state API, which the dashboard serves, whether
    # the controller still lives, and warns every few seconds that it cannot when the local Ray
    # runs without one; that Ray ends with the command, so there is nothing left to clean up.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def quiet_ray_data() -> None:
    """Unless verbose: no Ray Data progress bars or progress log lines in this process, and only
    its warnings (QUIET_RAY_ENV does the same in the workers)."""
    if verbose():
        return
    from ray.data import DataContext
    from ray.util.debug import log_once

    DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # its warning that bars are off: they are, on purpose
    logging.getLogger("ray.data").setLevel(logging.WARNING)
