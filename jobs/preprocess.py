"""Preprocess a corpus on Ray Data: `ray job submit --working-dir . -- python jobs/preprocess.py --config CONFIG`
(CONFIG: a YAML path, or a shipped config's name as `mtnlg configs` lists them).

The same as `mtnlg preprocess CONFIG`; joins the cluster of RAY_ADDRESS (set by `ray job
submit`), or starts a local Ray. Prints the dataset directory it wrote.
"""

import sys

from mtnlg_ray.cli import job_main
from mtnlg_ray.data.shards import run_preprocess

if __name__ == "__main__":
    sys.exit(job_main(__doc__, "PreprocessJob", run_preprocess))
