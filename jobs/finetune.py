"""Fine-tune on Ray Train: `ray job submit --working-dir . -- python jobs/finetune.py --config CONFIG.yaml`.

The same as `mtnlg finetune CONFIG.yaml` (full or LoRA, from a checkpoint, run directory or GPT-2
directory); joins the cluster of RAY_ADDRESS (set by `ray job submit`), or starts a local Ray.
With --tune the config is a TuneJob and this runs `mtnlg tune` instead.
"""

import argparse
import sys

from mtnlg_ray.config import FinetuneJob, TuneJob, load_job
from mtnlg_ray.errors import UserError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="FinetuneJob YAML (jobs/configs/finetune/)")
    parser.add_argument("--tune", action="store_true", help="the config is a TuneJob: run the Ray Tune search")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args()
    try:
        if args.tune:
            from mtnlg_ray.train.tune import run_tune

            run_tune(load_job(args.config, TuneJob, args.set))
        else:
            from mtnlg_ray.train.finetune import run_finetune

            run_finetune(load_job(args.config, FinetuneJob, args.set))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
