"""Pretrain on Ray Train: `ray job submit --working-dir . -- python jobs/pretrain.py --config CONFIG`
(CONFIG: a YAML path, or a shipped config's name as `mtnlg configs` lists them).

The same as `mtnlg pretrain CONFIG`; joins the cluster of RAY_ADDRESS (set by `ray job
submit`), or starts a local Ray.
"""

import sys

from mtnlg_ray.cli import job_main
from mtnlg_ray.train.trainer import run_pretrain

if __name__ == "__main__":
    sys.exit(job_main(__doc__, "PretrainJob", run_pretrain))
