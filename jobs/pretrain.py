"""Pretrain on Ray Train: `ray job submit --working-dir . -- python jobs/pretrain.py --config CONFIG.yaml`.

The same as `mtnlg pretrain CONFIG.yaml`; joins the cluster of RAY_ADDRESS (set by `ray job
submit`), or starts a local Ray.
"""

import argparse
import sys

from mtnlg_ray.config import PretrainJob, load_job
from mtnlg_ray.errors import UserError
from mtnlg_ray.train.trainer import run_pretrain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="PretrainJob YAML (jobs/configs/pretrain/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args()
    try:
        run_pretrain(load_job(args.config, PretrainJob, args.set))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
