"""Fine-tune on Ray Train: `ray job submit --working-dir . -- python jobs/finetune.py --config CONFIG`
(CONFIG: a YAML path, or a shipped config's name as `mtnlg configs` lists them).

The same as `mtnlg finetune CONFIG` (full or LoRA, from a checkpoint, run directory or GPT-2
directory); joins the cluster of RAY_ADDRESS (set by `ray job submit`), or starts a local Ray.
With --tune the config is a TuneJob and this runs `mtnlg tune` instead.
"""

import sys

from mtnlg_ray.cli import job_main
from mtnlg_ray.train.finetune import run_finetune
from mtnlg_ray.train.tune import run_tune

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--tune" in argv:  # the config is a TuneJob: run the Ray Tune search
        argv.remove("--tune")
        sys.exit(job_main(__doc__, "TuneJob", run_tune, argv))
    sys.exit(job_main(__doc__, "FinetuneJob", run_finetune, argv))
