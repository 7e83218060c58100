"""`mtnlg` in a fresh process, timed, reporting whether torch or Ray was imported: for the checks
that must answer before either starts (a missing path, a run --resume refuses, a config error)."""

from __future__ import annotations

import subprocess
import sys
import time

# What `mtnlg ARGS` runs (cli.main), then one last stdout line naming the heavy modules imported.
PROBE = ("import sys\nfrom mtnlg_ray.cli import main\n"
         "try:\n    code = main(sys.argv[1:])\n"
         "finally:\n    print('heavy:', sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
         "sys.exit(code)\n")


def probe(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """(result, wall seconds) of `mtnlg ARGS`; result.stdout ends with "heavy: [...]"."""
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    return res, time.monotonic() - start


def heavy(res: subprocess.CompletedProcess) -> str:
    return res.stdout.splitlines()[-1]
