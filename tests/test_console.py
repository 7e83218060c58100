"""console.py: the library's records as plain lines (INFO on stdout, warnings on stderr), levels by -q / -v."""

import logging
import os
import subprocess
import sys

import pytest

from mtnlg_ray import console


@pytest.fixture
def package_logger(monkeypatch):
    """configure() changes the package logger and the environment: put both back afterwards."""
    log = logging.getLogger(console.ROOT)
    level, handlers = log.level, list(log.handlers)
    for key in console.QUIET_RAY_ENV:  # unset now, unset afterwards (setenv records the old state)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    yield logging.getLogger("mtnlg_ray.data.shards")
    log.setLevel(level)
    log.handlers[:] = handlers


def test_default_info_on_stdout_warnings_on_stderr(package_logger, capsys):
    console.configure(0)
    console.configure(0)  # twice: still one handler, one line per record
    package_logger.info("[preprocess] wrote %s", "data/")
    package_logger.debug("hidden")
    package_logger.warning("careful")
    assert capsys.readouterr() == ("[preprocess] wrote data/\n", "careful\n")
    assert not console.verbose() and console.ray_init_args() == {"logging_level": logging.WARNING}
    assert all(os.environ[k] == v for k, v in console.QUIET_RAY_ENV.items())  # for the workers Ray starts


def test_quiet_keeps_warnings_verbose_adds_debug(package_logger, capsys):
    console.configure(-1)
    package_logger.info("status")
    package_logger.warning("careful")
    assert capsys.readouterr() == ("", "careful\n")
    console.configure(1)
    package_logger.debug("detail")
    assert capsys.readouterr().out == "detail\n"
    assert console.verbose() and console.ray_init_args() == {"logging_level": logging.INFO}


def test_a_local_ray_quiets_its_workers(package_logger, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "")  # set: the hook's pin_address leaves it (and this process) alone
    console.configure(0)
    hook = console.ray_init_args("local")["runtime_env"]["worker_process_setup_hook"]
    assert hook == "mtnlg_ray.console.quiet_worker" and "runtime_env" not in console.ray_init_args("auto")
    console.quiet_worker()
    import ray.train.v2._internal.execution.context as train_context  # the module whose logger it lowers

    assert logging.getLogger(train_context.__file__).level == logging.WARNING
    logging.getLogger(train_context.__file__).setLevel(logging.NOTSET)
    console.configure(1)
    assert console.ray_init_args("local")["runtime_env"]["worker_process_setup_hook"] == "mtnlg_ray.console.pin_address"


IDLE_COUNT = """
import os, sys, time
import ray
from mtnlg_ray import console
ray.init(address="local", num_cpus=2, **console.ray_init_args("local", prestart=sys.argv[1] == "1"))
time.sleep(5)  # the prestarted workers are up within a second or two of ray.init
parent, idle = {}, []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        parent[pid] = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
        if open(f"/proc/{pid}/cmdline").read().startswith("ray::IDLE"):
            idle.append(pid)
    except OSError:
        continue
def ours(pid):  # a descendant of this process (the raylet it started is its child)
    while pid in parent and pid != str(os.getpid()):
        pid = parent[pid]
    return pid == str(os.getpid())
print(sum(map(ours, idle)))
"""


@pytest.mark.parametrize("prestart", [True, False])
def test_a_training_ray_starts_no_idle_workers(prestart, tmp_path):
    """A real local Ray: with Ray's default the driver's node prestarts idle workers; started for
    training (prestart=False) it starts none (NO_PRESTART_ENV names a setting Ray reads)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *console.NO_PRESTART_ENV)}
    out = subprocess.run([sys.executable, "-c", IDLE_COUNT, "1" if prestart else "0"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    idle = int(out.split()[-1])
    assert (idle >= 1 if prestart else idle == 0), out
